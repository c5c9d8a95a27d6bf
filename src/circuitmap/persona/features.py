"""A persona vector in terms of transcoder features.

The residual entering layer ``L`` is the sum of what every earlier MLP wrote, so the features that can
carry a trait there are those of layers ``< L``. A feature's write into that residual is its decoder vector
(for a cross-layer transcoder, the sum of its decoder vectors into MLP outputs ``< L``). ``aligned_features``
ranks them by the cosine similarity of that write with the vector's direction at ``L`` (by absolute value:
a feature whose write points against the vector carries the opposite trait) and labels them from a feature
database when one is given. ``feature_direction`` sums the top features' unit writes, each turned to point
along the vector, into one direction: steering with it tests how much of the vector's effect those few
features reproduce.

``persona_graph`` is the attribution graph of the vector's projection at a layer and position of a prompt:
which features drive the trait there. The residual entering layer ``L`` at position ``p`` depends only on
layers ``< L`` and positions ``≤ p``, so the graph is that of the model cut after its first ``L`` layers
(``Model.first_layers``, with the set's first ``L`` layers) on the prompt's first ``p + 1`` tokens, whose
target is the unit vector read from the residual where the cut model ends (a ``Direction`` target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitmap.attribution import AttributionConfig, Direction
from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.graphs import PruneConfig
from circuitmap.models import Model
from circuitmap.persona.steer import prompt_ids, unit_direction
from circuitmap.persona.vectors import PersonaVector
from circuitmap.pipeline import ComputedGraph, compute_graph
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_number


@dataclass(frozen=True)
class AlignedFeature:
    """A feature of ``layer`` whose write into the residual has cosine ``cosine`` with the vector."""

    layer: int
    feature: int
    cosine: float
    label: str | None = None

    @property
    def node(self) -> str:
        """The feature's name in graphs and dashboards (``layer_feature``)."""
        return f"{self.layer}_{self.feature}"


def residual_writes(transcoders: Transcoders, source: int, layer: int) -> torch.Tensor:
    """What each feature of layer ``source`` writes into the residual entering ``layer`` per unit of
    activation, ``[d_features, d_model]`` (``source < layer``)."""
    decoders = transcoders.decoder_vectors(source, slice(None))
    if decoders.dim() == 3:  # a cross-layer transcoder: slot j writes to MLP output source + j
        decoders = decoders[:, : layer - source].sum(dim=1)
    return decoders


def aligned_features(
    transcoders: Transcoders,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    *,
    top: int = 20,
    features: FeatureStore | None = None,
) -> list[AlignedFeature]:
    """The ``top`` features of layers ``< layer`` whose residual writes align best (by absolute cosine)
    with the vector's direction at ``layer``, labelled from ``features`` when given."""
    check_number("top", top, low=1, whole=True)
    direction = vector.layer(layer) if isinstance(vector, PersonaVector) else torch.as_tensor(vector)
    direction = direction.reshape(-1).double()
    if direction.numel() != transcoders.d_model:
        raise CircuitmapError(
            f"the vector has width {direction.numel()}; the transcoders' is {transcoders.d_model}"
        )
    if not 1 <= layer <= transcoders.n_layers:
        raise CircuitmapError(
            f"layer {layer} has no earlier transcoder layer "
            f"(features write into the layers 1..{transcoders.n_layers})"
        )
    norm = float(direction.norm())
    if norm == 0:
        raise CircuitmapError(f"the vector of layer {layer} is zero: it has no direction")
    unit = direction / norm
    found: list[tuple[float, int, int]] = []
    for source in range(layer):
        writes = residual_writes(transcoders, source, layer).detach().to("cpu", torch.float64)
        cosines = (writes @ unit) / writes.norm(dim=1).clamp_min(1e-30)
        values, indices = cosines.abs().topk(min(top, len(cosines)))
        found += [(float(cosines[i]), source, int(i)) for i in indices]
    found.sort(key=lambda item: -abs(item[0]))
    chosen = found[:top]
    labels = features.labels_of([(s, f) for _, s, f in chosen]) if features is not None else {}
    return [
        AlignedFeature(
            source, feature, cosine, labels[source, feature].text if (source, feature) in labels else None
        )
        for cosine, source, feature in chosen
    ]


def feature_direction(transcoders: Transcoders, chosen: list[AlignedFeature], layer: int) -> torch.Tensor:
    """The sum of ``chosen`` features' unit writes into the residual entering ``layer``, each signed to
    point along the vector they were chosen for: a direction ``[d_model]`` (float64) to steer with."""
    if not chosen:
        raise CircuitmapError("no feature to build a direction from")
    total = torch.zeros(transcoders.d_model, dtype=torch.float64)
    for item in chosen:
        if not item.layer < layer:
            raise CircuitmapError(
                f"feature {item.node} does not write into the residual entering layer {layer}"
            )
        write = (
            residual_writes(transcoders, item.layer, layer)[item.feature].detach().to("cpu", torch.float64)
        )
        total += (1.0 if item.cosine >= 0 else -1.0) * write / write.norm().clamp_min(1e-30)
    return total


def persona_graph(
    model: Model,
    transcoders: Transcoders,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    prompt: str | torch.Tensor,
    *,
    position: int = -1,
    system: str | None = None,
    attribution: AttributionConfig | None = None,
    pruning: PruneConfig | None = None,
    features: FeatureStore | None = None,
    groups: bool = True,
    progress: bool = True,
) -> ComputedGraph:
    """The graph of the projection on the unit vector of the residual entering ``layer`` (``≥ 1``) at
    ``position`` (default: the last) of ``prompt`` (a user turn in the chat template, after ``system``; or
    ids), as the module describes; labelled from ``features`` when given."""
    if not 1 <= layer < model.n_layers:
        raise CircuitmapError(f"a persona graph reads a layer in 1..{model.n_layers - 1}, not {layer}")
    transcoders.check_model(model.n_layers, model.d_model)
    unit = unit_direction(model, vector, layer)
    ids = prompt_ids(model, prompt, system)
    if not -len(ids) <= position < len(ids):
        raise CircuitmapError(f"position {position} is outside the prompt's {len(ids)} tokens")
    ids = ids[: position % len(ids) + 1]
    name = vector.info.get("trait", "vector") if isinstance(vector, PersonaVector) else "vector"
    target = Direction(f"{name} @ layer {layer}", unit.to(model.dtype))
    return compute_graph(
        model.first_layers(layer),
        transcoders.first_layers(layer),
        ids,
        attribution,
        pruning,
        targets=[target],
        features=features,
        groups=groups,
        progress=progress,
    )

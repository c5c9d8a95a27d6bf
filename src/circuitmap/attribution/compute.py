"""``attribute``: compute the attribution graph that explains one prediction.

Steps: build the replacement model's autograd graph (``replacement.py``); resolve the targets
(``targets.py``); collect active features (the first position is excluded by convention: its features and
error belong to the constant term, as it mostly acts as an attention sink); when ``max_feature_nodes`` caps
the graph, choose which features to keep by estimated influence; then compute every row (``rows.py``) against
the kept sources (``sources.py``), with dropped features folded into the error nodes of their layer and
position, and store the rows as a sparse graph. Under a cap, rows visited while selecting (``selection.py``)
are reused; only those whose candidate pool missed a kept feature are computed again.

A model spread over several devices by a device map is traced as it runs: each layer's transcoder computes
on its own device (by default the device of the model layer it serves), every row's gradients are taken
where they arrive, and the rows are gathered on the first layer's device.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import torch

from circuitmap.attribution.config import AttributionConfig
from circuitmap.attribution.edges import EdgeWriter
from circuitmap.attribution.progress import Progress, Reporter
from circuitmap.attribution.replacement import ReplacementRun, replacement_run
from circuitmap.attribution.rows import RowComputer, RowSpec, concat_specs, rows_per_pass
from circuitmap.attribution.selection import Selection, select_features
from circuitmap.attribution.sources import ActiveFeatures, Sources, active_features, build_sources
from circuitmap.attribution.targets import Target, TargetSpec, resolve_targets
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.hardware import threads_for_load
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders

FIRST_POSITION = 1
POOL_FACTOR = 4
POOL_BUDGET_BYTES = 2**28
MAX_BATCH_SIZE = 512


def default_batch_size(model: Model, n_tokens: int) -> int:
    """Rows per batch (a selection step, a progress step): the most whole backward passes within 512 rows."""
    per_pass = rows_per_pass(model, n_tokens)
    return per_pass * max(1, MAX_BATCH_SIZE // per_pass)


def check_inputs(
    model: Model, transcoders: Transcoders, ids: torch.Tensor, config: AttributionConfig
) -> None:
    """Clear errors for transcoders that do not fit, a prompt that is batched or too short (``encode`` has
    checked its length against the model's context), and settings out of range."""
    transcoders.check_model(model.n_layers, model.d_model)
    if ids.shape[0] != 1:
        raise CircuitmapError(f"attribution explains one prompt at a time, got a batch of {ids.shape[0]}")
    config.check()
    if ids.shape[1] <= FIRST_POSITION:
        raise CircuitmapError("the prompt needs at least two tokens (the first position is excluded)")


def collect_features(run: ReplacementRun) -> ActiveFeatures:
    """The active features of the graph (first position excluded); an error when there are none."""
    features = active_features(run, FIRST_POSITION)
    if len(features) == 0:
        raise CircuitmapError("no transcoder feature is active on this prompt (first position excluded)")
    return features


def feature_rows(transcoders: Transcoders, features: ActiveFeatures) -> RowSpec:
    """Rows of the given features: their encoder rows, injected at their layer's MLP input."""
    vectors = torch.empty(
        len(features), transcoders.d_model, dtype=transcoders.dtype, device=transcoders.device
    )
    for layer in features.layer.unique().tolist():
        members = features.layer == layer
        vectors[members] = transcoders.encoder_vectors(layer, features.index[members]).to(vectors.device)
    return RowSpec(["mlp_in"] * len(features), features.layer, features.position, vectors)


def _target_rows(targets: Sequence[Target], n_tokens: int, n_layers: int) -> RowSpec:
    return RowSpec(
        [target.point for target in targets],
        torch.full((len(targets),), n_layers),
        torch.full((len(targets),), n_tokens - 1),
        torch.stack([target.vector for target in targets]),
    )


def _target_values(run: ReplacementRun, targets: Sequence[Target]) -> torch.Tensor:
    """Each target's value: its read-out vector (moved to its read-out's device) dotted with the read-out at
    the last position, plus its offset."""
    values = []
    for target in targets:
        readout = run.readouts[target.point].detach()[0, -1]
        vector = target.vector.to(device=readout.device, dtype=run.embed.dtype)
        values.append(float(readout @ vector) + target.offset)
    return torch.tensor(values, dtype=torch.float64)


def _error_column(features: ActiveFeatures, n_tokens: int) -> torch.Tensor:
    """Index, among error nodes, of the error node of each feature's layer and position."""
    return features.layer * (n_tokens - FIRST_POSITION) + features.position - FIRST_POSITION


def pool_extra(max_feature_nodes: int, n_targets: int, dtype: torch.dtype) -> int:
    """Candidates each visited row keeps beyond the visited features: a multiple of the cap, or as many as
    about 256 MiB holds over all visited rows, whichever is larger."""
    affordable = POOL_BUDGET_BYTES // ((max_feature_nodes + n_targets) * dtype.itemsize)
    return max(POOL_FACTOR * max_feature_nodes, affordable)


def _final_batches(
    computer: RowComputer,
    sources: Sources,
    spec: RowSpec,
    selection: Selection | None,
    batch_size: int,
    reporter: Reporter,
):
    """Yield ``(rows, values)`` for every row of ``spec``: known rows from the selection, others computed."""
    if selection is None:
        yield from computer.batches(sources, spec, reporter, "attribution", batch_size)
        return
    missing = (~selection.complete).nonzero(as_tuple=True)[0]
    rows = selection.rows
    batches = computer.batches(sources, spec.subset(missing), reporter, "recomputing rows", batch_size)
    for chunk, values in batches:
        rows[missing[chunk]] = values.cpu().to(rows.dtype)
    yield slice(0, len(spec)), rows


@threads_for_load()
def attribute(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    config: AttributionConfig | None = None,
    *,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    max_n_logits: int | None = None,
    desired_logit_prob: float | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    progress: Progress = True,
    stop: threading.Event | None = None,
) -> Graph:
    """Attribution graph of ``prompt``'s next-token prediction on the local replacement model.

    ``targets``: None for the salient logits; or tokens, ``(a, b)`` logit differences and ``Direction``s.
    ``config`` holds the settings (``AttributionConfig``: salient logits, the cap on feature nodes, the batch
    size); the keywords of the same names override it. ``progress``: a terminal bar (``True``), nothing, or
    a ``callback(stage, done, total)``. Setting ``stop`` ends the computation after the current batch with
    ``Interrupted``. The transcoders are cast to the model's dtype and each layer is moved to the device of
    the model layer it serves, unless ``Transcoders.place`` holds the set on devices of its own. On a machine
    where other processes keep cores busy, it computes with as many threads as there are idle cores.
    """
    started = time.perf_counter()
    config = (config or AttributionConfig()).with_changes(
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
    )
    ids = model.encode(prompt)
    check_inputs(model, transcoders, ids, config)
    reporter = Reporter(progress, stop)
    transcoders.follow(model.layer_devices(), model.dtype)
    n_tokens = ids.shape[1]
    max_feature_nodes = config.max_feature_nodes
    batch_size = config.batch_size or default_batch_size(model, n_tokens)
    with replacement_run(model, transcoders, ids) as run:
        computer = RowComputer(model, transcoders, run, ids, min(batch_size, rows_per_pass(model, n_tokens)))
        resolved = resolve_targets(model, run.last_logits, targets, config)
        weights = torch.tensor([t.weight for t in resolved], dtype=torch.float64)
        features = collect_features(run)
        target_spec = _target_rows(resolved, n_tokens, model.n_layers)
        selection = None
        if max_feature_nodes is not None and len(features) > max_feature_nodes:
            selection = select_features(
                computer,
                build_sources(run, transcoders, features, None, FIRST_POSITION),
                features,
                lambda chosen: feature_rows(transcoders, features.subset(chosen)),
                target_spec,
                weights,
                _error_column(features, n_tokens),
                max_feature_nodes,
                batch_size,
                pool_extra(max_feature_nodes, len(resolved), model.dtype),
                reporter,
            )
        kept_features = features if selection is None else features.subset(selection.kept)
        sources = build_sources(
            run, transcoders, features, None if selection is None else selection.kept, FIRST_POSITION
        )
        spec = concat_specs([feature_rows(transcoders, kept_features), target_spec])
        batches = _final_batches(computer, sources, spec, selection, batch_size, reporter)
        target_values = _target_values(run, resolved)
        values = torch.cat([kept_features.pre_activation.double(), target_values])
        edges = EdgeWriter(spec, sources, values, model.dtype)
        for batch_rows, batch in batches:
            edges.write(batch_rows, batch)
        graph = _assemble(
            model, transcoders.model_name or "", ids, resolved, target_values, kept_features, sources, edges
        )
    if isinstance(prompt, str):
        graph.prompt = prompt
    graph.info.update(
        graph_id=uuid.uuid4().hex,
        transcoders_fingerprint=transcoders.fingerprint(),
        n_active_features=len(features),
        max_feature_nodes=max_feature_nodes,
        recomputed_rows=0 if selection is None else int((~selection.complete).sum()),
        batch_size=batch_size,
        first_position=FIRST_POSITION,
        dtype=str(model.dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 3),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return graph


def _assemble(
    model: Model,
    transcoders_name: str,
    ids: torch.Tensor,
    targets: Sequence[Target],
    target_values: torch.Tensor,
    features: ActiveFeatures,
    sources: Sources,
    edges: EdgeWriter,
) -> Graph:
    """The Graph: node arrays in graph order (features, errors, tokens, targets) and the edges."""
    row_counts, constants = edges.row_counts, edges.constants
    n_features, n_errors, n_tokens, n_targets = (
        len(features),
        sources.n_errors,
        sources.n_tokens,
        len(targets),
    )
    n_nodes = n_features + n_errors + n_tokens + n_targets
    per_node = np.zeros(n_nodes, dtype=np.int64)
    per_node[:n_features] = row_counts[:n_features]
    per_node[n_nodes - n_targets :] = row_counts[n_features:]
    indptr = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(per_node, out=indptr[1:])
    kind = np.concatenate(
        [
            np.full(count, kind, dtype=np.int8)
            for count, kind in [
                (n_features, NodeKind.FEATURE),
                (n_errors, NodeKind.ERROR),
                (n_tokens, NodeKind.TOKEN),
                (n_targets, NodeKind.TARGET),
            ]
        ]
    )
    token_ids = ids[0].cpu().numpy().astype(np.int64)
    no_value = np.full(n_errors + n_tokens, np.nan)
    value = np.concatenate([features.pre_activation.double().cpu().numpy(), no_value, target_values.numpy()])
    constant = np.concatenate([constants[:n_features], no_value, constants[n_features:]])
    target_weight = np.zeros(n_nodes)
    target_weight[n_nodes - n_targets :] = [t.weight for t in targets]
    return Graph(
        prompt=model.tokenizer.decode(token_ids.tolist()),
        tokens=token_ids.tolist(),
        token_strings=model.token_strings(ids),
        n_layers=model.n_layers,
        kind=kind,
        layer=np.concatenate(
            [
                features.layer.numpy(),
                sources.error_layer.numpy(),
                np.full(n_tokens, -1),
                np.full(n_targets, model.n_layers),
            ]
        ).astype(np.int32),
        position=np.concatenate(
            [
                features.position.numpy(),
                sources.error_position.numpy(),
                np.arange(n_tokens),
                np.full(n_targets, n_tokens - 1),
            ]
        ).astype(np.int32),
        index=np.concatenate(
            [features.index.numpy(), np.full(n_errors, -1), token_ids, [t.token_id for t in targets]]
        ).astype(np.int64),
        activation=np.concatenate(
            [features.activation.double().cpu().numpy(), np.zeros(n_errors + n_tokens + n_targets)]
        ).astype(np.float32),
        value=value,
        constant=constant,
        target_weight=target_weight,
        target_names=[t.name for t in targets],
        target_probs=np.array([t.prob for t in targets], dtype=np.float64),
        indptr=indptr,
        indices=edges.indices,
        weights=edges.weights,
        model_name=model.name,
        transcoders_name=transcoders_name,
    )

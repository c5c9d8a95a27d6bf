"""Logit lens of transcoder features: the output tokens a feature's decoder promotes and suppresses.

A feature's output direction is what it adds to the residual stream per unit of activation: its decoder row,
summed over every output layer for a cross-layer transcoder. The direction is passed through the model's own
final norm (linearised as ``norm(d) − norm(0)``, which removes a LayerNorm's bias and works for every norm
parametrisation) and the unembedding; the largest and smallest logits are the lens. Values are the logits the
direction alone would produce at unit RMS, so they compare across features of one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.graphs.export import FEATURE_TYPES
from circuitmap.graphs.graph import NodeKind
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.models.adapters import get_module
from circuitmap.models.model import Model
from circuitmap.transcoders import CrossLayerTranscoder, Transcoders

_CHUNK = 256
FEATURE_TYPE = FEATURE_TYPES[NodeKind.FEATURE]


@dataclass(frozen=True)
class Lens:
    """The ``k`` most promoted (``top``) and most suppressed (``bottom``) output tokens, as (token, logit)."""

    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]]

    def as_json(self) -> dict:
        """The ``lens`` field of a node in the viewer JSON."""
        return {
            "top": [[token, value] for token, value in self.top],
            "bottom": [[token, value] for token, value in self.bottom],
        }


def output_directions(transcoders: Transcoders, layer: int, features: torch.Tensor) -> torch.Tensor:
    """What each feature of ``layer`` adds to the residual stream per unit activation, ``[n, d_model]``."""
    vectors = transcoders.decoder_vectors(layer, features)
    return vectors.sum(1) if isinstance(transcoders, CrossLayerTranscoder) else vectors


def logit_lens(
    model: Model, transcoders: Transcoders, features: Sequence[tuple[int, int]], k: int = 10
) -> list[Lens]:
    """The lens of each ``(layer, feature index)``, in the order given."""
    if k < 1:
        raise CircuitmapError(f"k must be at least 1, got {k}")
    for layer, index in features:
        if not 0 <= layer < transcoders.n_layers or not 0 <= index < transcoders.d_features:
            raise CircuitmapError(
                f"no feature {index} in layer {layer}: the transcoders have {transcoders.n_layers} layers of "
                f"{transcoders.d_features} features"
            )
    if not features:
        return []
    norm = get_module(model.hf_model, model.adapter.final_norm)
    unembedding = model.unembedding.detach()
    k = min(k, unembedding.shape[0])
    results: list[Lens] = []
    with torch.no_grad():
        for start in range(0, len(features), _CHUNK):
            chunk = features[start : start + _CHUNK]
            directions = torch.cat(
                [
                    output_directions(transcoders, layer, torch.tensor([index], device=transcoders.device))
                    for layer, index in chunk
                ]
            ).to(device=unembedding.device, dtype=unembedding.dtype)
            normed = norm(directions) - norm(torch.zeros_like(directions))
            logits = (normed @ unembedding.T).float()
            top_values, top_ids = logits.topk(k, dim=-1)
            bottom_values, bottom_ids = logits.topk(k, dim=-1, largest=False)
            for row in range(len(chunk)):
                results.append(
                    Lens(
                        top=_named(model, top_ids[row], top_values[row]),
                        bottom=_named(model, bottom_ids[row], bottom_values[row]),
                    )
                )
    return results


def layer_output_lens(
    model: Model, transcoders: Transcoders, layer: int, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lens of every feature of ``layer`` at once: top ids, top logits, bottom ids, bottom logits
    (each ``[d_features, k]``), computed in chunks to bound memory."""
    norm = get_module(model.hf_model, model.adapter.final_norm)
    unembedding = model.unembedding.detach()
    k = min(k, unembedding.shape[0])
    parts = []
    with torch.no_grad():
        for start in range(0, transcoders.d_features, _CHUNK):
            ids = torch.arange(start, min(start + _CHUNK, transcoders.d_features), device=transcoders.device)
            directions = output_directions(transcoders, layer, ids).to(unembedding.device, unembedding.dtype)
            logits = ((norm(directions) - norm(torch.zeros_like(directions))) @ unembedding.T).float()
            top_values, top_ids = logits.topk(k, dim=-1)
            bottom_values, bottom_ids = logits.topk(k, dim=-1, largest=False)
            parts.append((top_ids, top_values, bottom_ids, bottom_values))
    return tuple(torch.cat([part[i] for part in parts]).cpu() for i in range(4))


def layer_input_lens(
    model: Model, transcoders: Transcoders, layer: int, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens whose embeddings alone excite each feature of ``layer`` most: ids and the pre-activation
    ``W_enc · mlp_norm(embedding) + b_enc`` they would give (each ``[d_features, k]``)."""
    embeddings = model.hf_model.get_input_embeddings().weight.detach()
    norm = get_module(model.points.layers[layer], model.adapter.mlp_norm)
    k = min(k, embeddings.shape[0])
    with torch.no_grad():
        normed = norm(embeddings.unsqueeze(0)).squeeze(0)
        parts = []
        for start in range(0, transcoders.d_features, _CHUNK):
            ids = torch.arange(start, min(start + _CHUNK, transcoders.d_features), device=transcoders.device)
            encoder = transcoders.encoder_vectors(layer, ids).to(normed.device, normed.dtype)
            bias = transcoders.layers[layer].b_enc[ids].to(normed.device, normed.dtype)
            values, tokens = (encoder @ normed.T + bias.unsqueeze(1)).float().topk(k, dim=-1)
            parts.append((tokens, values))
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


def _named(model: Model, ids: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
    """(token string, value) pairs."""
    vocabulary = model.vocabulary()
    return [(vocabulary[token], value) for token, value in zip(ids.tolist(), values.tolist(), strict=True)]


def add_logit_lens(document: dict, model: Model, transcoders: Transcoders, k: int = 10) -> dict:
    """Give each feature node of a viewer document (``graph_json``) its ``lens``; returns the document."""
    nodes = [node for node in document["nodes"] if node["feature_type"] == FEATURE_TYPE]
    features = [parse_feature_id(node["node_id"])[:2] for node in nodes]
    for node, lens in zip(nodes, logit_lens(model, transcoders, features, k), strict=True):
        node["lens"] = lens.as_json()
    return document

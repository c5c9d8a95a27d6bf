"""QK attribution: why a head attends where it does, as a sum over pairs of query-side and key-side nodes.

For head ``h`` of layer ``L``, query position ``q`` and key position ``k`` the model computes the score
``s = scaling · query_h[q] · key_g[k]`` (``g`` the key-value head that ``h`` shares under grouped-query
attention), with rotary embeddings and any query/key norm applied; soft-capping and the mask come after and
are not decomposed. With the norm scales frozen at their clean values (the residual norms as in the graph,
and the per-head query and key norms of families that have them) the query is an affine function of the
residual stream at ``q``, and the key of the residual stream at ``k``.

**Nodes.** The residual stream entering layer ``L`` at one position is the sum of what these nodes wrote
there, each counted with its effect through the same-position paths of the replacement model (the residual
stream and the transcoders' skip paths):

- the token embedding (``E_{token}_{position}``, position embeddings included);
- each active transcoder feature of a layer below ``L`` (``{layer}_{feature}_{position}``); a cross-layer
  feature counts with its decoder outputs to layers below ``L`` only;
- each error node of a layer below ``L`` (``err_{layer}_{position}``): the MLP output minus the transcoders'
  reconstruction, plus, given a graph, the features the graph left out at that layer and position;
- each attention head of a layer below ``L``: its output at that position
  (``attn_{layer}_{head}_{position}``), a node of its own: paths through attention end there, same-position
  ones included, so the score is explained by what sits at the two positions;
- ``bias_{position}``: what no node accounts for: the query (key) projection's bias, the norms' biases, and
  the constants written into the residual stream (output-projection and transcoder decoder biases). It is
  the query (key) minus the nodes' parts, so the pairs sum to the score exactly.

Given a graph, node ids are those of the graph (same features, error nodes folded the same way); the graph
has no nodes before its first position, so there every active feature is a node of its own.

**Pairs.** With ``Q_i`` the part of the query written by query-side node ``i`` and ``K_j`` the part of the
key written by key-side node ``j``, ``pairs[i, j] = scaling · Q_i · K_j`` and ``Σ_ij pairs[i, j] = s``. The
score is bilinear: changing key-side node ``j``'s output by a factor ``1 + ε`` (query untouched) changes the
score by ``ε · Σ_i pairs[i, j]``.

**Computation.** One replacement-model run in which every head output below ``L`` is its clean value plus a
zero leaf (so gradients stop there and the heads become nodes), and the query/key norms are frozen; one
batched backward pass of ``2 · d_head`` rows from the query and key coordinates gives the Jacobians at the
embedding, the MLP outputs and the head outputs, which dotted with each node's output give ``Q_i`` and
``K_j``.

**Choosing heads.** ``salient_heads`` splits the graph's most influential cross-position edges over heads
(``heads.head_loadings``), weights each head's share of an edge by the edge's influence, and for the leading
heads splits further by the key position the head reads: the result ranks (head, query position, key
position) sites by their share of that influence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from circuitmap.attribution.heads import (
    AttentionCall,
    AttentionTap,
    attention_tap,
    edge_targets,
    graph_features,
    graph_ids,
    head_loadings,
    n_attention_heads,
    top_cross_position_edges,
)
from circuitmap.attribution.replacement import replacement_run
from circuitmap.attribution.sources import ActiveFeatures, Sources, active_features, build_sources
from circuitmap.attribution.targets import TargetSpec
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph
from circuitmap.graphs.ids import feature_id
from circuitmap.graphs.pruning import node_influence, normalized_weights
from circuitmap.models import Model
from circuitmap.models.hooks import _NormControl
from circuitmap.transcoders import Transcoders

HEAD_NORMS = ("q_norm", "k_norm")


def head_node_id(layer: int, head: int, position: int) -> str:
    """The id of an attention head's output at one position, as a QK node."""
    return f"attn_{layer}_{head}_{position}"


def bias_node_id(position: int) -> str:
    """The id of the constant part of a query or key, as a QK node."""
    return f"bias_{position}"


@dataclass
class QKAttribution:
    """A head's pre-softmax score at one (query, key) position pair, split over pairs of nodes."""

    layer: int
    """The head's layer."""
    head: int
    """The (query) head."""
    query_position: int
    """The position whose query is read."""
    key_position: int
    """The position whose key is read."""
    query_nodes: list[str]
    """Ids of the query-side nodes (rows of ``pairs``), the bias last."""
    key_nodes: list[str]
    """Ids of the key-side nodes (columns of ``pairs``), the bias last."""
    pairs: np.ndarray
    """``scaling · Q_i · K_j`` per pair (float64); the entries sum to ``score``."""
    score: float
    """``scaling · query · key`` from the query and key the model computed (before soft-capping and mask)."""
    softcap: float | None
    """The attention soft-cap of the layer, if any."""

    @property
    def query_totals(self) -> np.ndarray:
        """Each query-side node's part of the score (the rows' sums)."""
        return self.pairs.sum(1)

    @property
    def key_totals(self) -> np.ndarray:
        """Each key-side node's part of the score (the columns' sums)."""
        return self.pairs.sum(0)

    @property
    def capped_score(self) -> float:
        """The score after soft-capping, as the softmax sees it (before the mask)."""
        return (
            self.score if self.softcap is None else float(self.softcap * np.tanh(self.score / self.softcap))
        )

    def top_pairs(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` pairs with the largest ``|contribution|``: ``(query node, key node, contribution)``."""
        flat = np.argsort(-np.abs(self.pairs), axis=None, kind="stable")[:n]
        rows, columns = np.unravel_index(flat, self.pairs.shape)
        return [
            (self.query_nodes[row], self.key_nodes[column], float(self.pairs[row, column]))
            for row, column in zip(rows.tolist(), columns.tolist(), strict=True)
        ]


@dataclass(frozen=True)
class HeadSite:
    """A head at a query and key position, with its share of the influence of a graph's crossing edges."""

    layer: int
    """The head's layer."""
    head: int
    """The (query) head."""
    query_position: int
    """Where the head writes: the position of the targets of the edges it carries."""
    key_position: int
    """Where the head reads at the crossing step."""
    share: float
    """The share of the chosen edges' influence that goes through this head at these positions."""


@contextmanager
def _frozen_head_norms(model: Model, layer: int) -> Iterator[None]:
    """Context: the per-head query and key norms of ``layer`` (if the family has them) scale by their clean
    denominators, which carry no gradient."""
    attention = model.points.attention_modules()[layer]
    norms = [getattr(attention, name) for name in HEAD_NORMS if hasattr(attention, name)]
    handles = [
        norm.register_forward_hook(_NormControl(norm, model.adapter.rms_weight_offset)) for norm in norms
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _node_tap(layer: int, calls: dict[int, AttentionCall], leaves: dict[int, torch.Tensor]) -> AttentionTap:
    """A tap that keeps layer ``layer``'s call and makes the head outputs below it ``clean + zero leaf``."""

    def tap(call: AttentionCall) -> torch.Tensor | None:
        if not torch.is_grad_enabled() or call.layer > layer:
            return None
        calls[call.layer] = call
        if call.layer == layer:
            return None
        leaves[call.layer] = torch.zeros_like(call.output).requires_grad_(True)
        return call.output.detach() + leaves[call.layer]

    return tap


def _check_site(
    model: Model, n_tokens: int, layer: int, head: int, query_position: int, key_position: int
) -> None:
    """One-line errors for a layer, head or position out of range, and a key after the query."""
    n_heads = n_attention_heads(model)
    if not 0 <= layer < model.n_layers:
        raise CircuitmapError(f"layer {layer} is out of range: the model has {model.n_layers} layers")
    if not 0 <= head < n_heads:
        raise CircuitmapError(f"head {head} is out of range: layer {layer} has {n_heads} heads")
    for name, position in (("query", query_position), ("key", key_position)):
        if not 0 <= position < n_tokens:
            raise CircuitmapError(
                f"{name} position {position} is out of range: the prompt has {n_tokens} tokens"
            )
    if key_position > query_position:
        raise CircuitmapError(
            f"key position {key_position} comes after query position {query_position}: attention is causal"
        )


def _column_ids(
    sources: Sources, features: ActiveFeatures, tokens: list[int], columns: torch.Tensor
) -> list[str]:
    """Graph ids of the source columns ``columns`` (features, then error nodes, then tokens)."""
    ids = []
    for column in columns.tolist():
        if column < sources.n_features:
            ids.append(
                feature_id(
                    int(features.layer[column]), int(features.index[column]), int(features.position[column])
                )
            )
        elif column < sources.n_features + sources.n_errors:
            error = column - sources.n_features
            ids.append(f"err_{int(sources.error_layer[error])}_{int(sources.error_position[error])}")
        else:
            position = column - sources.n_features - sources.n_errors
            ids.append(f"E_{tokens[position]}_{position}")
    return ids


def _side(
    gradients: Sequence[torch.Tensor | None],
    rows: slice,
    layer: int,
    position: int,
    sources: Sources,
    head_outputs: Sequence[torch.Tensor],
    total: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts [n_nodes, d_head] (float64, on the CPU) of one side's vector ``total`` written by its nodes
    at ``position`` (source columns, then heads by layer, then the bias), and the source columns in order.

    ``gradients`` hold the Jacobians at the MLP outputs below ``layer``, the head outputs below ``layer`` and
    the embedding, in that order; ``rows`` selects this side's rows of the batch."""
    parts = torch.zeros(sources.n_columns, rows.stop - rows.start, dtype=total.dtype, device=total.device)
    for out_layer in range(layer):
        gradient = gradients[out_layer]
        if gradient is None:
            continue
        for written, columns, vectors in sources.writes[out_layer]:
            if written == position:
                parts.index_add_(0, columns, (vectors @ gradient[rows, 0, position].T).to(parts.device))
    embed_gradient = gradients[-1]
    n_written = sources.n_features + sources.n_errors
    parts[n_written + position] = embed_gradient[rows, 0, position] @ sources.embed[position]
    here = (sources.column_position == position) & (sources.column_layer < layer)
    columns = here.nonzero(as_tuple=True)[0]
    heads = [
        torch.einsum("rhd,hd->hr", gradient[rows, 0, position], output[0, position])
        for gradient, output in zip(gradients[layer : 2 * layer], head_outputs, strict=True)
    ]
    nodes = torch.cat([parts[columns.to(parts.device)], *heads]).double()
    return torch.cat([nodes, (total.double() - nodes.sum(0))[None]]).cpu(), columns


def qk_attribution(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor | Graph,
    layer: int,
    head: int,
    query_position: int,
    key_position: int,
) -> QKAttribution:
    """Split head ``head`` of layer ``layer``'s score at (``query_position``, ``key_position``) over pairs of
    query-side and key-side nodes, on ``prompt`` (text, ids, or a graph, whose prompt and nodes are used).
    The transcoders are moved to the model's device and dtype."""
    graph = prompt if isinstance(prompt, Graph) else None
    ids = graph_ids(model, transcoders, graph) if graph is not None else model.encode(prompt)
    if ids.shape[0] != 1:
        raise CircuitmapError(f"QK attribution explains one prompt at a time, got a batch of {ids.shape[0]}")
    _check_site(model, ids.shape[1], layer, head, query_position, key_position)
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    calls: dict[int, AttentionCall] = {}
    leaves: dict[int, torch.Tensor] = {}
    with (
        _frozen_head_norms(model, layer),
        attention_tap(model, _node_tap(layer, calls, leaves)),
        replacement_run(model, transcoders, ids) as run,
    ):
        call = calls[layer]
        if call.mask is not None and float(call.mask[0, 0, query_position, key_position]) != 0:
            raise CircuitmapError(
                f"layer {layer}'s attention at query position {query_position} does not see key position "
                f"{key_position} (it is outside the layer's window)"
            )
        if graph is None:
            features, kept = active_features(run, 0), None
        else:
            features, kept = graph_features(run, transcoders, graph, 0)
        sources = build_sources(run, transcoders, features, kept, 0)
        d_head = call.query.shape[-1]
        group = head // (call.query.shape[1] // call.key.shape[1])
        coordinates = torch.arange(d_head, device=call.query.device)
        grad_query = torch.zeros(
            2 * d_head, *call.query.shape, dtype=call.query.dtype, device=call.query.device
        )
        grad_query[coordinates, 0, head, query_position, coordinates] = 1
        grad_key = torch.zeros(2 * d_head, *call.key.shape, dtype=call.key.dtype, device=call.key.device)
        grad_key[d_head + coordinates, 0, group, key_position, coordinates] = 1
        gradients = torch.autograd.grad(
            [call.query, call.key],
            [*run.leaves[:layer], *(leaves[below] for below in range(layer)), run.embed],
            [grad_query, grad_key],
            is_grads_batched=True,
            allow_unused=True,
        )
        head_outputs = [calls[below].output.detach() for below in range(layer)]
        query = call.query[0, head, query_position].detach()
        key = call.key[0, group, key_position].detach()
        query_parts, query_columns = _side(
            gradients, slice(0, d_head), layer, query_position, sources, head_outputs, query
        )
        key_parts, key_columns = _side(
            gradients, slice(d_head, 2 * d_head), layer, key_position, sources, head_outputs, key
        )
    kept_features = features if kept is None else features.subset(kept)
    tokens = ids[0].tolist()
    n_heads = call.query.shape[1]

    def node_ids(columns: torch.Tensor, position: int) -> list[str]:
        heads = [head_node_id(below, h, position) for below in range(layer) for h in range(n_heads)]
        return [*_column_ids(sources, kept_features, tokens, columns), *heads, bias_node_id(position)]

    return QKAttribution(
        layer=layer,
        head=head,
        query_position=query_position,
        key_position=key_position,
        query_nodes=node_ids(query_columns, query_position),
        key_nodes=node_ids(key_columns, key_position),
        pairs=(call.scaling * query_parts @ key_parts.T).numpy(),
        score=float(call.scaling * (query.double() @ key.double())),
        softcap=call.softcap,
    )


def salient_heads(
    model: Model,
    transcoders: Transcoders,
    graph: Graph,
    n_sites: int = 5,
    *,
    n_edges: int = 32,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    batch_size: int | None = None,
) -> list[HeadSite]:
    """The ``n_sites`` (head, query position, key position) sites that carry the largest share of the
    influence of the graph's ``n_edges`` most influential cross-position edges.

    Each edge's influence (its pruning score) is split over heads in proportion to ``|loading|``; the
    ``n_sites`` heads with the largest shares are then split by key position the same way, and their sites
    ranked. ``targets`` as for ``head_loadings``."""
    if n_sites < 1:
        raise CircuitmapError(f"n_sites must be at least 1, got {n_sites}")
    edges = top_cross_position_edges(graph, n_edges, by="influence")
    influence = (normalized_weights(graph) * node_influence(graph)[graph.target_indices()])[edges]
    edges, influence = edges[influence > 0], influence[influence > 0]
    if edges.size == 0:
        raise CircuitmapError("no cross-position edge of the graph carries influence to its targets")
    edge_share = dict(zip(edges.tolist(), (influence / influence.sum()).tolist(), strict=True))
    query_position = dict(
        zip(edges.tolist(), graph.position[edge_targets(graph, edges)].tolist(), strict=True)
    )
    common = dict(targets=targets, batch_size=batch_size)
    by_head = head_loadings(model, transcoders, graph, edges, **common)
    edge_head = list(zip(by_head.edge.tolist(), by_head.layer.tolist(), by_head.head.tolist(), strict=True))
    head_share = _proportional(by_head.edge.tolist(), edge_head, np.abs(by_head.value), edge_share)
    totals: dict[tuple[int, int], float] = defaultdict(float)
    for (_, layer, head), share in head_share.items():
        totals[layer, head] += share
    leading = sorted(totals, key=lambda site: -totals[site])[:n_sites]
    split = head_loadings(model, transcoders, graph, edges, heads=leading, split_key_positions=True, **common)
    groups = list(zip(split.edge.tolist(), split.layer.tolist(), split.head.tolist(), strict=True))
    keys = [
        (layer, head, query_position[edge], key)
        for (edge, layer, head), key in zip(groups, split.key_position.tolist(), strict=True)
    ]
    site_share = _proportional(groups, keys, np.abs(split.value), head_share)
    ranked = sorted(site_share, key=lambda key: -site_share[key])[:n_sites]
    return [HeadSite(*key, share=site_share[key]) for key in ranked]


def _proportional(groups: list, keys: list, magnitudes: np.ndarray, totals: dict) -> dict:
    """Each group's total split over the group's entries in proportion to their magnitudes, summed by key."""
    sums: dict = defaultdict(float)
    for group, magnitude in zip(groups, magnitudes.tolist(), strict=True):
        sums[group] += magnitude
    shares: dict = defaultdict(float)
    for group, key, magnitude in zip(groups, keys, magnitudes.tolist(), strict=True):
        if sums[group] > 0:
            shares[key] += totals[group] * magnitude / sums[group]
    return shares

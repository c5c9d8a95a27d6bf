"""Head loadings: how the weight of a cross-position edge splits over the attention heads that carry it.

In the local replacement model (attention patterns and norm scales frozen, MLPs replaced by their
transcoder features, error vectors and skip paths) an edge ``A[t, s]`` is a sum over paths from the
source's output to the target's read-out. Within one position a path may run along the residual stream,
through skip paths and through the diagonal of an attention pattern; the only step that changes position
is an attention head's OV circuit reading another position. So when the source and the target sit at
different positions every path changes position at least once, and it may do so several times (two heads
in a row, say).

**Definition.** Each path is credited to the head of its *last* position-changing step: the head ``h`` of
layer ``L`` whose output at the target's position ``p_t`` the path reaches from another position ``p'``,
staying at ``p_t`` from there on. The loading of head ``(L, h)`` is the sum of the paths credited to it::

    loading(L, h) = Σ_{p' < p_t} A_h[p_t, p'] · γ_{L,h} · ∂v_{L,h}[p'] / ∂source

with ``A_h`` the frozen pattern, ``v_{L,h}`` the values the head reads (shared by the query heads of one
key-value head under grouped-query attention), ``γ_{L,h}`` the gradient of the target's read-out with
respect to the head's output at ``p_t`` along same-position paths only, and the last factor the source's
whole effect (every path) on the values at ``p'``. Every path has exactly one last crossing and a path
without one cannot link two positions, so the loadings sum to the edge (``remainder`` shows the rounding).
With ``split_key_positions`` each loading is split further by ``p'``, the position the head reads.

**Algorithm**, for the distinct targets of the chosen edges:

1. Same-position gradients ``γ``: the replacement model is run with each head output written as its clean
   value plus (pattern diagonal × values) minus the same, detached: the values do not change, and gradients
   pass through the diagonal only. One batched backward pass from the targets' read-outs gives ``γ`` at
   every layer's head outputs.
2. Crossing steps: in the ordinary replacement model, one row per (target, layer, head[, key position])
   injects ``A_h[p_t, p'] · γ_{L,h}`` into the values of layer ``L`` at the positions ``p' < p_t``. Batched
   backward passes take the rows down to the MLP outputs and the embedding, where dotting with each
   source's output gives its loadings, as for the graph's own rows. Only the layers above the lowest
   source and up to the target are visited.

The cost is two runs of the replacement model and about ``n_targets × n_layers × n_heads`` backward rows
(times the number of key positions when splitting), whatever the number of edges per target.

Attention is observed through ``attention_tap``: circuitmap's attention function, as registered with
transformers, is wrapped so that a callback sees each layer's queries, keys, values, pattern and head
outputs exactly as the model computed them (rotary embeddings and any query/key norm applied), and may
replace the head outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from circuitmap.attribution.compute import FIRST_POSITION
from circuitmap.attribution.replacement import ReplacementRun, replacement_run
from circuitmap.attribution.rows import RowSpec
from circuitmap.attribution.sources import ActiveFeatures, Sources, active_features, build_sources
from circuitmap.attribution.targets import TargetSpec, resolve_targets
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.pruning import node_influence, normalized_weights
from circuitmap.models import Model
from circuitmap.models.hooks import ATTENTION_IMPLEMENTATION
from circuitmap.transcoders import Transcoders

EDGE_ORDERS = ("weight", "influence")


GRADIENT_BUDGET_BYTES = 4 * 2**30
MAX_BATCH_SIZE = 512


def _rows_per_batch(model: Model, n_tokens: int) -> int:
    """Rows per batched backward pass over the whole prompt: as many as keep the batch's gradients (every
    layer's MLP output and head outputs) within about 4 GiB, at most 512."""
    per_row = n_tokens * model.d_model * (model.n_layers + 2) * model.dtype.itemsize * 2
    return int(min(MAX_BATCH_SIZE, max(1, GRADIENT_BUDGET_BYTES // per_row)))


@dataclass
class AttentionCall:
    """One call of a layer's attention function, with the tensors the model passed and got back."""

    layer: int
    """The layer whose attention this is."""
    query: torch.Tensor
    """Queries [1, n_heads, T, d_head], after rotary embeddings and any query norm."""
    key: torch.Tensor
    """Keys [1, n_kv_heads, T, d_head], after rotary embeddings and any key norm."""
    value: torch.Tensor
    """Values [1, n_kv_heads, T, d_head]."""
    pattern: torch.Tensor
    """Softmax pattern [1, n_heads, T, T] (the recorded one while attention is frozen)."""
    output: torch.Tensor
    """Head outputs [1, T, n_heads, d_head], before the output projection."""
    mask: torch.Tensor | None
    """The additive attention mask the model passed (causal, sliding window), if any."""
    scaling: float
    """The factor on ``query · key`` before any soft-capping."""
    softcap: float | None
    """Soft-capping of the scores (``cap · tanh(score / cap)``), if the model uses it."""


AttentionTap = Callable[[AttentionCall], torch.Tensor | None]


@contextmanager
def attention_tap(model: Model, tap: AttentionTap) -> Iterator[None]:
    """Context: ``tap`` sees every attention call of ``model``; a tensor it returns replaces the head
    outputs. The attention function registered for circuitmap is wrapped, and restored on exit."""
    layer_of = {id(module): layer for layer, module in enumerate(model.points.attention_modules())}
    wrapped = ALL_ATTENTION_FUNCTIONS[ATTENTION_IMPLEMENTATION]

    def tapped(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        softcap: float | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output, pattern = wrapped(
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            softcap=softcap,
            **kwargs,
        )
        if id(module) not in layer_of:
            return output, pattern
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        call = AttentionCall(
            layer_of[id(module)], query, key, value, pattern, output, attention_mask, scaling, softcap
        )
        replaced = tap(call)
        return (output if replaced is None else replaced), pattern

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, tapped)
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, wrapped)


@dataclass
class HeadLoadings:
    """The chosen edges of a graph split over the attention heads of their last position-changing step.

    Per-edge arrays (``edges``, ``weight``, ``remainder``) follow the order the edges were given in. The
    per-loading arrays (``edge``, ``layer``, ``head``, ``key_position``, ``value``) have one entry per edge
    and head (and key position) that can carry it: layers above the source's and up to the target's.
    """

    edges: np.ndarray
    """Indices of the split edges into the graph's ``indices`` and ``weights``."""
    weight: np.ndarray
    """Each edge's weight as the graph stores it."""
    remainder: np.ndarray
    """Each edge's weight minus the sum of its loadings: zero up to rounding (and the float32 storage of a
    float32 graph), unless ``heads`` left some heads out."""
    edge: np.ndarray
    """Per loading: the index of its edge in the graph."""
    layer: np.ndarray
    """Per loading: the layer of the head."""
    head: np.ndarray
    """Per loading: the head (query head, for grouped-query attention)."""
    key_position: np.ndarray
    """Per loading: the position the head reads at the crossing step, or -1 for the sum over positions."""
    value: np.ndarray
    """Per loading: the part of the edge weight carried (float64)."""
    n_layers: int
    """Layers of the model."""
    n_heads: int
    """Query heads per layer."""

    def matrix(self, edge: int) -> np.ndarray:
        """Loadings of graph edge ``edge`` as a ``[n_layers, n_heads]`` array (summed over key positions)."""
        if edge not in self.edges:
            raise CircuitmapError(f"edge {edge} is not among the split edges")
        mine = self.edge == edge
        matrix = np.zeros((self.n_layers, self.n_heads))
        np.add.at(matrix, (self.layer[mine], self.head[mine]), self.value[mine])
        return matrix


def edge_targets(graph: Graph, edges: np.ndarray) -> np.ndarray:
    """The target node (row) of each edge."""
    return np.searchsorted(graph.indptr, edges, side="right") - 1


def top_cross_position_edges(graph: Graph, k: int, by: str = "weight") -> np.ndarray:
    """The ``k`` nonzero edges whose source and target sit at different positions, largest first: by
    ``|weight|``, or by ``influence`` (the pruning score: normalised weight times the target's influence)."""
    if by not in EDGE_ORDERS:
        raise CircuitmapError(f"edges are ordered by {' or '.join(EDGE_ORDERS)}, not {by!r}")
    if k < 1:
        raise CircuitmapError(f"k must be at least 1, got {k}")
    all_edges = np.arange(graph.n_edges)
    crossing = graph.position[edge_targets(graph, all_edges)] != graph.position[graph.indices]
    scores = np.abs(graph.weights.astype(np.float64))
    if by == "influence":
        scores = normalized_weights(graph) * node_influence(graph)[graph.target_indices()]
    candidates = all_edges[crossing & (graph.weights != 0)]
    order = np.argsort(-scores[candidates], kind="stable")
    return candidates[order[:k]]


def graph_ids(model: Model, transcoders: Transcoders, graph: Graph) -> torch.Tensor:
    """The graph's prompt as token ids ``[1, T]`` on the model's device, once the graph is known to come
    from a model of this depth and from this transcoder set (when it recorded the set's fingerprint)."""
    if graph.n_layers != model.n_layers:
        raise CircuitmapError(f"the graph has {graph.n_layers} layers but the model has {model.n_layers}")
    transcoders.check_fingerprint(graph.info.get("transcoders_fingerprint"), "the graph")
    return model.encode(torch.tensor([graph.tokens]))


def graph_first_position(graph: Graph) -> int:
    """The first position that has feature and error nodes in ``graph``."""
    return int(graph.info.get("first_position", FIRST_POSITION))


def graph_features(
    run: ReplacementRun, transcoders: Transcoders, graph: Graph, first_position: int
) -> tuple[ActiveFeatures, torch.Tensor]:
    """The run's active features from ``first_position`` on, and which of them stand as nodes: the graph's
    features, and every feature before the graph's first position (the graph has no nodes there). The others
    fold into the error node of their layer and position, as in the graph."""
    features = active_features(run, first_position)
    n_tokens = run.embed.shape[1]

    def keys(layer, position, index) -> np.ndarray:
        return (np.asarray(layer, dtype=np.int64) * n_tokens + position) * transcoders.d_features + index

    nodes = graph.nodes_of(NodeKind.FEATURE)
    graph_keys = keys(graph.layer[nodes], graph.position[nodes], graph.index[nodes])
    active_keys = keys(features.layer.numpy(), features.position.numpy(), features.index.numpy())
    if not np.isin(graph_keys, active_keys).all():
        raise CircuitmapError(
            "some of the graph's features are not active on its prompt: it was computed with another model "
            "or transcoder set"
        )
    in_graph = np.isin(active_keys, graph_keys) | (features.position.numpy() < graph_first_position(graph))
    return features, torch.from_numpy(in_graph)


def _target_specs(
    model: Model,
    transcoders: Transcoders,
    graph: Graph,
    run: ReplacementRun,
    nodes: np.ndarray,
    targets: Sequence[TargetSpec] | TargetSpec | None,
) -> RowSpec:
    """Read-out rows of the given graph nodes: feature encoder rows, or target vectors (a single-token target
    is its de-meaned logit; other targets are found by name among ``targets``)."""
    given = {}
    if targets is not None:
        given = {target.name: target for target in resolve_targets(model, run.last_logits, targets)}
    target_nodes = graph.nodes_of(NodeKind.TARGET)
    points, vectors = [], []
    for node in nodes.tolist():
        if graph.kind[node] == NodeKind.FEATURE:
            points.append("mlp_in")
            vectors.append(
                transcoders.encoder_vectors(int(graph.layer[node]), torch.tensor([graph.index[node]]))[0]
            )
            continue
        name = graph.target_names[node - int(target_nodes[0])]
        if graph.index[node] >= 0:
            target = resolve_targets(model, run.last_logits, [int(graph.index[node])])[0]
        elif name in given:
            target = given[name]
        else:
            raise CircuitmapError(
                f"target {name!r} is not a single-token logit: pass the targets the graph was computed with"
            )
        points.append(target.point)
        vectors.append(target.vector)
    return RowSpec(
        points,
        torch.from_numpy(graph.layer[nodes].astype(np.int64)),
        torch.from_numpy(graph.position[nodes].astype(np.int64)),
        torch.stack([vector.to(run.embed) for vector in vectors]),
    )


def _injection(
    run: ReplacementRun, spec: RowSpec, rows: slice
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors that rows ``rows`` of ``spec`` read, and batched gradients that inject their vectors."""
    batch = rows.stop - rows.start
    groups: dict[tuple[str, int], list[int]] = {}
    for row, (point, layer) in enumerate(zip(spec.point[rows], spec.layer[rows].tolist(), strict=True)):
        groups.setdefault((point, layer if point == "mlp_in" else -1), []).append(row)
    outputs, grads = [], []
    for (point, layer), members in groups.items():
        tensor = run.mlp_in[layer] if point == "mlp_in" else run.readouts[point]
        grad = torch.zeros(batch, *tensor.shape, dtype=tensor.dtype, device=tensor.device)
        index = torch.tensor(members)
        vectors = spec.vectors[rows][index].to(grad)
        grad[index.to(grad.device), 0, spec.position[rows][index].to(grad.device)] = vectors
        outputs.append(tensor)
        grads.append(grad)
    return outputs, grads


def _source_values(gradients: Sequence[torch.Tensor | None], sources: Sources, n_rows: int) -> torch.Tensor:
    """Direct effects [n_rows, n_columns] of every source, from the gradients at the MLP outputs (all but
    the last entry, by layer) and at the embedding (the last entry)."""
    embed = sources.embed
    values = torch.zeros(n_rows, sources.n_columns, dtype=embed.dtype, device=embed.device)
    for out_layer, gradient in enumerate(gradients[:-1]):
        if gradient is None:
            continue
        for position, columns, vectors in sources.writes[out_layer]:
            values.index_add_(1, columns, (gradient[:, 0, position] @ vectors.T).to(values.device))
    if gradients[-1] is not None:
        n_written = sources.n_features + sources.n_errors
        values[:, n_written:] = torch.einsum("btd,td->bt", gradients[-1][:, 0], embed)
    return values


def _same_position_tap(outputs: dict[int, torch.Tensor]) -> AttentionTap:
    """A tap that leaves head outputs' values alone but lets gradients through the pattern's diagonal only;
    it keeps each layer's head outputs in ``outputs``."""

    def tap(call: AttentionCall) -> torch.Tensor | None:
        if not torch.is_grad_enabled():
            return None
        n_rep = call.query.shape[1] // call.value.shape[1]
        diagonal = call.pattern[0].diagonal(dim1=-2, dim2=-1)
        values = call.value[0].repeat_interleave(n_rep, dim=0)
        same_position = (diagonal[..., None] * values).transpose(0, 1).unsqueeze(0)
        output = call.output.detach() + (same_position - same_position.detach())
        outputs[call.layer] = output
        return output

    return tap


def _recording_tap(calls: dict[int, AttentionCall]) -> AttentionTap:
    """A tap that keeps each layer's attention call (of the pass with gradients) in ``calls``."""

    def tap(call: AttentionCall) -> None:
        if torch.is_grad_enabled():
            calls[call.layer] = call

    return tap


def _same_position_gradients(
    model: Model,
    transcoders: Transcoders,
    graph: Graph,
    ids: torch.Tensor,
    nodes: np.ndarray,
    targets: Sequence[TargetSpec] | TargetSpec | None,
    batch_size: int,
) -> torch.Tensor:
    """``γ`` [n_nodes, n_layers, n_heads, d_head]: the gradient of each node's read-out with respect to the
    head outputs at its position, along paths that never leave that position."""
    outputs: dict[int, torch.Tensor] = {}
    with attention_tap(model, _same_position_tap(outputs)), replacement_run(model, transcoders, ids) as run:
        spec = _target_specs(model, transcoders, graph, run, nodes, targets)
        layers = sorted(outputs)
        gammas = torch.zeros(
            len(spec),
            model.n_layers,
            *outputs[layers[0]].shape[2:],
            dtype=run.embed.dtype,
            device=run.embed.device,
        )
        for start in range(0, len(spec), batch_size):
            rows = slice(start, min(start + batch_size, len(spec)))
            injected, grads = _injection(run, spec, rows)
            gradients = torch.autograd.grad(
                injected,
                [outputs[layer] for layer in layers],
                grads,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
            batch = torch.arange(rows.stop - rows.start, device=gammas.device)
            positions = spec.position[rows].to(gammas.device)
            for layer, gradient in zip(layers, gradients, strict=True):
                if gradient is not None:
                    gammas[rows, layer] = gradient[batch, 0, positions].detach()
    return gammas


@dataclass
class _CrossingRows:
    """Rows of step 2: per row, the target node's rank, the head's layer and index, and the key position
    (-1: every position before the target's)."""

    target: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    key_position: np.ndarray

    def __len__(self) -> int:
        return len(self.target)


def _crossing_rows(
    graph: Graph,
    nodes: np.ndarray,
    edge_target: np.ndarray,
    edge_source: np.ndarray,
    heads: np.ndarray,
    split_key_positions: bool,
) -> _CrossingRows:
    """Every (target, layer, head[, key position]) that can carry one of the edges: layers above the lowest
    source and up to the target (a feature reads its own layer's attention), key positions from the lowest
    source position up to the target's."""
    parts = []
    for rank, node in enumerate(nodes.tolist()):
        sources = edge_source[edge_target == node]
        top = int(graph.layer[node]) if graph.kind[node] == NodeKind.FEATURE else graph.n_layers - 1
        low = int(graph.layer[sources].min()) + 1
        keys = (
            np.arange(int(graph.position[sources].min()), int(graph.position[node]))
            if split_key_positions
            else np.array([-1])
        )
        chosen = heads[(heads[:, 0] >= low) & (heads[:, 0] <= top)]
        layer = np.repeat(chosen[:, 0], len(keys))
        head = np.repeat(chosen[:, 1], len(keys))
        parts.append((np.full(len(layer), rank), layer, head, np.tile(keys, len(chosen))))
    return _CrossingRows(*(np.concatenate(column).astype(np.int64) for column in zip(*parts, strict=True)))


def _crossing_values(
    run: ReplacementRun,
    calls: dict[int, AttentionCall],
    sources: Sources,
    rows: _CrossingRows,
    positions: np.ndarray,
    gammas: torch.Tensor,
    columns: torch.Tensor,
    batch_size: int,
) -> np.ndarray:
    """Loadings [n_rows, n_columns chosen] of the sources ``columns`` for every crossing row."""
    collected = np.zeros((len(rows), len(columns)))
    embed = run.embed
    for start in range(0, len(rows), batch_size):
        stop = min(start + batch_size, len(rows))
        layers = sorted(set(rows.layer[start:stop].tolist()))
        grads = {
            layer: torch.zeros(
                stop - start, *calls[layer].value.shape, dtype=embed.dtype, device=embed.device
            )
            for layer in layers
        }
        for offset, row in enumerate(range(start, stop)):
            layer, head = int(rows.layer[row]), int(rows.head[row])
            target_position = int(positions[rows.target[row]])
            call = calls[layer]
            group = head // (call.query.shape[1] // call.value.shape[1])
            weights = call.pattern[0, head, target_position].detach().to(embed.dtype)
            key = int(rows.key_position[row])
            keep = torch.zeros_like(weights, dtype=torch.bool)
            if key < 0:
                keep[:target_position] = True
            else:
                keep[key] = True
            gamma = gammas[rows.target[row], layer, head]
            grads[layer][offset, 0, group] = (weights * keep)[:, None] * gamma[None, :]
        depth = max(layers)
        gradients = torch.autograd.grad(
            [calls[layer].value for layer in layers],
            [*run.leaves[:depth], embed],
            [grads[layer] for layer in layers],
            retain_graph=True,
            is_grads_batched=True,
            allow_unused=True,
        )
        gradients = [*gradients[:-1], *([None] * (len(run.leaves) - depth)), gradients[-1]]
        values = _source_values(gradients, sources, stop - start)
        collected[start:stop] = values[:, columns.to(values.device)].detach().double().cpu().numpy()
    return collected


def _checked_edges(graph: Graph, edges: Sequence[int] | np.ndarray) -> np.ndarray:
    """The edge indices as an int64 array; a one-line error for an empty list, an index out of range or given
    twice, or an edge whose ends sit at the same position."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1)
    if edges.size == 0:
        raise CircuitmapError("no edges given")
    values, counts = np.unique(edges, return_counts=True)
    if (counts > 1).any():
        raise CircuitmapError(f"edge {int(values[counts > 1][0])} is given twice")
    outside = edges[(edges < 0) | (edges >= graph.n_edges)]
    if outside.size:
        raise CircuitmapError(
            f"edge index {int(outside[0])} is out of range: the graph has {graph.n_edges} edges"
        )
    targets, sources = edge_targets(graph, edges), graph.indices[edges].astype(np.int64)
    same = np.flatnonzero(graph.position[targets] == graph.position[sources])
    if same.size:
        target, source = int(targets[same[0]]), int(sources[same[0]])
        raise CircuitmapError(
            f"edge {graph.node_id(source)} → {graph.node_id(target)} is not cross-position: both nodes sit "
            f"at position {int(graph.position[target])}"
        )
    return edges


def _checked_heads(heads: Sequence[tuple[int, int]] | None, n_layers: int, n_heads: int) -> np.ndarray:
    """The (layer, head) pairs to consider as an int64 array [n, 2] (None: every head)."""
    if heads is None:
        return np.array(
            [(layer, head) for layer in range(n_layers) for head in range(n_heads)], dtype=np.int64
        )
    chosen = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    for layer, head in chosen.tolist():
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise CircuitmapError(
                f"head ({layer}, {head}) is out of range: the model has {n_layers} layers of {n_heads} heads"
            )
    return chosen


def n_attention_heads(model: Model) -> int:
    """Query heads per layer."""
    return int(model.hf_model.config.get_text_config().num_attention_heads)


def head_loadings(
    model: Model,
    transcoders: Transcoders,
    graph: Graph,
    edges: Sequence[int] | np.ndarray,
    *,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    split_key_positions: bool = False,
    batch_size: int | None = None,
) -> HeadLoadings:
    """Split each of ``edges`` (indices into the graph's edge arrays, source and target at different
    positions) over the attention heads of its last position-changing step.

    ``targets``: the targets the graph was computed with, needed only for targets that are not single-token
    logits. ``heads``: (layer, head) pairs to compute (None: all; the others' loadings are left out, so the
    remainder then holds them). ``split_key_positions``: split each loading by the position the head reads.
    The graph must come from this model and transcoder set; the transcoders are moved to the model's device
    and dtype.
    """
    edges = _checked_edges(graph, edges)
    n_heads = n_attention_heads(model)
    chosen_heads = _checked_heads(heads, model.n_layers, n_heads)
    ids = graph_ids(model, transcoders, graph)
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    batch_size = batch_size or _rows_per_batch(model, ids.shape[1])
    edge_target = edge_targets(graph, edges)
    edge_source = graph.indices[edges].astype(np.int64)
    nodes = np.unique(edge_target)
    rows = _crossing_rows(graph, nodes, edge_target, edge_source, chosen_heads, split_key_positions)
    gammas = _same_position_gradients(model, transcoders, graph, ids, nodes, targets, batch_size)
    calls: dict[int, AttentionCall] = {}
    first_position = graph_first_position(graph)
    with attention_tap(model, _recording_tap(calls)), replacement_run(model, transcoders, ids) as run:
        features, kept = graph_features(run, transcoders, graph, first_position)
        sources = build_sources(run, transcoders, features, kept, first_position)
        columns = np.unique(edge_source)
        collected = _crossing_values(
            run, calls, sources, rows, graph.position[nodes], gammas, torch.from_numpy(columns), batch_size
        )
    parts, totals = [], []
    for edge, target, source in zip(edges.tolist(), edge_target.tolist(), edge_source.tolist(), strict=True):
        mine = (nodes[rows.target] == target) & (rows.layer > graph.layer[source])
        mine &= (rows.key_position < 0) | (rows.key_position >= graph.position[source])
        found = np.flatnonzero(mine)
        values = collected[found, np.searchsorted(columns, source)]
        parts.append(
            (np.full(len(found), edge), rows.layer[found], rows.head[found], rows.key_position[found], values)
        )
        totals.append(values.sum())
    edge_of, layer, head, key_position, value = (
        np.concatenate(column) for column in zip(*parts, strict=True)
    )
    weight = graph.weights[edges].astype(np.float64)
    return HeadLoadings(
        edges=edges,
        weight=weight,
        remainder=weight - np.array(totals),
        edge=edge_of,
        layer=layer,
        head=head,
        key_position=key_position,
        value=value,
        n_layers=model.n_layers,
        n_heads=n_heads,
    )

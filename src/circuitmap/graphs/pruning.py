"""Influence, pruning, and the replacement and completeness scores of an attribution graph.

Everything here works on the graph's CSR edges with NumPy vector operations, a block of rows at a time: no
dense ``n_nodes × n_nodes`` matrix and no per-edge float64 array of the whole graph is ever built, and the
only sorts are over node or edge scores, so 10M edges prune in seconds.

Definitions:

- **Normalised weights** ``Â``: ``|A|`` with each target row scaled to sum to 1 over the row's incoming edges
  (a row whose weights are all zero stays zero). ``Â[t, s]`` is the share of ``t``'s input due to ``s``.
- **Influence** on the targets: ``w·(Â + Â² + Â³ + …)`` with ``w`` the targets' weights, plus each target's
  own weight. Where rows are listed by layer (as attribution writes them) it is one sweep from the last rows
  to the first, each row passing on its complete influence; otherwise it is repeated vector–matrix products
  ``x ← x·Â`` starting from ``x = w``: the graph is a DAG, so ``x`` becomes zero after at most ``n_nodes``
  steps (more means a cycle: an error). Either way the edges are read in blocks of rows. Influence is
  mass flowing from the targets down to tokens and error nodes, split at each node by its row of ``Â``.
- **Node pruning**: features and error nodes are candidates; sorted by influence (descending, ties in graph
  order), the smallest prefix whose cumulative influence reaches ``node_threshold`` × their total is kept;
  token and target nodes are always kept. Equivalently, the largest tail of least influential candidates whose
  influence sums to at most ``(1 − node_threshold)`` × total is dropped: that form is what is computed, as it
  sums small values first and makes a threshold of 1 keep exactly the candidates with positive influence.
- **Edge pruning**: among edges whose two ends survived node pruning, each edge ``s → t`` scores
  ``Â[t, s] × influence(t)``; the smallest set of highest-scored edges whose scores reach ``edge_threshold`` ×
  their total is kept (same tail rule). Then, until nothing changes, features and error nodes with no kept
  outgoing edge and features with no kept incoming edge are dropped, with the edges touching them. Tokens and
  targets stay. Raising ``edge_threshold`` only ever adds nodes and edges, and so does raising
  ``node_threshold`` when ``edge_threshold`` is 1; otherwise a larger node set can change which edges make the
  cut, so the result need not grow.
- **Kept structure**: a node mask and an edge mask; an edge is live only if it and both its ends are kept.
  Tokens and targets always count as kept. ``Â`` stays normalised over *all* of a row's edges, so the share
  of a row carried by edges that are not live is mass lost to error.
- **Replacement score**: propagate influence from the targets over live edges only. Mass ends at token nodes
  (explained by the input), at kept error nodes, or is lost at a kept feature or target: the part of its row
  not carried by live edges, which is all of it for a row with no incoming weight. Replacement = token mass /
  (token mass + error mass + lost mass). In the unpruned graph every feature normally has inputs, so nothing
  is lost and it is token mass / (token + error mass); a feature whose row is all zero absorbs its mass as
  lost.
- **Completeness score**: over kept nodes ``t`` with incoming weight (features and targets whose row is not
  all zero), ``Σ infl(t) · c(t) / Σ infl(t)``, where ``c(t)`` is the share of ``t``'s normalised input that
  comes through live edges from non-error sources and ``infl`` is the influence over live edges (a target's is
  its weight). It measures how much of the kept nodes' inputs the kept graph explains without error nodes.
- **Subgraph**: the user's kept nodes, the members of their supernodes, tokens and targets form the node mask;
  the edges between those nodes form the edge mask; everything left out counts as error (mass lost).

Either score is NaN when its denominator is zero (no target weight; no influential node with inputs).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import index_by_id
from circuitmap.validation import check_number


@dataclass(frozen=True)
class PruneConfig(Settings):
    """How much of a graph pruning keeps (see the module docstring)."""

    node_threshold: float = 0.8
    """Share of the feature and error nodes' influence on the targets the kept ones carry, in (0, 1]."""
    edge_threshold: float = 0.98
    """Share of the influence-weighted flow among the kept nodes that the kept edges carry, in (0, 1]."""
    document_links: int = 40_000
    """Most links a viewer document lists (the strongest kept edges; the explorer fetches the rest)."""

    def check(self) -> None:
        """Thresholds are cumulative fractions: in (0, 1]; the link budget is a positive integer."""
        check_number("node_threshold", self.node_threshold, low=0, high=1, low_open=True)
        check_number("edge_threshold", self.edge_threshold, low=0, high=1, low_open=True)
        check_number("document_links", self.document_links, low=1, whole=True)


@dataclass
class PruneResult:
    """What ``prune`` keeps, and the full graph's influence it was decided from."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    influence: np.ndarray


@dataclass
class Scores:
    """Replacement and completeness scores of a graph or of a kept part of it (see the module docstring)."""

    replacement: float
    completeness: float

    def as_json(self) -> dict:
        """Both scores as JSON numbers; an undefined (NaN) score becomes null."""
        return {
            "replacement": self.replacement if math.isfinite(self.replacement) else None,
            "completeness": self.completeness if math.isfinite(self.completeness) else None,
        }


def normalized_weights(graph: Graph) -> np.ndarray:
    """``Â``: ``|A|`` with each row scaled to sum to 1 (zero rows stay zero), aligned with the edges."""
    return np.concatenate([np.zeros(0), *(chunk.flow for chunk in _Flow(graph).chunks())])


def input_totals(graph: Graph) -> np.ndarray:
    """Each node's total incoming ``|A|`` (float64 ``[n_nodes]``; zero for nodes without inputs)."""
    return _Flow(graph).row_totals


def node_influence(graph: Graph, edge_mask: np.ndarray | None = None) -> np.ndarray:
    """Influence of every node on the targets (float64 ``[n_nodes]``); targets get their own weight.

    With ``edge_mask``, only the masked-in edges carry influence; ``Â`` is still normalised over all edges.
    """
    if edge_mask is not None:
        edge_mask = _checked_mask(edge_mask, graph.n_edges, "edge_mask")
    return _propagate(_Flow(graph, edge_mask=edge_mask), _start(graph))


def prune(
    graph: Graph,
    config: PruneConfig | None = None,
    *,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the targets (see the module docstring).

    Thresholds come from ``config`` (default ``PruneConfig()``); keywords given override it.
    """
    config = (config or PruneConfig()).with_changes(
        node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    config.check()
    node_threshold, edge_threshold = config.node_threshold, config.edge_threshold
    influence = _propagate(_Flow(graph), _start(graph))

    node_mask = _always_kept(graph)
    candidates = np.flatnonzero(~node_mask)
    node_mask[candidates[_top_share(influence[candidates], node_threshold)]] = True

    live = list(_Flow(graph, kept=node_mask).chunks())
    edge_ids = np.concatenate([np.zeros(0, dtype=np.int64), *(chunk.edge_ids for chunk in live)])
    rows = np.concatenate([np.zeros(0, dtype=np.intp), *(chunk.rows for chunk in live)])
    sources = np.concatenate([np.zeros(0, dtype=np.intp), *(chunk.sources for chunk in live)])
    scores = np.concatenate([np.zeros(0), *(chunk.flow * influence[chunk.rows] for chunk in live)])
    del live
    top = _top_share(scores, edge_threshold)
    node_mask, edge_ids = _drop_dangling(graph, node_mask, edge_ids[top], rows[top], sources[top])

    edge_mask = np.zeros(graph.n_edges, dtype=bool)
    edge_mask[edge_ids] = True
    return PruneResult(node_mask=node_mask, edge_mask=edge_mask, influence=influence)


def graph_scores(
    graph: Graph, node_mask: np.ndarray | None = None, edge_mask: np.ndarray | None = None
) -> Scores:
    """Replacement and completeness of the kept structure (all of the graph by default).

    Tokens and targets count as kept whatever ``node_mask`` says; an edge counts only if it and both its ends
    are kept.
    """
    kept = np.ones(graph.n_nodes, dtype=bool)
    if node_mask is not None:
        kept = _checked_mask(node_mask, graph.n_nodes, "node_mask").copy()
    kept |= _always_kept(graph)
    if edge_mask is not None:
        edge_mask = _checked_mask(edge_mask, graph.n_edges, "edge_mask")
    return _live_scores(graph, kept, _Flow(graph, kept=kept, edge_mask=edge_mask))


def subgraph_scores(
    graph: Graph, kept: Iterable[int | str], supernodes: Iterable[Iterable[int | str]] = ()
) -> Scores:
    """Scores of a user's subgraph: ``kept`` nodes and supernode members (indices or node ids), tokens and
    targets, with the edges between them; everything else counts as error.

    Equal to ``graph_scores`` with those masks, but it reads only the kept nodes' rows of the CSR edges, so
    it answers in milliseconds on graphs of hundreds of millions of edges.
    """
    members = [*kept, *(member for group in supernodes for member in group)]
    node_mask = _always_kept(graph)
    node_mask[_node_indices(graph, members)] = True
    return _live_scores(graph, node_mask, _Flow(graph, kept=node_mask, rows=np.flatnonzero(node_mask)))


def _live_scores(graph: Graph, kept: np.ndarray, flow: _Flow) -> Scores:
    """Both scores from the live edges of ``flow`` and each kept node's total incoming ``|A|`` (see the module
    docstring)."""
    influence = _propagate(flow, _start(graph))
    kind = graph.kind
    live_share = np.zeros(graph.n_nodes)
    clean_share = np.zeros(graph.n_nodes)
    for chunk in flow.chunks():
        live_share += np.bincount(chunk.rows, weights=chunk.flow, minlength=graph.n_nodes)
        clean = chunk.flow * (kind[chunk.sources] != NodeKind.ERROR)
        clean_share += np.bincount(chunk.rows, weights=clean, minlength=graph.n_nodes)

    token_mass = influence[kind == NodeKind.TOKEN].sum()
    error_mass = influence[kind == NodeKind.ERROR].sum()
    absorbing = (kind == NodeKind.FEATURE) | (kind == NodeKind.TARGET)
    lost_mass = (influence[absorbing] * (1.0 - live_share[absorbing])).sum()
    with_input = kept & (flow.row_totals > 0)
    return Scores(
        replacement=_ratio(token_mass, token_mass + error_mass + lost_mass),
        completeness=_ratio(
            (influence[with_input] * clean_share[with_input]).sum(), influence[with_input].sum()
        ),
    )


@dataclass
class _Chunk:
    """The live edges of one block of rows: row, source, ``Â`` and position in the graph's edge arrays of
    each; ``first_row`` is the block's lowest row."""

    rows: np.ndarray
    sources: np.ndarray
    flow: np.ndarray
    edge_ids: np.ndarray
    first_row: int


class _Flow:
    """``Â`` read from the CSR edges one block of rows at a time (``Graph.row_blocks``), so that no per-edge
    array of the whole graph is held.

    ``rows`` (sorted) limits the blocks to those rows; ``kept`` and ``edge_mask`` limit the edges to the live
    ones, while every row stays normalised over all of its edges (``row_totals``: each row's total ``|A|``).
    """

    def __init__(
        self,
        graph: Graph,
        kept: np.ndarray | None = None,
        edge_mask: np.ndarray | None = None,
        rows: np.ndarray | None = None,
    ):
        self.graph, self.kept, self.edge_mask = graph, kept, edge_mask
        self.has_row = np.diff(graph.indptr) > 0
        candidates = np.flatnonzero(self.has_row) if rows is None else rows[self.has_row[rows]]
        self.blocks = graph.row_blocks(candidates)
        self.row_totals = np.zeros(graph.n_nodes)
        for block in self.blocks:
            block_rows, positions = graph.block_edges(block)
            magnitude = np.abs(graph.weights[positions])
            self.row_totals[block] = np.bincount(
                block_rows - block[0], weights=magnitude, minlength=int(block[-1] - block[0]) + 1
            )[block - block[0]]

    def chunks(self, descending: bool = False) -> Iterator[_Chunk]:
        """The live edges block by block, in the graph's row order or (``descending``) the reverse."""
        graph = self.graph
        for block in reversed(self.blocks) if descending else self.blocks:
            rows, positions = graph.block_edges(block)
            sources = graph.indices[positions].astype(np.intp)
            magnitude = np.abs(graph.weights[positions]).astype(np.float64)
            totals = self.row_totals[rows]
            flow = np.divide(magnitude, totals, out=np.zeros_like(magnitude), where=totals > 0)
            edge_ids = (
                np.arange(positions.start, positions.stop) if isinstance(positions, slice) else positions
            )
            live = None
            if self.kept is not None:
                live = self.kept[rows] & self.kept[sources]
            if self.edge_mask is not None:
                in_mask = self.edge_mask[positions]
                live = in_mask if live is None else live & in_mask
            if live is not None:
                rows, sources, flow, edge_ids = rows[live], sources[live], flow[live], edge_ids[live]
            yield _Chunk(rows, sources, flow, edge_ids, int(block[0]))


def _start(graph: Graph) -> np.ndarray:
    """The influence vector the propagation starts from: the targets' weights, zero elsewhere."""
    return np.asarray(graph.target_weight, dtype=np.float64)


def _propagate(flow: _Flow, start: np.ndarray) -> np.ndarray:
    """``start·(I + Â + Â² + …)`` over the live edges of ``flow``.

    Where every live edge reads a source that has no row, or whose row lies in an earlier block (rows listed
    by layer, as attribution writes them), one sweep over the blocks from the last to the first suffices: a
    block's influence is complete before it is passed on. Otherwise it is computed as repeated sparse
    vector–matrix products until a term is zero. In a DAG the k-th term is zero once k exceeds the longest
    path, so ``n_nodes + 1`` steps always suffice (an empty graph included); a term still nonzero after that
    means the edges contain a cycle.
    """
    n_nodes = len(start)
    total = start.copy()
    for chunk in flow.chunks(descending=True):
        if (flow.has_row[chunk.sources] & (chunk.sources >= chunk.first_row)).any():
            break
        total += np.bincount(chunk.sources, weights=total[chunk.rows] * chunk.flow, minlength=n_nodes)
    else:
        return total
    total = start.copy()
    term = start
    for _ in range(n_nodes + 1):
        following = np.zeros(n_nodes)
        for chunk in flow.chunks():
            following += np.bincount(chunk.sources, weights=term[chunk.rows] * chunk.flow, minlength=n_nodes)
        term = following
        if not term.any():
            return total
        total += term
    raise CircuitmapError(
        f"influence did not vanish after {n_nodes} steps: the graph's edges contain a cycle"
    )


def _top_share(values: np.ndarray, fraction: float) -> np.ndarray:
    """Positions of the largest ``values`` (ties: earlier first) whose sum reaches ``fraction`` of the total.

    Computed as the complement of the largest tail of smallest values summing to at most ``(1 − fraction)`` of
    the total: small values are summed first, and ``fraction == 1`` drops exactly the zero values.
    """
    order = np.argsort(-values, kind="stable")
    tail_sums = np.cumsum(values[order[::-1]])
    n_drop = int(np.searchsorted(tail_sums, (1.0 - fraction) * values.sum(), side="right"))
    return order[: len(order) - n_drop]


def _drop_dangling(
    graph: Graph,
    node_mask: np.ndarray,
    edge_ids: np.ndarray,
    kept_rows: np.ndarray,
    kept_sources: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Repeatedly drop features and errors without a kept outgoing edge and features without a kept incoming
    edge, with the edges touching them, until none is left; returns the new node mask and kept edge ids.
    ``kept_rows`` and ``kept_sources`` are the ends of the edges ``edge_ids``."""
    node_mask = node_mask.copy()
    need_output = (graph.kind == NodeKind.FEATURE) | (graph.kind == NodeKind.ERROR)
    need_input = graph.kind == NodeKind.FEATURE
    while True:
        has_output = np.bincount(kept_sources, minlength=graph.n_nodes) > 0
        has_input = np.bincount(kept_rows, minlength=graph.n_nodes) > 0
        drop = node_mask & ((need_output & ~has_output) | (need_input & ~has_input))
        if not drop.any():
            return node_mask, edge_ids
        node_mask &= ~drop
        keep = node_mask[kept_rows] & node_mask[kept_sources]
        edge_ids, kept_rows, kept_sources = edge_ids[keep], kept_rows[keep], kept_sources[keep]


def _always_kept(graph: Graph) -> np.ndarray:
    """Mask of the token and target nodes, which pruning and subgraphs always keep."""
    return (graph.kind == NodeKind.TOKEN) | (graph.kind == NodeKind.TARGET)


def _node_indices(graph: Graph, nodes: list[int | str]) -> np.ndarray:
    """Node indices for a list of indices and node ids; unknown ids and out-of-range indices are errors."""
    by_id = index_by_id(graph) if any(isinstance(node, str) for node in nodes) else {}
    indices = []
    for node in nodes:
        if isinstance(node, str):
            if node not in by_id:
                raise CircuitmapError(f"unknown node id {node!r}")
            indices.append(by_id[node])
        else:
            index = operator.index(node)
            if not 0 <= index < graph.n_nodes:
                raise CircuitmapError(f"node index {index} out of range: graph has {graph.n_nodes} nodes")
            indices.append(index)
    return np.asarray(indices, dtype=np.intp)


def _checked_mask(mask: np.ndarray, length: int, name: str) -> np.ndarray:
    """``mask`` as an array, if it is a bool vector of ``length`` entries."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != (length,):
        raise CircuitmapError(f"{name} must be bool of length {length}, not {mask.dtype} {mask.shape}")
    return mask


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` as a float, NaN when the denominator is zero."""
    return float(numerator / denominator) if denominator > 0 else float("nan")

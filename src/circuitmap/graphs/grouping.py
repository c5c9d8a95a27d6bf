"""Automatic supernodes: the pruned graph's features grouped into a few named units that act as one.

1. **Effects.** For the heaviest target ``T``, every feature's signed effect on it through the whole graph,
   as the graph's own linear model predicts it: ``effect[s] = A[T, s] + Σ_t A[t, s] · effect[t] / a[t]``
   over the features ``t`` that ``s`` feeds (``a``: activations), one pass in reverse graph order (sources
   come before their targets). Ablating ``s`` alone changes ``T`` by ``−effect[s]`` in that model.
2. **Roles.** A kept feature's role is two vectors over the kept nodes: what it does (``A[t, s] ·
   effect[t] / a[t]`` for each kept feature ``t`` it feeds, and ``A[T, s]`` for the target: how its effect
   flows) and what drives it (``A[s, u]`` for each kept source ``u``), each scaled to unit length.
3. **Distance** between two kept features: one minus the mean cosine similarity of their two roles, plus
   their layer gap over the number of layers. Features at different positions, or whose effects have
   opposite signs, are never grouped: clustering runs separately on each (position, sign) block.
4. **Groups**: average-linkage clustering of each block, cut at distance ``cut``. Groups are ranked by their
   members' summed influence and the ``max_groups`` first are kept; the rest of the features stay ungrouped.
   Each group is named from its members' labels, weighted by influence (the dominant label, or the two
   heaviest joined by " / " when none holds half the weight); unlabelled groups are named by layers and
   token.

A grouping is a hypothesis: ``circuitmap.interventions.check_graph`` with the groups as supernodes tests it
against the model (``benchmarks/grouping.py`` does, against random groupings of the same sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import csr_matrix

from circuitmap.errors import CircuitmapError
from circuitmap.graphs import pruning
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import node_ids
from circuitmap.validation import check_number

MAX_GROUPS = 30
CUT = 0.3
"""The clustering's distance threshold: tighter groups agreed better with ablations than looser ones on
the graphs of ``benchmarks/grouping.py`` (at the price of covering less of the influence)."""


@dataclass
class FeatureGroup:
    """One automatic supernode."""

    name: str
    """Named from the members' labels (see the module docstring)."""
    members: list[str]
    """Feature node ids, most influential first."""
    position: int
    """The token position all members sit at."""
    layers: tuple[int, int]
    """Lowest and highest member layer."""
    influence: float
    """The members' summed influence on the targets."""
    sign: int
    """+1 if the members raise the top target (their ablation lowers it), -1 if they lower it."""

    def as_supernode(self) -> list[str]:
        """The ``[label, id, …]`` form of a saved supernode."""
        return [self.name, *self.members]


@dataclass
class Grouping:
    """The groups of one graph, and the share of the kept features' influence they hold."""

    groups: list[FeatureGroup]
    coverage: float
    """Influence of the grouped features over that of all kept features (NaN without kept features)."""
    n_features: int
    """Kept feature nodes the grouping started from."""


def feature_effects(graph: Graph, target: int | None = None) -> np.ndarray:
    """Signed effect of every feature node on the ``target`` node's value (default: the heaviest target),
    through every path of the graph (step 1 of the module docstring); 0 for other nodes.

    Read a block of rows at a time, from the last to the first, where the rows are listed by layer (as
    attribution writes them); node by node in reverse graph order otherwise."""
    targets = graph.nodes_of(NodeKind.TARGET)
    if target is None:
        if not len(targets):
            raise CircuitmapError("the graph has no target node to group its features by")
        target = int(targets[np.argmax(graph.target_weight[targets])])
    per_unit = np.zeros(graph.n_nodes)
    per_unit[target] = 1.0
    effects = np.zeros(graph.n_nodes)
    is_feature = graph.kind == NodeKind.FEATURE
    has_row = np.diff(graph.indptr) > 0
    activation = graph.activation.astype(np.float64)
    for block in reversed(graph.row_blocks()):
        rows, positions = graph.block_edges(block)
        sources = graph.indices[positions].astype(np.intp)
        if (has_row[sources] & (sources >= block[0])).any():
            return _effects_node_by_node(graph, target)
        features = block[is_feature[block]]
        per_unit[features] = np.divide(
            effects[features],
            activation[features],
            out=np.zeros(len(features)),
            where=activation[features] != 0,
        )
        effects += np.bincount(
            sources, weights=graph.weights[positions] * per_unit[rows], minlength=graph.n_nodes
        )
    effects[~is_feature] = 0.0
    return effects


def _effects_node_by_node(graph: Graph, target: int) -> np.ndarray:
    """``feature_effects`` one feature at a time in reverse graph order, over a column copy of the edges."""
    columns = csr_matrix(
        (graph.weights.astype(np.float64), graph.indices, graph.indptr), shape=(graph.n_nodes, graph.n_nodes)
    ).tocsc()
    per_unit = np.zeros(graph.n_nodes)
    per_unit[target] = 1.0
    effects = np.zeros(graph.n_nodes)
    for node in graph.nodes_of(NodeKind.FEATURE)[::-1].tolist():
        start, stop = columns.indptr[node], columns.indptr[node + 1]
        effect = float(columns.data[start:stop] @ per_unit[columns.indices[start:stop]])
        effects[node] = effect
        activation = float(graph.activation[node])
        per_unit[node] = effect / activation if activation != 0 else 0.0
    return effects


def group_features(
    graph: Graph,
    kept: pruning.PruneResult | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    max_groups: int = MAX_GROUPS,
    cut: float = CUT,
) -> Grouping:
    """Group the feature nodes ``kept`` by pruning (default: ``pruning.prune(graph)``) into at most
    ``max_groups`` named supernodes (see the module docstring). ``labels``: feature labels by node id
    (default: ``graph.labels``)."""
    check_number("max_groups", max_groups, low=1, whole=True)
    check_number("cut", cut, low=0, high=2)
    kept = kept or pruning.prune(graph)
    kept_mask, influence = kept.node_mask, kept.influence
    if kept_mask.shape != (graph.n_nodes,) or influence.shape != (graph.n_nodes,):
        raise CircuitmapError(
            f"the pruning result is not of this graph: it must cover its {graph.n_nodes} nodes"
        )
    features = np.flatnonzero(kept_mask & (graph.kind == NodeKind.FEATURE))
    total = float(influence[features].sum())
    if not len(features):
        return Grouping([], float("nan"), 0)
    effects = feature_effects(graph)
    similarity = _role_similarity(graph, kept_mask, features, effects)
    layers = graph.layer[features].astype(np.float64)
    distance = 1.0 - similarity + np.abs(layers[:, None] - layers[None, :]) / max(graph.n_layers, 1)
    ids = node_ids(graph)
    names = dict(labels) if labels is not None else {ids[n]: text for n, text in graph.labels.items()}
    groups = []
    signs = np.where(effects[features] >= 0, 1, -1)
    positions = graph.position[features]
    for position in np.unique(positions).tolist():
        for sign in (1, -1):
            block = np.flatnonzero((positions == position) & (signs == sign))
            for members in _clusters(distance[np.ix_(block, block)], cut):
                nodes = features[block[members]]
                nodes = nodes[np.argsort(-influence[nodes], kind="stable")]
                groups.append(_group(graph, nodes, influence, sign, ids, names))
    groups.sort(key=lambda group: -group.influence)
    groups = groups[:max_groups]
    coverage = sum(group.influence for group in groups) / total if total > 0 else float("nan")
    return Grouping(groups, coverage, len(features))


def with_groups(document: dict, grouping: Grouping) -> dict:
    """Save a grouping in a viewer document as ordinary supernodes (after those already there), their
    members pinned; returns the document."""
    known = {node["node_id"] for node in document["nodes"]}
    params = document["qParams"]
    for group in grouping.groups:
        missing = [member for member in group.members if member not in known]
        if missing:
            raise CircuitmapError(f"group {group.name!r}: {missing[0]} is not a node of the document")
        params["supernodes"].append(group.as_supernode())
    members = [member for group in grouping.groups for member in group.members]
    params["pinnedIds"] = list(dict.fromkeys([*params["pinnedIds"], *members]))
    return document


def _role_similarity(graph: Graph, kept: np.ndarray, features: np.ndarray, effects: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of the kept features' two role vectors (step 2), ``[n, n]``."""
    positions = graph.edges_of(np.flatnonzero(kept))
    rows = graph.rows_of(positions)
    sources = graph.indices[positions].astype(np.intp)
    weights = graph.weights[positions].astype(np.float64)
    live = kept[sources]
    rows, sources, weights = rows[live], sources[live], weights[live]
    activation = graph.activation.astype(np.float64)
    per_unit = np.divide(effects, activation, out=np.zeros(graph.n_nodes), where=activation != 0)
    targets = graph.nodes_of(NodeKind.TARGET)
    top = int(targets[np.argmax(graph.target_weight[targets])])
    per_unit[top] = 1.0
    slot = np.full(graph.n_nodes, -1)
    slot[features] = np.arange(len(features))
    shape = (len(features), graph.n_nodes)
    out_rows = slot[sources]
    does = csr_matrix(
        (
            weights[out_rows >= 0] * per_unit[rows[out_rows >= 0]],
            (out_rows[out_rows >= 0], rows[out_rows >= 0]),
        ),
        shape=shape,
    )
    in_rows = slot[rows]
    driven = csr_matrix((weights[in_rows >= 0], (in_rows[in_rows >= 0], sources[in_rows >= 0])), shape=shape)
    return 0.5 * (_cosines(does) + _cosines(driven))


def _cosines(vectors: csr_matrix) -> np.ndarray:
    """Cosine similarity of every pair of rows (0 where a row is zero)."""
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    unit = vectors.multiply(scale[:, None]).tocsr()
    return np.asarray((unit @ unit.T).todense())


def _clusters(distance: np.ndarray, cut: float) -> list[np.ndarray]:
    """Average-linkage clusters of a block, as arrays of block positions."""
    if len(distance) < 2:
        return [np.arange(len(distance))] if len(distance) else []
    condensed = np.clip(distance[np.triu_indices(len(distance), k=1)], 0.0, None)
    assignment = fcluster(linkage(condensed, method="average"), t=cut, criterion="distance")
    return [np.flatnonzero(assignment == label) for label in np.unique(assignment)]


def _group(
    graph: Graph,
    nodes: np.ndarray,
    influence: np.ndarray,
    sign: int,
    ids: list[str],
    labels: Mapping[str, str],
) -> FeatureGroup:
    layers = graph.layer[nodes]
    low, high = int(layers.min()), int(layers.max())
    position = int(graph.position[nodes[0]])
    token = graph.token_strings[position].strip() or repr(graph.token_strings[position])
    span = f"L{low}" if low == high else f"L{low}–{high}"
    members = [ids[n] for n in nodes.tolist()]
    weights = influence[nodes]
    name = group_name([labels.get(member, "") for member in members], weights) or f"{span} at “{token}”"
    return FeatureGroup(name, members, position, (low, high), float(weights.sum()), sign)


def group_name(labels: list[str], weights: np.ndarray) -> str:
    """The label holding at least half of the labelled members' weight, else the two heaviest joined by
    " / "; "" when no member is labelled."""
    totals: dict[str, float] = {}
    for label, weight in zip(labels, weights.tolist(), strict=True):
        text = " ".join(label.split())
        if text:
            totals[text] = totals.get(text, 0.0) + weight
    if not totals:
        return ""
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    if len(ranked) == 1 or ranked[0][1] >= 0.5 * sum(totals.values()):
        return ranked[0][0]
    return f"{ranked[0][0]} / {ranked[1][0]}"

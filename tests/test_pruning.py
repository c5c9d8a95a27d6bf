"""Influence, pruning and scores: a graph worked out by hand, dense brute force on random DAGs, invariants."""

from __future__ import annotations

import numpy as np
import pytest

from circuitmap.errors import CircuitmapError
from circuitmap.graphs import graph as graph_module
from circuitmap.graphs import pruning
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.pruning import (
    graph_scores,
    node_influence,
    normalized_weights,
    prune,
    subgraph_scores,
)

F, E, T, L = NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.TARGET


def make_graph(
    kind: list[NodeKind],
    edges: list[tuple[int, int, float]],
    target_weight: list[float],
    layer: list[int],
    position: list[int],
    index: list[int],
    n_layers: int = 2,
) -> Graph:
    """A graph from its nodes and ``(target, source, weight)`` edges, in CSR sorted by (target, source)."""
    n = len(kind)
    edges = sorted(edges)
    rows = np.array([t for t, _, _ in edges], dtype=np.int64)
    n_targets = kind.count(L)
    return Graph(
        prompt="",
        tokens=[],
        token_strings=[],
        n_layers=n_layers,
        kind=np.array(kind, dtype=np.int8),
        layer=np.array(layer, dtype=np.int32),
        position=np.array(position, dtype=np.int32),
        index=np.array(index, dtype=np.int64),
        activation=np.zeros(n, dtype=np.float32),
        value=np.zeros(n, dtype=np.float32),
        constant=np.zeros(n, dtype=np.float32),
        target_weight=np.array(target_weight, dtype=np.float64),
        target_names=[f"t{i}" for i in range(n_targets)],
        target_probs=np.array([w for w, k in zip(target_weight, kind, strict=True) if k == L]),
        indptr=np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64),
        indices=np.array([s for _, s, _ in edges], dtype=np.int32),
        weights=np.array([w for _, _, w in edges], dtype=np.float32),
    )


# The hand-worked graph. Nodes (index: what, id):
#   0: feature 10, layer 0, pos 1  "0_10_1"      5: token 3, pos 0     "E_3_0"
#   1: feature 20, layer 0, pos 1  "0_20_1"      6: token 4, pos 1     "E_4_1"
#   2: feature 30, layer 1, pos 1  "1_30_1"      7: logit 50, weight 0.7  "3_50_1"
#   3: error, layer 0, pos 1       "err_0_1"     8: logit 60, weight 0.3  "3_60_1"
#   4: error, layer 1, pos 1       "err_1_1"
# Edges A[t, s] by row, with Â = |A| / Σ|A| of the row:
#   row 0: 5:+1, 6:-3            Σ|A| = 4  ->  Â 5:1/4, 6:3/4
#   row 1: 3:-3, 6:+1            Σ|A| = 4  ->  Â 3:3/4, 6:1/4
#   row 2: 0:+2, 1:-1, 6:+1      Σ|A| = 4  ->  Â 0:1/2, 1:1/4, 6:1/4
#   row 7: 0:+1, 2:+4, 4:-2, 6:+1  Σ|A| = 8  ->  Â 0:1/8, 2:1/2, 4:1/4, 6:1/8
#   row 8: 1:-3, 2:+1            Σ|A| = 4  ->  Â 1:3/4, 2:1/4
HAND_EDGES = [
    (0, 5, 1.0), (0, 6, -3.0),
    (1, 3, -3.0), (1, 6, 1.0),
    (2, 0, 2.0), (2, 1, -1.0), (2, 6, 1.0),
    (7, 0, 1.0), (7, 2, 4.0), (7, 4, -2.0), (7, 6, 1.0),
    (8, 1, -3.0), (8, 2, 1.0),
]  # fmt: skip
# In CSR order (sorted by target, then source): edge 0 = (0,5), 1 = (0,6), 2 = (1,3), 3 = (1,6), 4 = (2,0),
# 5 = (2,1), 6 = (2,6), 7 = (7,0), 8 = (7,2), 9 = (7,4), 10 = (7,6), 11 = (8,1), 12 = (8,2).
HAND_NORMALIZED = [1 / 4, 3 / 4, 3 / 4, 1 / 4, 1 / 2, 1 / 4, 1 / 4, 1 / 8, 1 / 2, 1 / 4, 1 / 8, 3 / 4, 1 / 4]
# Influence, from the targets down (each node: Σ over its outgoing edges of influence(target) × Â):
#   7: 0.7; 8: 0.3
#   2: 0.7·1/2 + 0.3·1/4 = 0.35 + 0.075 = 0.425
#   4: 0.7·1/4 = 0.175
#   1: 0.3·3/4 + 0.425·1/4 = 0.225 + 0.10625 = 0.33125
#   0: 0.7·1/8 + 0.425·1/2 = 0.0875 + 0.2125 = 0.3
#   3: 0.33125·3/4 = 0.2484375
#   6: 0.7·1/8 + 0.425·1/4 + 0.33125·1/4 + 0.3·3/4 = 0.0875 + 0.10625 + 0.0828125 + 0.225 = 0.5015625
#   5: 0.3·1/4 = 0.075
HAND_INFLUENCE = [0.3, 0.33125, 0.425, 0.2484375, 0.175, 0.075, 0.5015625, 0.7, 0.3]


def hand_graph() -> Graph:
    return make_graph(
        kind=[F, F, F, E, E, T, T, L, L],
        edges=HAND_EDGES,
        target_weight=[0, 0, 0, 0, 0, 0, 0, 0.7, 0.3],
        layer=[0, 0, 1, 0, 1, -1, -1, 2, 2],
        position=[1, 1, 1, 1, 1, 0, 1, 1, 1],
        index=[10, 20, 30, -1, -1, 3, 4, 50, 60],
    )


def test_hand_normalized_weights_and_influence():
    graph = hand_graph()
    np.testing.assert_allclose(normalized_weights(graph), HAND_NORMALIZED, rtol=0, atol=1e-15)
    np.testing.assert_allclose(node_influence(graph), HAND_INFLUENCE, rtol=1e-13)


def test_hand_full_graph_scores():
    # Replacement: tokens 0.075 + 0.5015625 = 0.5765625; errors 0.175 + 0.2484375 = 0.4234375; nothing lost
    # (sum 1 = total target weight), so replacement = 0.5765625.
    # Completeness: nodes with inputs 0, 1, 2, 7, 8; non-error share of their input: 1, 1/4 (error 3 has 3/4),
    # 1, 3/4 (error 4 has 1/4), 1. Numerator 0.3 + 0.33125/4 + 0.425 + 0.7·3/4 + 0.3
    # = 0.3 + 0.0828125 + 0.425 + 0.525 + 0.3 = 1.6328125 = 209/128; denominator 0.3 + 0.33125 + 0.425 + 0.7
    # + 0.3 = 2.05625 = 329/160; completeness = 209·160 / (128·329) = 1045/1316.
    scores = graph_scores(hand_graph())
    assert scores.replacement == pytest.approx(0.5765625, rel=1e-13)
    assert scores.completeness == pytest.approx(1045 / 1316, rel=1e-13)


def test_hand_default_prune():
    # Candidates' influence: 2: 0.425, 1: 0.33125, 0: 0.3, 3: 0.2484375, 4: 0.175, total 1.4796875.
    # Node threshold 0.8: the tail may hold 0.2·1.4796875 = 0.2959375: node 4 (0.175) fits, adding node 3
    # (0.4234375) does not, so only node 4 goes. Edges between kept nodes: all but edge 9 (7 <- 4), scores
    # sum 1.88125; the 0.98 tail budget 0.037625 is below the smallest score (0.075), so all of them stay, and
    # every kept feature and error has kept inputs and outputs.
    # Scores: influence is unchanged except node 4 (now 0); its 0.175 from target 7 is lost instead of error,
    # so replacement stays 0.5765625 / 1; completeness ignores where error mass goes: still 1045/1316.
    graph = hand_graph()
    result = prune(graph)
    np.testing.assert_array_equal(result.node_mask, [1, 1, 1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(result.edge_mask, np.arange(13) != 9)
    np.testing.assert_allclose(result.influence, HAND_INFLUENCE, rtol=1e-13)
    scores = graph_scores(graph, result.node_mask, result.edge_mask)
    assert scores.replacement == pytest.approx(0.5765625, rel=1e-13)
    assert scores.completeness == pytest.approx(1045 / 1316, rel=1e-13)


def test_hand_pruned_graph():
    # Node threshold 0.7: tail budget 0.3·1.4796875 = 0.44390625 holds nodes 4 and 3 (0.4234375) but not node
    # 0 too (0.7234375), so nodes 0, 1, 2 are kept (prefix 0.425 + 0.33125 + 0.3 = 1.05625 >= 1.03578125).
    # Edge scores Â × influence(target) between kept nodes: (0,5) 0.075, (0,6) 0.225, (1,6) 0.0828125,
    # (2,0) 0.2125, (2,1) 0.10625, (2,6) 0.10625, (7,0) 0.0875, (7,2) 0.35, (7,6) 0.0875, (8,1) 0.225,
    # (8,2) 0.075: total 1.6328125. Edge threshold 0.85: tail budget 0.15·1.6328125 = 0.244921875 holds
    # 0.075 + 0.075 + 0.0828125 = 0.2328125 but not the next 0.0875, so (0,5), (8,2) and (1,6) go.
    # Node 1 has no kept input left ((1,3) left with node 3), so it goes with (2,1) and (8,1).
    # Kept edges: (0,6) #1, (2,0) #4, (2,6) #6, (7,0) #7, (7,2) #8, (7,6) #10.
    graph = hand_graph()
    result = prune(graph, node_threshold=0.7, edge_threshold=0.85)
    np.testing.assert_array_equal(result.node_mask, [1, 0, 1, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.flatnonzero(result.edge_mask), [1, 4, 6, 7, 8, 10])
    # Influence over the kept edges: 7: 0.7, 8: 0.3, 2: 0.7·1/2 = 0.35, 0: 0.7·1/8 + 0.35·1/2 = 0.2625,
    # 6: 0.7·1/8 + 0.35·1/4 + 0.2625·3/4 = 0.0875 + 0.0875 + 0.196875 = 0.371875, others 0.
    kept_influence = [0.2625, 0, 0.35, 0, 0, 0, 0.371875, 0.7, 0.3]
    np.testing.assert_allclose(node_influence(graph, result.edge_mask), kept_influence, rtol=1e-13)
    # Replacement: tokens 0.371875, errors 0; lost: 7: 0.7·(1 - 3/4) = 0.175, 8: 0.3·1 = 0.3,
    # 2: 0.35·(1 - 3/4) = 0.0875, 0: 0.2625·(1 - 3/4) = 0.065625; lost 0.628125, and 0.371875 + 0.628125 = 1,
    # so replacement = 0.371875.
    # Completeness: nodes 0, 2, 7, 8 with influence 0.2625, 0.35, 0.7, 0.3 (sum 1.6125 = 129/80) and kept
    # clean shares 3/4, 3/4, 3/4, 0: numerator 3/4·1.3125 = 0.984375 = 63/64;
    # completeness = 63·80/(64·129) = 105/172.
    scores = graph_scores(graph, result.node_mask, result.edge_mask)
    assert scores.replacement == pytest.approx(0.371875, rel=1e-13)
    assert scores.completeness == pytest.approx(105 / 172, rel=1e-13)


@pytest.mark.parametrize("kept", [["1_30_1"], [2]])
def test_hand_one_node_subgraph(kept):
    # Kept: node 2 with tokens 5, 6 and targets 7, 8; edges among them: (2,6) 1/4, (7,2) 1/2, (7,6) 1/8,
    # (8,2) 1/4. Influence: 2: 0.7·1/2 + 0.3·1/4 = 0.425; 6: 0.7·1/8 + 0.425·1/4 = 0.0875 + 0.10625 = 0.19375.
    # Replacement 0.19375 (lost: 7: 0.7·3/8 = 0.2625, 8: 0.3·3/4 = 0.225, 2: 0.425·3/4 = 0.31875;
    # sum 0.80625, and 0.19375 + 0.80625 = 1).
    # Completeness: nodes 2, 7, 8, influence 0.425 + 0.7 + 0.3 = 1.425 = 57/40; clean shares 1/4, 5/8, 1/4:
    # 0.10625 + 0.4375 + 0.075 = 0.61875 = 99/160; completeness = 99·40/(160·57) = 33/76.
    scores = subgraph_scores(hand_graph(), kept)
    assert scores.replacement == pytest.approx(0.19375, rel=1e-13)
    assert scores.completeness == pytest.approx(33 / 76, rel=1e-13)


def test_hand_supernode_members_count_as_kept():
    # Node 2 kept, nodes 0 and 1 in a supernode: every feature is kept and only the errors are left out, so
    # the error mass (0.4234375) is lost instead: replacement 0.5765625 and completeness 1045/1316 as in full.
    scores = subgraph_scores(hand_graph(), [2], supernodes=[["0_10_1", 1]])
    assert scores.replacement == pytest.approx(0.5765625, rel=1e-13)
    assert scores.completeness == pytest.approx(1045 / 1316, rel=1e-13)


def test_zero_row_feature_absorbs_its_mass_as_lost():
    # Feature 0 has one zero-weight input edge, so its row has no weight: the 0.5 it receives from the target
    # (Â 1/2) is lost. Token 1 gets the other 0.5: replacement 0.5. Completeness covers the target only (the
    # feature has no incoming weight): its whole input comes from non-error nodes, so 1.
    graph = make_graph(
        kind=[F, T, L],
        edges=[(0, 1, 0.0), (2, 0, 1.0), (2, 1, -1.0)],
        target_weight=[0, 0, 1.0],
        layer=[0, -1, 1],
        position=[0, 0, 0],
        index=[0, 1, 2],
        n_layers=1,
    )
    np.testing.assert_array_equal(normalized_weights(graph), [0, 0.5, 0.5])
    scores = graph_scores(graph)
    assert scores.replacement == pytest.approx(0.5)
    assert scores.completeness == pytest.approx(1.0)


def test_ties_keep_earlier_nodes():
    # 40 features, each reading the token with weight 1 and read by the target with weight 1: each has
    # influence 1/40. Node threshold 0.49 is first reached by 20 of them (19/40 = 0.475 < 0.49 <= 0.5); ties
    # go in graph order, so 0..19 stay.
    n = 40
    graph = make_graph(
        kind=[F] * n + [T, L],
        edges=[(f, n, 1.0) for f in range(n)] + [(n + 1, f, 1.0) for f in range(n)],
        target_weight=[0.0] * (n + 1) + [1.0],
        layer=[0] * n + [-1, 1],
        position=[0] * (n + 2),
        index=list(range(n + 2)),
        n_layers=1,
    )
    result = prune(graph, node_threshold=0.49, edge_threshold=1.0)
    np.testing.assert_array_equal(np.flatnonzero(result.node_mask), [*range(20), n, n + 1])


# Random DAGs against dense brute force.


def random_graph(seed: int, token_inputs: bool = False, layered: bool = False) -> Graph:
    """A random DAG: features read tokens, errors and lower-index features; targets read all of those.

    Some edges have weight zero and some features no inputs, unless ``token_inputs`` gives every feature a
    nonzero edge from a token. ``layered`` lists the features by layer, as attribution does: then a feature
    reads only features of lower layers.
    """
    rng = np.random.default_rng(seed)
    n_f, n_e, n_t, n_l = rng.integers(3, 14), rng.integers(1, 5), rng.integers(1, 4), rng.integers(1, 4)
    kind = [F] * n_f + [E] * n_e + [T] * n_t + [L] * n_l
    tokens = range(n_f + n_e, n_f + n_e + n_t)
    feature_layer = np.sort(rng.integers(0, 3, size=n_f)) if layered else np.arange(n_f)
    edges = []
    for target in range(len(kind)):
        if kind[target] == F:
            sources = [
                s
                for s in range(n_f + n_e + n_t)
                if s >= n_f or (s < target and feature_layer[s] < feature_layer[target])
            ]
        elif kind[target] == L:
            sources = range(n_f + n_e + n_t)
        else:
            continue
        for source in sources:
            if rng.random() < 0.4:
                edges.append((target, source, float(rng.normal()) * (rng.random() > 0.1)))
        if token_inputs and kind[target] == F:
            edges = [e for e in edges if e[:2] != (target, tokens[0])] + [(target, tokens[0], 0.5)]
    weights = rng.random(n_l) * (rng.random(n_l) > 0.2)
    weights[0] += 0.1
    n = len(kind)
    return make_graph(
        kind=kind,
        edges=edges,
        target_weight=[0.0] * (n - n_l) + list(weights / weights.sum()),
        layer=[*(feature_layer if layered else [0] * n_f), *range(n_e), *[-1] * n_t, *[3] * n_l],
        position=[0] * n,
        index=list(range(n_f)) + [-1] * n_e + list(range(n_t)) + list(range(n_l)),
        n_layers=3,
    )


def dense_normalized(graph: Graph) -> np.ndarray:
    magnitude = np.abs(graph.dense_adjacency())
    totals = magnitude.sum(axis=1, keepdims=True)
    return np.divide(magnitude, totals, out=np.zeros_like(magnitude), where=totals > 0)


def dense_influence(graph: Graph, live: np.ndarray | None = None) -> np.ndarray:
    """``w·Σ_k Â^k`` with dense matrix powers (``k`` up to ``n_nodes``, enough for a DAG)."""
    normalized = dense_normalized(graph) * (1 if live is None else live)
    term = graph.target_weight.copy()
    total = term.copy()
    for _ in range(graph.n_nodes):
        term = term @ normalized
        total += term
    return total


def dense_scores(graph: Graph, node_mask: np.ndarray, edge_mask: np.ndarray) -> tuple[float, float]:
    """Replacement as token influence / total target weight (mass is conserved); completeness as defined."""
    kind = graph.kind
    kept = node_mask | (kind == T) | (kind == L)
    live = np.zeros((graph.n_nodes, graph.n_nodes), dtype=bool)
    live[graph.target_indices()[edge_mask], graph.indices[edge_mask]] = True
    live &= kept[:, None] & kept[None, :]
    influence = dense_influence(graph, live)
    replacement = influence[kind == T].sum() / graph.target_weight.sum()
    normalized = dense_normalized(graph)
    clean = (normalized * live)[:, kind != E].sum(axis=1)
    with_input = kept & (normalized.sum(axis=1) > 0)
    completeness = (influence * clean)[with_input].sum() / influence[with_input].sum()
    return replacement, completeness


SEEDS = range(25)


@pytest.mark.parametrize("seed", SEEDS)
def test_influence_matches_dense(seed):
    graph = random_graph(seed)
    np.testing.assert_allclose(node_influence(graph), dense_influence(graph), rtol=1e-10, atol=1e-14)
    mask = np.random.default_rng(seed).random(graph.n_edges) < 0.6
    live = np.zeros((graph.n_nodes, graph.n_nodes), dtype=bool)
    live[graph.target_indices()[mask], graph.indices[mask]] = True
    np.testing.assert_allclose(
        node_influence(graph, mask), dense_influence(graph, live), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_scores_match_dense(seed):
    graph = random_graph(seed)
    rng = np.random.default_rng(seed)
    result = prune(graph, node_threshold=0.6, edge_threshold=0.9)
    masks = [
        (np.ones(graph.n_nodes, dtype=bool), np.ones(graph.n_edges, dtype=bool)),
        (rng.random(graph.n_nodes) < 0.6, rng.random(graph.n_edges) < 0.7),
        (result.node_mask, result.edge_mask),
    ]
    for node_mask, edge_mask in masks:
        scores = graph_scores(graph, node_mask, edge_mask)
        expected = dense_scores(graph, node_mask, edge_mask)
        np.testing.assert_allclose([scores.replacement, scores.completeness], expected, rtol=1e-10)
    subgraph = rng.choice(graph.n_nodes, size=3, replace=False)
    node_mask = np.isin(np.arange(graph.n_nodes), subgraph)
    scores = subgraph_scores(graph, subgraph)
    expected = dense_scores(graph, node_mask, np.ones(graph.n_edges, dtype=bool))
    np.testing.assert_allclose([scores.replacement, scores.completeness], expected, rtol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_subgraph_scores_read_only_kept_rows_and_equal_the_masked_scores(seed):
    graph = random_graph(seed)
    rng = np.random.default_rng(seed)
    for size in (0, 1, graph.n_nodes // 3, graph.n_nodes):
        chosen = rng.choice(graph.n_nodes, size=size, replace=False)
        pinned, grouped = chosen[: size // 2].tolist(), chosen[size // 2 :].tolist()
        node_mask = np.isin(np.arange(graph.n_nodes), chosen)
        node_mask |= (graph.kind == NodeKind.TOKEN) | (graph.kind == NodeKind.TARGET)
        edge_mask = node_mask[graph.target_indices()] & node_mask[graph.indices]
        expected = graph_scores(graph, node_mask, edge_mask)
        scores = subgraph_scores(graph, pinned, supernodes=[grouped] if grouped else [])
        np.testing.assert_allclose(
            [scores.replacement, scores.completeness],
            [expected.replacement, expected.completeness],
            rtol=1e-12,
        )


def reference_prune(graph: Graph, node_threshold: float, edge_threshold: float) -> tuple[set, set]:
    """Pruning written out with Python loops over dense influence, taking prefixes that reach θ·total."""
    kind = graph.kind
    influence = dense_influence(graph)
    normalized = normalized_weights(graph)
    rows, sources = graph.target_indices(), graph.indices
    kept = {i for i in range(graph.n_nodes) if kind[i] in (T, L)}
    candidates = sorted((i for i in range(graph.n_nodes) if kind[i] in (F, E)), key=lambda i: -influence[i])
    goal, reached = node_threshold * sum(influence[i] for i in candidates), 0.0
    for node in candidates:
        if reached >= goal:
            break
        kept.add(node)
        reached += influence[node]
    edges = [e for e in range(graph.n_edges) if rows[e] in kept and sources[e] in kept]
    score = {e: normalized[e] * influence[rows[e]] for e in edges}
    goal, reached, kept_edges = edge_threshold * sum(score.values()), 0.0, set()
    for edge in sorted(edges, key=lambda e: -score[e]):
        if reached >= goal:
            break
        kept_edges.add(edge)
        reached += score[edge]
    changed = True
    while changed:
        changed = False
        for node in list(kept):
            has_out = any(sources[e] == node for e in kept_edges)
            has_in = any(rows[e] == node for e in kept_edges)
            if (kind[node] in (F, E) and not has_out) or (kind[node] == F and not has_in):
                kept.discard(node)
                kept_edges = {e for e in kept_edges if node not in (rows[e], sources[e])}
                changed = True
    return kept, kept_edges


@pytest.mark.parametrize("seed", SEEDS)
def test_prune_matches_reference(seed):
    graph = random_graph(seed)
    node_threshold, edge_threshold = np.random.default_rng(seed).uniform(0.3, 1.0, size=2)
    result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    kept, kept_edges = reference_prune(graph, node_threshold, edge_threshold)
    assert set(np.flatnonzero(result.node_mask)) == kept
    assert set(np.flatnonzero(result.edge_mask)) == kept_edges


@pytest.mark.parametrize("seed", SEEDS)
def test_layered_graphs_read_in_small_blocks_match_dense(seed, monkeypatch):
    """Rows listed by layer take the one-sweep path, over blocks of a few edges: same results as dense."""
    graph = random_graph(seed, layered=True)
    monkeypatch.setattr(graph_module, "EDGE_BLOCK", 4)
    sweeps = []
    chunks = pruning._Flow.chunks

    def counted(flow, descending=False):
        sweeps.append(descending)
        return chunks(flow, descending)

    monkeypatch.setattr(pruning._Flow, "chunks", counted)
    np.testing.assert_allclose(node_influence(graph), dense_influence(graph), rtol=1e-12, atol=1e-15)
    assert sweeps == [True]
    np.testing.assert_allclose(
        normalized_weights(graph), dense_normalized(graph)[graph.target_indices(), graph.indices], rtol=1e-12
    )
    node_threshold, edge_threshold = np.random.default_rng(seed).uniform(0.3, 1.0, size=2)
    result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    kept, kept_edges = reference_prune(graph, node_threshold, edge_threshold)
    assert set(np.flatnonzero(result.node_mask)) == kept
    assert set(np.flatnonzero(result.edge_mask)) == kept_edges
    scores = graph_scores(graph, result.node_mask, result.edge_mask)
    expected = dense_scores(graph, result.node_mask, result.edge_mask)
    np.testing.assert_allclose([scores.replacement, scores.completeness], expected, rtol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_prune_invariants(seed):
    graph = random_graph(seed)
    kind, rows, sources = graph.kind, graph.target_indices(), graph.indices
    result = prune(graph, node_threshold=0.7, edge_threshold=0.9)
    nodes, edges = result.node_mask, result.edge_mask
    assert nodes[(kind == T) | (kind == L)].all()
    assert (nodes[rows[edges]] & nodes[sources[edges]]).all()
    has_out = np.bincount(sources[edges], minlength=graph.n_nodes) > 0
    has_in = np.bincount(rows[edges], minlength=graph.n_nodes) > 0
    assert has_out[nodes & ((kind == F) | (kind == E))].all()
    assert has_in[nodes & (kind == F)].all()


@pytest.mark.parametrize("seed", SEEDS)
def test_full_thresholds_keep_everything_reachable(seed):
    # Every feature reads a token, so every node with influence keeps a path to the inputs: nothing dangles.
    graph = random_graph(seed, token_inputs=True)
    result = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    always = (graph.kind == T) | (graph.kind == L)
    np.testing.assert_array_equal(result.node_mask, always | (result.influence > 0))
    score = normalized_weights(graph) * result.influence[graph.target_indices()]
    np.testing.assert_array_equal(result.edge_mask, score > 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_prune_monotonic_in_thresholds(seed):
    graph = random_graph(seed)
    for node_threshold, edge_thresholds in [(0.7, [0.3, 0.6, 0.9, 1.0]), (0.4, [0.5, 0.95])]:
        results = [prune(graph, node_threshold=node_threshold, edge_threshold=t) for t in edge_thresholds]
        for smaller, larger in zip(results, results[1:], strict=False):
            assert (smaller.node_mask <= larger.node_mask).all()
            assert (smaller.edge_mask <= larger.edge_mask).all()
    results = [prune(graph, node_threshold=t, edge_threshold=1.0) for t in [0.2, 0.5, 0.8, 1.0]]
    for smaller, larger in zip(results, results[1:], strict=False):
        assert (smaller.node_mask <= larger.node_mask).all()
        assert (smaller.edge_mask <= larger.edge_mask).all()


# Errors.


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_thresholds_outside_unit_interval_fail(bad):
    graph = hand_graph()
    with pytest.raises(CircuitmapError, match="node_threshold"):
        prune(graph, node_threshold=bad)
    with pytest.raises(CircuitmapError, match="edge_threshold"):
        prune(graph, edge_threshold=bad)


def test_unknown_nodes_fail():
    graph = hand_graph()
    with pytest.raises(CircuitmapError, match="unknown node id '9_9_9'"):
        subgraph_scores(graph, ["9_9_9"])
    with pytest.raises(CircuitmapError, match="unknown node id"):
        subgraph_scores(graph, [2], supernodes=[["err_5_1"]])
    with pytest.raises(CircuitmapError, match="out of range"):
        subgraph_scores(graph, [9])


def test_bad_masks_fail():
    graph = hand_graph()
    with pytest.raises(CircuitmapError, match="edge_mask"):
        node_influence(graph, np.ones(3, dtype=bool))
    with pytest.raises(CircuitmapError, match="node_mask"):
        graph_scores(graph, node_mask=np.ones(graph.n_nodes))


def test_cycle_fails():
    # Features 0 and 1 feed each other: the influence series never ends.
    graph = make_graph(
        kind=[F, F, L],
        edges=[(0, 1, 1.0), (1, 0, 1.0), (2, 0, 1.0)],
        target_weight=[0, 0, 1.0],
        layer=[0, 0, 1],
        position=[0, 0, 0],
        index=[0, 1, 2],
        n_layers=1,
    )
    with pytest.raises(CircuitmapError, match="cycle"):
        node_influence(graph)

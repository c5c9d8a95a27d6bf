"""Time pruning and scoring a large synthetic attribution graph (100,000 nodes, 10,000,000 edges by default).

usage: python benchmarks/prune_large.py [--nodes N] [--edges M] [--runs R] [--seed S]

The graph is a random DAG shaped like a real one: features spread over layers and positions, one error node
per layer and position, one token per position, a few targets; every edge goes from a lower level (tokens,
then layers) to a higher one, and edge magnitudes are heavy-tailed. It is built with vectorised NumPy (no loop
over edges). Times are medians over the runs; peak RSS is the process's maximum resident memory, printed after
importing circuitmap (which loads torch), after building the graph and at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.pruning import PruneConfig, graph_scores, prune

DEFAULTS = PruneConfig()

N_LAYERS, N_POSITIONS, N_TARGETS = 20, 50, 10


def synthetic_graph(n_nodes: int, n_edges: int, seed: int) -> Graph:
    """A random layered DAG with ``n_nodes`` nodes in graph order and exactly ``n_edges`` distinct edges."""
    rng = np.random.default_rng(seed)
    n_errors, n_tokens = N_LAYERS * N_POSITIONS, N_POSITIONS
    n_features = n_nodes - n_errors - n_tokens - N_TARGETS
    feature_layer = rng.integers(0, N_LAYERS, n_features)
    feature_position = rng.integers(0, N_POSITIONS, n_features)
    order = np.lexsort((feature_position, feature_layer))
    error_layer, error_position = np.divmod(np.arange(n_errors), N_POSITIONS)
    kind = np.repeat(
        np.array([NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN, NodeKind.TARGET], dtype=np.int8),
        [n_features, n_errors, n_tokens, N_TARGETS],
    )
    layer = np.concatenate(
        [feature_layer[order], error_layer, np.full(n_tokens, -1), np.full(N_TARGETS, N_LAYERS)]
    )
    position = np.concatenate(
        [feature_position[order], error_position, np.arange(n_tokens), np.full(N_TARGETS, N_POSITIONS - 1)]
    )

    # Level 0 = tokens, l + 1 = layer l, N_LAYERS + 1 = targets. An edge into a node of level k draws its
    # source uniformly from the nodes of lower level: the first below[k] entries of the nodes sorted by level.
    level = layer + 1
    by_level = np.argsort(level, kind="stable")
    below = np.searchsorted(level[by_level], np.arange(N_LAYERS + 2))
    readers = np.flatnonzero((kind == NodeKind.FEATURE) | (kind == NodeKind.TARGET))
    drawn = int(n_edges * 1.06)  # duplicates are merged, so draw a few more than needed
    rows = rng.choice(readers, drawn)
    sources = by_level[(rng.random(drawn) * below[level[rows]]).astype(np.int64)]
    keys = np.sort(rows * n_nodes + sources)  # sort and compare neighbours: faster than np.unique here
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    if len(keys) < n_edges:
        raise SystemExit(f"only {len(keys):,} distinct edges drawn; ask for fewer edges or more nodes")
    keys = np.delete(keys, rng.choice(len(keys), len(keys) - n_edges, replace=False))
    rows, sources = np.divmod(keys, n_nodes)
    magnitude = rng.lognormal(0.0, 1.5, n_edges).astype(np.float32)
    weights = np.where(rng.random(n_edges) < 0.5, -magnitude, magnitude)

    target_weight = np.zeros(n_nodes)
    target_weight[-N_TARGETS:] = rng.dirichlet(np.ones(N_TARGETS))
    return Graph(
        prompt="synthetic",
        tokens=list(range(n_tokens)),
        token_strings=[str(i) for i in range(n_tokens)],
        n_layers=N_LAYERS,
        kind=kind,
        layer=layer.astype(np.int32),
        position=position.astype(np.int32),
        index=np.concatenate([np.arange(n_features), np.full(n_errors, -1), np.arange(n_tokens + N_TARGETS)]),
        activation=np.zeros(n_nodes, dtype=np.float32),
        value=np.zeros(n_nodes, dtype=np.float32),
        constant=np.zeros(n_nodes, dtype=np.float32),
        target_weight=target_weight,
        target_names=[f"target {i}" for i in range(N_TARGETS)],
        target_probs=target_weight[-N_TARGETS:],
        indptr=np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_nodes))]).astype(np.int64),
        indices=sources.astype(np.int32),
        weights=weights,
    )


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> str:
    """CPU model, core count, OS and NumPy version, for the record."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
    ]
    cpu = models[0] if models else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, NumPy {np.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"peak RSS after importing circuitmap: {peak_rss_gib():.2f} GiB")
    start = time.perf_counter()
    graph = synthetic_graph(args.nodes, args.edges, args.seed)
    print(
        f"graph: {graph.n_nodes:,} nodes, {graph.n_edges:,} edges, {N_LAYERS} layers × {N_POSITIONS} "
        f"positions, built in {time.perf_counter() - start:.1f} s; "
        f"peak RSS after building {peak_rss_gib():.2f} GiB"
    )

    prune_s, score_s = [], []
    for _ in range(args.runs):
        start = time.perf_counter()
        result = prune(graph)
        middle = time.perf_counter()
        scores = graph_scores(graph, result.node_mask, result.edge_mask)
        prune_s.append(middle - start)
        score_s.append(time.perf_counter() - middle)
    full = graph_scores(graph)
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc: the memory pruning itself needs
    kept = prune(graph)
    graph_scores(graph, kept.node_mask, kept.edge_mask)
    working_gib = tracemalloc.get_traced_memory()[1] / 2**30
    tracemalloc.stop()
    total_s = [p + s for p, s in zip(prune_s, score_s, strict=True)]

    print(
        f"prune ({DEFAULTS.node_threshold:g}, {DEFAULTS.edge_threshold:g}): "
        f"kept {int(result.node_mask.sum()):,} nodes, "
        f"{int(result.edge_mask.sum()):,} edges; "
        f"replacement {scores.replacement:.4f}, completeness {scores.completeness:.4f} "
        f"(full graph {full.replacement:.4f}, {full.completeness:.4f})"
    )
    print(
        f"time, median of {args.runs}: prune {statistics.median(prune_s):.2f} s + graph_scores "
        f"{statistics.median(score_s):.2f} s = {statistics.median(total_s):.2f} s"
    )
    print(
        f"peak RSS: {peak_rss_gib():.2f} GiB; "
        f"peak memory allocated by prune + graph_scores: {working_gib:.2f} GiB"
    )


if __name__ == "__main__":
    main()

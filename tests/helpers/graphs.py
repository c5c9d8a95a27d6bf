"""Graphs for the tests: a consistent random graph, variants of it (behind a longer prompt, edited), and a
graph folder as ``attribute --out`` writes it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from circuitmap.graphs.export import write_graph_json
from circuitmap.graphs.folder import DOCUMENT_FILE, GRAPH_FILE
from circuitmap.graphs.graph import Graph, NodeKind

SERVER_PROMPT = "The cat sat"


def random_graph(
    seed: int = 0,
    *,
    n_layers: int = 3,
    n_positions: int = 4,
    weight_dtype: type = np.float32,
    prompt: str = "The capital of Texas is",
    token_strings: list[str] | None = None,
) -> Graph:
    """A consistent random graph: 1–2 features per (layer, position) after the first position, one error per
    (layer, position), one token per position, and two targets at the last position (a logit and a
    non-token target). Edges come only from lower layers (or tokens) at the same or earlier positions, and
    ``value`` is ``constant`` plus the row sums."""
    rng = np.random.default_rng(seed)
    features = [
        (layer, position, int(index))
        for layer in range(n_layers)
        for position in range(1, n_positions)
        for index in sorted(rng.choice(40, size=int(rng.integers(1, 3)), replace=False))
    ]
    errors = [(layer, position) for layer in range(n_layers) for position in range(n_positions)]
    tokens = [int(token) for token in rng.choice(np.arange(3, 100), size=n_positions, replace=False)]
    last = n_positions - 1
    kind = np.array(
        [NodeKind.FEATURE] * len(features)
        + [NodeKind.ERROR] * len(errors)
        + [NodeKind.TOKEN] * n_positions
        + [NodeKind.TARGET] * 2,
        dtype=np.int8,
    )
    layer = np.array(
        [f[0] for f in features] + [e[0] for e in errors] + [-1] * n_positions + [n_layers] * 2,
        dtype=np.int32,
    )
    position = np.array(
        [f[1] for f in features] + [e[1] for e in errors] + list(range(n_positions)) + [last] * 2,
        dtype=np.int32,
    )
    index = np.array([f[2] for f in features] + [-1] * len(errors) + tokens + [7, -1], dtype=np.int64)
    n_nodes = len(kind)

    has_row = (kind == NodeKind.FEATURE) | (kind == NodeKind.TARGET)
    is_source_layer = (kind == NodeKind.FEATURE) | (kind == NodeKind.ERROR)
    indptr, indices, weights = [0], [], []
    for target in range(n_nodes):
        if has_row[target]:
            earlier = position <= position[target]
            lower = (is_source_layer & (layer < layer[target])) | (kind == NodeKind.TOKEN)
            sources = np.flatnonzero(earlier & lower)
            sources = sources[rng.random(len(sources)) < 0.7]
            indices.extend(sources.tolist())
            weights.extend(rng.normal(size=len(sources)).tolist())
        indptr.append(len(indices))
    indptr = np.array(indptr, dtype=np.int64)
    weights = np.array(weights, dtype=weight_dtype)
    rows = np.repeat(np.arange(n_nodes), np.diff(indptr))
    row_sums = np.bincount(rows, weights=weights.astype(np.float64), minlength=n_nodes)
    constant = np.where(has_row, rng.normal(size=n_nodes), 0.0)
    target_weight = np.zeros(n_nodes)
    target_weight[-2:] = [0.7, 0.3]
    return Graph(
        prompt=prompt,
        tokens=tokens,
        token_strings=token_strings or [f"tok{p}" for p in range(n_positions)],
        n_layers=n_layers,
        kind=kind,
        layer=layer,
        position=position,
        index=index,
        activation=np.where(kind == NodeKind.FEATURE, rng.uniform(0.1, 3.0, n_nodes), 0.0).astype(np.float32),
        value=np.where(has_row, constant + row_sums, np.nan),
        constant=constant,
        target_weight=target_weight,
        target_names=[" Austin", "Austin − Dallas"],
        target_probs=np.array([0.6, 0.25]),
        indptr=indptr,
        indices=np.array(indices, dtype=np.int32),
        weights=weights,
        model_name="tiny-llama",
        transcoders_name="tiny-plt",
        labels={0: "first feature"},
        info={"max_feature_nodes": 100, "notes": ["random"]},
    )


def with_first_tokens(graph: Graph, token_strings: list[str], prompt: str) -> Graph:
    """``graph`` behind a longer prompt: ``token_strings`` go before its tokens (made-up token ids, no edges)
    and every other node moves right by as many positions with its edges, so each node keeps its influence and
    its position counted from the end."""
    count = len(token_strings)
    first_token = int(graph.nodes_of(NodeKind.TOKEN)[0])
    moved = np.arange(graph.n_nodes) + np.where(np.arange(graph.n_nodes) >= first_token, count, 0)
    token_ids = [1000 + k for k in range(count)]

    def inserted(array: np.ndarray, values) -> np.ndarray:
        return np.insert(array, first_token, np.asarray(values, dtype=array.dtype))

    row_lengths = inserted(np.diff(graph.indptr), [0] * count)
    return replace(
        graph,
        prompt=prompt,
        tokens=token_ids + list(graph.tokens),
        token_strings=list(token_strings) + list(graph.token_strings),
        kind=inserted(graph.kind, [NodeKind.TOKEN] * count),
        layer=inserted(graph.layer, [-1] * count),
        position=inserted(graph.position + count, list(range(count))),
        index=inserted(graph.index, token_ids),
        activation=inserted(graph.activation, [0.0] * count),
        value=inserted(graph.value, [np.nan] * count),
        constant=inserted(graph.constant, [0.0] * count),
        target_weight=inserted(graph.target_weight, [0.0] * count),
        indptr=np.concatenate([[0], np.cumsum(row_lengths)]).astype(graph.indptr.dtype),
        indices=moved[graph.indices].astype(graph.indices.dtype),
        labels={int(moved[node]): label for node, label in graph.labels.items()},
    )


def edited_graph(graph: Graph, renamed: int, new_index: int, boosted: int, factor: float) -> Graph:
    """``graph`` with feature node ``renamed`` given another feature index (one feature disappears, another
    appears) and the edges out of node ``boosted`` scaled by ``factor`` (influences change)."""
    index = graph.index.copy()
    index[renamed] = new_index
    weights = graph.weights.copy()
    weights[graph.indices == boosted] *= factor
    return replace(graph, index=index, weights=weights)


def write_graph_folder(root: Path, document: dict, graph: Graph | None = None, name: str = "cat") -> Path:
    """A graph folder under ``root`` holding one graph ``name`` (its viewer JSON, and its full graph when
    given), as ``attribute --out`` writes it; returns the folder."""
    folder = root / "graphs" / name
    folder.mkdir(parents=True)
    write_graph_json(document, folder / DOCUMENT_FILE)
    if graph is not None:
        graph.save(folder / GRAPH_FILE)
    return root / "graphs"

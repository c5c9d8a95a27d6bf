"""Attention in the explorer: the heads that carry a cross-position edge, and why a head attends where it
does.

- Stored loadings: a graph folder may hold the head loadings of its most influential cross-position edges
  (``heads.safetensors``, written by ``circuitmap attribute --head-loadings N``). They are served as stored,
  with or without a model, and can be inlined in an exported page: each edge by the ids of its ends, its
  weight, the remainder, and its loading on every head that can carry it (summed over the key positions),
  largest first.
- An edge's loadings on demand: with an engine, any other cross-position edge of the full graph is split over
  heads when asked for (``attribution.heads.head_loadings`` on that one edge).
- A head at a (query, key) position pair: its attention pattern on the graph's prompt (a clean forward pass
  watched through ``attention_tap``; the replacement model freezes the same pattern) and its pre-softmax score
  split over pairs of query-side and key-side nodes (``attribution.qk.qk_attribution`` on the full graph, so
  node ids are the graph's). The strongest pairs and nodes come with the current labels of their features
  from the feature database, when the server has one.

Everything needs the full graph (edges are its edges, nodes its nodes); computations need a graph of the
engine's model and transcoder set and run under the engine's lock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from circuitmap.attribution.heads import (
    AttentionCall,
    HeadLoadings,
    attention_tap,
    edge_targets,
    graph_ids,
    head_loadings,
    n_attention_heads,
)
from circuitmap.attribution.qk import QKAttribution, qk_attribution
from circuitmap.errors import CircuitmapError, StoreError
from circuitmap.features.store import FeatureStore
from circuitmap.graphs.folder import GraphFolder
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import index_by_id, is_feature_id, node_ids, parse_feature_id
from circuitmap.models import Model
from circuitmap.server.jobs import Engine
from circuitmap.server.store import GraphStore

DEFAULT_TOP = 12
MAX_TOP = 100
PATTERN_DIGITS = 5
NOT_STORED = (
    "the heads of this edge were not stored with the graph (circuitmap attribute --head-loadings N), and "
    "computing them needs a server started with --model and --transcoders"
)
NO_MODEL = "the attention pattern and QK attribution need a server started with --model and --transcoders"
SITE_FIELDS = ("layer", "head", "query", "key")


def stored_heads(store: GraphStore, name: str, engine: Engine | None) -> dict:
    """The stored loadings of graph ``name`` and whether the server can split its other edges (``listing``,
    with the engine only when the graph comes from its model and transcoder set; none without a full
    graph)."""
    if not store.summary(name).exact_scores:
        return {"n_layers": None, "n_heads": None, "computable": False, "edges": []}
    graph = store.full_graph(name)
    try:
        if engine is not None:
            check_engine(engine, graph, name)
    except StoreError:
        engine = None
    return listing(graph, store.head_loadings(name), engine)


def folder_heads(source: str | Path) -> dict | None:
    """The loadings stored in graph folder ``source`` as ``listing`` gives them without an engine, for an
    exported page; None when ``source`` is not a folder holding loadings beside its full graph."""
    folder = GraphFolder(source)
    if not (folder.path.is_dir() and folder.has_graph() and folder.has_head_loadings()):
        return None
    return listing(folder.read_graph(), folder.read_head_loadings(), None)


def listing(graph: Graph, loadings: HeadLoadings | None, engine: Engine | None) -> dict:
    """``{n_layers, n_heads, computable, edges}``: every split edge of ``loadings`` as ``edge_entries`` writes
    it, and whether ``engine`` can split the others."""
    entries = [] if loadings is None else list(edge_entries(graph, loadings, loadings.edges).values())
    return {**_shape(loadings, engine), "computable": engine is not None, "edges": entries}


def edge_heads(store: GraphStore, name: str, engine: Engine | None, body: dict) -> dict:
    """The loadings of the edge ``body`` names (``{source, target}``, node ids of the full graph): the stored
    ones when the folder holds them, else computed on the engine (blocking). ``stored`` says which."""
    source, target = (body.get(end) for end in ("source", "target"))
    for end, value in (("source", source), ("target", target)):
        if not isinstance(value, str):
            raise StoreError(f"{end} must be a node id")
    graph = store.full_graph(name)
    edge = find_edge(graph, source, target)
    loadings = store.head_loadings(name)
    stored = loadings is not None and edge in set(loadings.edges.tolist())
    if not stored:
        if engine is None:
            raise StoreError(NOT_STORED, 404)
        check_engine(engine, graph, name)
        node = int(edge_targets(graph, np.array([edge]))[0])
        if graph.kind[node] == NodeKind.TARGET and graph.index[node] < 0:
            raise StoreError(
                f"{target} is a target other than a single-token logit: the server cannot rebuild its "
                "read-out, so only stored loadings split its edges",
                409,
            )
        with engine.lock:
            loadings = head_loadings(engine.model, engine.transcoders, graph, [edge])
    entry = edge_entries(graph, loadings, np.array([edge]))[edge]
    return {**_shape(loadings, engine), **entry, "stored": stored}


def head_qk(
    store: GraphStore, name: str, engine: Engine | None, features: FeatureStore | None, body: dict
) -> dict:
    """A head at one (query, key) position pair of graph ``name`` (``body``: ``{layer, head, query, key,
    top?}``): its attention pattern on the prompt (``pattern``: row ``q`` holds the weights of keys 0 to
    ``q``), its score, the ``top`` strongest node pairs and nodes of each side, and their features' labels."""
    layer, head, query, key = (_whole(body, field) for field in SITE_FIELDS)
    top = body.get("top", DEFAULT_TOP)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise StoreError(f"top must be a whole number from 1 to {MAX_TOP}")
    if engine is None:
        raise StoreError(NO_MODEL, 404)
    graph = store.full_graph(name)
    check_engine(engine, graph, name)
    with engine.lock:
        result = qk_attribution(engine.model, engine.transcoders, graph, layer, head, query, key)
        pattern = attention_pattern(
            engine.model, graph_ids(engine.model, engine.transcoders, graph), layer, head
        )
    pairs = result.top_pairs(top)
    sides = {
        "query_nodes": _strongest(result.query_nodes, result.query_totals, top),
        "key_nodes": _strongest(result.key_nodes, result.key_totals, top),
    }
    shown = {node for pair in pairs for node in pair[:2]}
    shown |= {entry["id"] for nodes in sides.values() for entry in nodes}
    return {
        **_site_json(result),
        "pairs": [
            {"query": query_node, "key": key_node, "value": value} for query_node, key_node, value in pairs
        ],
        **sides,
        "labels": feature_labels(features, shown),
        "pattern": [
            [round(float(weight), PATTERN_DIGITS) for weight in row[: q + 1]] for q, row in enumerate(pattern)
        ],
    }


def edge_entries(graph: Graph, loadings: HeadLoadings, edges: np.ndarray) -> dict[int, dict]:
    """The split edges ``edges`` by index, each as ``{source, target, weight, remainder, heads}``: ``heads``
    lists ``[layer, head, loading]`` for every head that can carry the edge, summed over key positions, by
    decreasing ``|loading|``."""
    ids = node_ids(graph)
    mine = np.isin(loadings.edge, edges)
    keys = np.stack([loadings.edge[mine], loadings.layer[mine], loadings.head[mine]])
    unique, inverse = np.unique(keys, axis=1, return_inverse=True)
    values = np.bincount(inverse.reshape(-1), weights=loadings.value[mine], minlength=unique.shape[1])
    heads: dict[int, list] = {int(edge): [] for edge in edges}
    for column in np.lexsort((-np.abs(values), unique[0])).tolist():
        edge, layer, head = unique[:, column].tolist()
        heads[edge].append([layer, head, float(values[column])])
    rank = {int(edge): k for k, edge in enumerate(loadings.edges.tolist())}
    targets = edge_targets(graph, np.asarray(edges))
    return {
        int(edge): {
            "source": ids[int(graph.indices[edge])],
            "target": ids[int(target)],
            "weight": float(loadings.weight[rank[int(edge)]]),
            "remainder": float(loadings.remainder[rank[int(edge)]]),
            "heads": heads[int(edge)],
        }
        for edge, target in zip(np.asarray(edges).tolist(), targets.tolist(), strict=True)
    }


def find_edge(graph: Graph, source: str, target: str) -> int:
    """The index of the full graph's edge from node ``source`` to node ``target`` (ids); a one-line 400 error
    when either is no node, there is no such edge, or both ends sit at one position."""
    index = index_by_id(graph)
    for node in (source, target):
        if node not in index:
            raise StoreError(f"{node[:80]!r} is not a node of the full graph")
    start = int(graph.indptr[index[target]])
    hits = np.flatnonzero(graph.indices[start : graph.indptr[index[target] + 1]] == index[source])
    if not hits.size:
        raise StoreError(f"the full graph has no edge {source} \u2192 {target}")
    position = int(graph.position[index[target]])
    if int(graph.position[index[source]]) == position:
        raise StoreError(
            f"edge {source} \u2192 {target} is not cross-position: both nodes sit at position {position}, "
            "and only edges between positions run through attention heads"
        )
    return start + int(hits[0])


def check_engine(engine: Engine, graph: Graph, name: str) -> None:
    """A 409 error when graph ``name`` comes from another model, tokenizer or transcoder set than the
    engine's: its nodes would name other features, its tokens other words."""
    model = engine.model
    if graph.model_name and graph.model_name != model.name:
        raise StoreError(
            f"graph {name!r} was computed with model {graph.model_name!r}, but this server runs "
            f"{model.name!r}: its attention cannot be computed here",
            409,
        )
    if not graph.tokens or max(graph.tokens) >= model.d_vocab or min(graph.tokens) < 0:
        raise StoreError(f"graph {name!r} holds token ids this model does not have", 409)
    try:
        engine.transcoders.check_fingerprint(graph.info.get("transcoders_fingerprint"), f"graph {name!r}")
    except CircuitmapError as error:
        raise StoreError(f"{error}: its attention cannot be computed here", 409) from None


def attention_pattern(model: Model, ids: torch.Tensor, layer: int, head: int) -> np.ndarray:
    """Head ``head`` of layer ``layer``'s attention pattern ``[T, T]`` on token ids ``ids`` (query rows, key
    columns), from one forward pass of the model."""
    seen: dict[str, np.ndarray] = {}

    def tap(call: AttentionCall) -> None:
        if call.layer == layer:
            seen["pattern"] = call.pattern[0, head].detach().double().cpu().numpy()

    with attention_tap(model, tap):
        model.logits(ids)
    return seen["pattern"]


def feature_labels(features: FeatureStore | None, nodes: set[str]) -> dict[str, str]:
    """The current database label of each feature node among ``nodes`` that has one, by node id."""
    if features is None:
        return {}
    keys = {node: parse_feature_id(node)[:2] for node in nodes if is_feature_id(node)}
    known = {
        key for key in keys.values() if 0 <= key[0] < features.n_layers and 0 <= key[1] < features.d_features
    }
    labels = features.labels_of(sorted(known)) if known else {}
    return {node: labels[key].text for node, key in keys.items() if key in labels}


def _whole(body: dict, field: str) -> int:
    """Field ``field`` of ``body`` as a whole number, or a 400 error."""
    value = body.get(field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"{field} must be a whole number")
    return value


def _shape(loadings: HeadLoadings | None, engine: Engine | None) -> dict:
    """``n_layers`` and ``n_heads`` of the loadings, else of the engine's model (null without either)."""
    if loadings is not None:
        return {"n_layers": loadings.n_layers, "n_heads": loadings.n_heads}
    if engine is not None:
        return {"n_layers": engine.model.n_layers, "n_heads": n_attention_heads(engine.model)}
    return {"n_layers": None, "n_heads": None}


def _site_json(result: QKAttribution) -> dict:
    """Where a QK attribution looked and the score it split."""
    return {
        "layer": result.layer,
        "head": result.head,
        "query_position": result.query_position,
        "key_position": result.key_position,
        "score": result.score,
        "capped_score": result.capped_score,
    }


def _strongest(nodes: list[str], totals: np.ndarray, count: int) -> list[dict]:
    """The ``count`` nodes with the largest ``|total|``, as ``{id, value}``."""
    order = np.argsort(-np.abs(totals), kind="stable")[:count]
    return [{"id": nodes[k], "value": float(totals[k])} for k in order.tolist()]

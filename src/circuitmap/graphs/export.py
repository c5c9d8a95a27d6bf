"""Export a ``Graph`` as the attribution-graph JSON read by Neuronpedia and Anthropic's viewer.

The document has four parts; ``graph.schema.json`` beside this module is its JSON Schema (``json_schema()``).

- ``metadata``: ``slug`` (default: made from the prompt), ``scan`` (default: the model name; Neuronpedia reads
  it as a model id), ``prompt``, ``prompt_tokens``, ``node_threshold`` (the viewers' default for their node
  slider), ``schema_version`` 1, and circuitmap's additions: ``edge_threshold``, ``pruned``, ``model``,
  ``transcoders``, ``scores`` (replacement and completeness of the ``full`` graph and of the ``exported``
  part), ``n_nodes`` and ``n_edges`` (``full`` and ``exported``; ``n_edges`` also has ``pruned`` when the
  pruned graph has more edges than the document lists: see ``links``), and ``info`` (a copy of
  ``graph.info``).
- ``qParams``: the saved viewer state: ``pinnedIds``, ``supernodes`` (``[label, id, …]`` lists), ``linkType``
  "both", ``clickedId`` (the selected node, "" for none), ``sg_pos`` "", and circuitmap's optional ``view``
  (the explorer's ``nodeThreshold``, ``edgeThreshold``, ``showErrors``, ``showPositive``, ``showNegative``).
- ``nodes``: one object per exported node, in graph order (fields below).
- ``links``: ``{source, target, weight}`` per exported edge: ``weight`` is ``A[target, source]``, the direct
  effect of the source node on the target's input. A pruned document lists at most
  ``PruneConfig.document_links`` of the kept edges, those with the most influence-weighted flow, so that it
  opens fast; the scores are those of all kept edges, and the explorer serves the others on request.

Node fields, following circuit-tracer's schema-version-1 export, which Neuronpedia decodes:

- ``node_id``: the id from ``circuitmap.graphs.ids``. ``jsNodeId``: the same string. Anthropic's viewer keys
  nodes by ``jsNodeId`` and Neuronpedia by ``node_id``; one value for both keeps them unique (circuit-tracer's
  feature ``jsNodeId`` repeats across positions) and makes ``qParams`` ids resolve in either viewer.
- ``feature``: for features the Cantor pairing of (layer, feature index), ``(l + i)(l + i + 1)/2 + i``, from
  which Neuronpedia recovers both for schema version 1; -1 for error nodes; the position for token nodes; the
  token id for logit targets; ``-1 - ordinal`` (never a token id) for other targets.
- ``layer``: a string: the layer for features and errors, "E" for tokens, ``n_layers + 1`` for targets.
- ``ctx_idx``: the position. ``feature_type``: "cross layer transcoder" for every feature (per-layer
  transcoders too: the viewers know no other name), "mlp reconstruction error", "embedding" or "logit" (every
  target, token or not).
- ``clerp``: the label: ``labels`` argument by node id, else ``graph.labels``, else the token string for
  tokens and "" otherwise. Targets always read ``Output "<label or target name>" (p=<prob>)``: the viewers
  parse the probability out of a logit's clerp.
- ``influence``: for features and errors, the share of their total influence held by the candidates ranked
  above the node (by influence, ties in graph order): node pruning keeps the nodes whose share is below
  ``node_threshold`` (up to rounding), so the viewers' slider (show ``influence <= threshold``) reproduces
  it. Null for tokens and targets, which are never pruned.
- ``activation``: the feature activation, null for other nodes. ``token_prob``: the target's probability,
  0 for other nodes and for a target without a finite one. ``is_target_logit``: true for the target with
  the largest weight.
- circuitmap's additions, which the other viewers ignore: ``input_total`` on features and targets, the sum of
  ``|A[t, s]|`` over all of the node's incoming edges in the full graph (so an edge's share of its target's
  input is exact in a pruned export); ``target_weight`` on targets, their weight in influence; and ``lens``
  on features, added by ``circuitmap.features.add_logit_lens`` when a model is at hand:
  ``{"top": [[token, logit], …], "bottom": […]}``, the output tokens the feature's decoder promotes and
  suppresses.

Pinned nodes and supernode members must be nodes of the graph; supernode members are pinned too (the viewers
draw supernodes inside the pinned subgraph), and in a pruned export all of them are kept, with their edges to
other kept nodes, so the saved view never points at a missing node.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError, GraphExportError
from circuitmap.graphs import pruning
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import node_ids

SCHEMA_VERSION = 1
SCHEMA_FILE = "graph.schema.json"
FEATURE_TYPES = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.TOKEN: "embedding",
    NodeKind.TARGET: "logit",
}
_SLUG_LENGTH = 64


def json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of the documents ``graph_json`` builds; shipped as package data."""
    text = resources.files("circuitmap.graphs").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def export_graph_json(
    graph: Graph,
    path: str | Path,
    config: pruning.PruneConfig | None = None,
    *,
    slug: str | None = None,
    scan: str | None = None,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    prune: bool = True,
    pinned: Sequence[str] = (),
    supernodes: Sequence[Sequence[str]] = (),
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write the viewer JSON of ``graph`` (pruned unless ``prune=False``) atomically; return the path written.

    ``path`` is the file to write, or an existing folder, which receives ``<slug>.json``. The other arguments
    are those of ``graph_json``.
    """
    document = graph_json(
        graph,
        config,
        slug=slug,
        scan=scan,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        prune=prune,
        pinned=pinned,
        supernodes=supernodes,
        labels=labels,
    )
    return write_graph_json(document, path)


def write_graph_json(document: dict, path: str | Path) -> Path:
    """Write a document made by ``graph_json`` atomically (to ``path``, or ``<slug>.json`` in a folder)."""
    path = Path(path)
    if path.is_dir():
        name = f"{document['metadata']['slug']}.json"
        if Path(name).name != name or name.startswith("."):
            raise GraphExportError(f"slug {document['metadata']['slug']!r} cannot name a file in {path}")
        path = path / name
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise GraphExportError(f"graph info cannot be written as strict JSON: {exc}") from exc
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    return path


def graph_json(
    graph: Graph,
    config: pruning.PruneConfig | None = None,
    *,
    slug: str | None = None,
    scan: str | None = None,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    prune: bool = True,
    pinned: Sequence[str] = (),
    supernodes: Sequence[Sequence[str]] = (),
    labels: Mapping[str, str] | None = None,
    kept: pruning.PruneResult | None = None,
) -> dict:
    """The viewer document of ``graph`` as a dict (see the module docstring for every field).

    ``prune``: export the nodes and edges kept by ``pruning.prune`` with ``config`` (default
    ``PruneConfig()``; ``node_threshold`` and ``edge_threshold`` override it), or the whole graph; ``kept``:
    that pruning's result when the caller already has it.
    ``pinned``: node ids to pin. ``supernodes``: groups given as ``[label, id, …]``. ``labels``: clerps by
    node id, overriding ``graph.labels``.
    """
    config = (config or pruning.PruneConfig()).with_changes(
        node_threshold=node_threshold, edge_threshold=edge_threshold
    )
    try:
        config.check()
    except CircuitmapError as error:
        raise GraphExportError(str(error)) from None
    if not np.all(np.isfinite(graph.weights)):
        raise GraphExportError("graph has non-finite edge weights: it cannot be pruned or written as JSON")
    ids = node_ids(graph)
    index_of = {identifier: node for node, identifier in enumerate(ids)}
    labels = dict(labels or {})
    groups = _checked_supernodes(supernodes, index_of)
    members = [member for group in groups for member in group[1:]]
    pinned_ids = list(dict.fromkeys([*_checked_ids("pinned", pinned, index_of), *members]))
    _checked_ids("labels", list(labels), index_of)

    if prune:
        kept = kept or pruning.prune(graph, config)
        node_mask, edge_mask, influence = kept.node_mask, kept.edge_mask, kept.influence
        node_mask, edge_mask = _with_forced(graph, node_mask, edge_mask, [index_of[i] for i in pinned_ids])
    else:
        node_mask = np.ones(graph.n_nodes, dtype=bool)
        edge_mask = np.ones(graph.n_edges, dtype=bool)
        influence = pruning.node_influence(graph)
    full_scores = pruning.graph_scores(graph)
    exported_scores = pruning.graph_scores(graph, node_mask, edge_mask) if prune else full_scores

    edges = np.flatnonzero(edge_mask)
    shares = _influence_shares(graph, influence)
    targets = graph.nodes_of(NodeKind.TARGET)
    top_target = int(targets[np.argmax(graph.target_weight[targets])]) if len(targets) else -1
    input_totals = pruning.input_totals(graph)
    kept_edges = len(edges)
    if prune and kept_edges > config.document_links:
        rows = graph.rows_of(edges)
        flow = np.abs(graph.weights[edges]).astype(np.float64) / input_totals[rows]
        strongest = np.argsort(-(flow * influence[rows]), kind="stable")[: config.document_links]
        edges = np.sort(edges[strongest])
    nodes = [
        _node_json(graph, node, ids[node], labels, shares[node], node == top_target)
        | _additions(graph, node, input_totals[node])
        for node in np.flatnonzero(node_mask).tolist()
    ]
    links = [
        {"source": ids[source], "target": ids[target], "weight": float(weight)}
        for source, target, weight in zip(
            graph.indices[edges].tolist(),
            graph.rows_of(edges).tolist(),
            graph.weights[edges].tolist(),
            strict=True,
        )
    ]
    metadata = {
        "slug": slug if slug is not None else prompt_slug(graph.prompt),
        "scan": scan if scan is not None else graph.model_name,
        "prompt": graph.prompt,
        "prompt_tokens": list(graph.token_strings),
        "node_threshold": float(config.node_threshold),
        "edge_threshold": float(config.edge_threshold),
        "schema_version": SCHEMA_VERSION,
        "pruned": bool(prune),
        "model": graph.model_name,
        "transcoders": graph.transcoders_name,
        "scores": {"full": full_scores.as_json(), "exported": exported_scores.as_json()},
        "n_nodes": {"full": graph.n_nodes, "exported": len(nodes)},
        "n_edges": {"full": graph.n_edges, "exported": len(links)}
        | ({"pruned": kept_edges} if kept_edges > len(links) else {}),
        "info": graph.info,
    }
    q_params = {
        "pinnedIds": pinned_ids,
        "supernodes": groups,
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def document_links(graph: Graph, document: dict) -> list[dict]:
    """Every kept edge among a viewer document's nodes, in the ``links`` form, including those a pruned
    document leaves out for size: the edges ``graph_json`` kept for the document's thresholds (and, for
    nodes the document holds beyond pruning, their edges to other nodes of the document)."""
    ids = node_ids(graph)
    index_of = {identifier: node for node, identifier in enumerate(ids)}
    unknown = [node["node_id"] for node in document["nodes"] if node["node_id"] not in index_of]
    if unknown:
        raise GraphExportError(f"the document's node {unknown[0]!r} is not in the graph")
    in_document = np.zeros(graph.n_nodes, dtype=bool)
    in_document[[index_of[node["node_id"]] for node in document["nodes"]]] = True
    metadata = document["metadata"]
    if metadata.get("pruned", True):
        config = pruning.PruneConfig(
            node_threshold=metadata["node_threshold"], edge_threshold=metadata["edge_threshold"]
        )
        kept = pruning.prune(graph, config)
        extra = np.flatnonzero(in_document & ~kept.node_mask).tolist()
        _, edge_mask = _with_forced(graph, kept.node_mask, kept.edge_mask, extra)
        edges = np.flatnonzero(edge_mask)
    else:
        edges = graph.edges_of(np.flatnonzero(in_document))
    rows = graph.rows_of(edges)
    edges, rows = _between(graph, in_document, edges, rows)
    return [
        {"source": ids[source], "target": ids[target], "weight": float(weight)}
        for source, target, weight in zip(
            graph.indices[edges].tolist(), rows.tolist(), graph.weights[edges].tolist(), strict=True
        )
    ]


def _between(
    graph: Graph, nodes: np.ndarray, edges: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The edges among ``edges`` (with their ``rows``) whose two ends are in the node mask ``nodes``."""
    inside = nodes[rows] & nodes[graph.indices[edges]]
    return edges[inside], rows[inside]


def cantor_pair(layer: int, index: int) -> int:
    """The ``feature`` number of a feature node: the Cantor pairing of its layer and feature index, unique
    over the whole transcoder set (circuit-tracer's convention, inverted by Neuronpedia for schema 1)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def _checked_ids(what: str, ids: Sequence[str], index_of: Mapping[str, int]) -> list[str]:
    """``ids`` as a list, if every one is a node id of the graph."""
    if isinstance(ids, str):
        raise GraphExportError(f"{what} must be a sequence of node ids, not the string {ids!r}")
    unknown = [identifier for identifier in ids if identifier not in index_of]
    if unknown:
        raise GraphExportError(f"{what}: unknown node ids {', '.join(map(repr, unknown[:5]))}")
    return list(ids)


def _checked_supernodes(supernodes: Sequence[Sequence[str]], index_of: Mapping[str, int]) -> list[list[str]]:
    """Supernodes as ``[label, id, …]`` lists: a string label, then at least one node id of the graph."""
    if isinstance(supernodes, str):
        raise GraphExportError("supernodes must be a sequence of [label, id, …] groups, not a string")
    groups = []
    for group in supernodes:
        if isinstance(group, str) or len(group) < 2 or not isinstance(group[0], str):
            raise GraphExportError(f"supernode {group!r} must be [label, id, …] with at least one node id")
        groups.append([group[0], *_checked_ids(f"supernode {group[0]!r}", list(group[1:]), index_of)])
    return groups


def _with_forced(
    graph: Graph, node_mask: np.ndarray, edge_mask: np.ndarray, forced: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Add the ``forced`` nodes to a pruned node set, with their edges to other kept nodes."""
    if not forced:
        return node_mask, edge_mask
    node_mask = node_mask.copy()
    node_mask[forced] = True
    touches = np.isin(graph.indices, forced)
    touches[graph.edges_of(np.unique(forced))] = True
    candidates = np.flatnonzero(edge_mask | touches)
    live, _ = _between(graph, node_mask, candidates, graph.rows_of(candidates))
    forced_mask = np.zeros(graph.n_edges, dtype=bool)
    forced_mask[live] = True
    return node_mask, forced_mask


def _influence_shares(graph: Graph, influence: np.ndarray) -> np.ndarray:
    """Per feature and error node, the share of their summed influence held by those ranked above it (the
    order and tail sums ``pruning.prune`` uses); NaN for tokens and targets."""
    shares = np.full(graph.n_nodes, np.nan)
    candidates = np.flatnonzero((graph.kind == NodeKind.FEATURE) | (graph.kind == NodeKind.ERROR))
    values = influence[candidates]
    order = np.argsort(-values, kind="stable")
    from_here = np.cumsum(values[order[::-1]])[::-1]
    total = values.sum()
    above = 1.0 - from_here / total if total > 0 else np.ones(len(order))
    shares[candidates[order]] = np.clip(above, 0.0, 1.0)
    return shares


def _node_json(
    graph: Graph, node: int, identifier: str, labels: Mapping[str, str], share: float, is_top_target: bool
) -> dict:
    """One entry of ``nodes`` (see the module docstring)."""
    kind = NodeKind(int(graph.kind[node]))
    layer, position, index = int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])
    label = labels.get(identifier, graph.labels.get(node))
    token_prob = 0.0
    if kind == NodeKind.FEATURE:
        feature, layer_name, clerp = cantor_pair(layer, index), str(layer), label or ""
    elif kind == NodeKind.ERROR:
        feature, layer_name, clerp = -1, str(layer), label or ""
    elif kind == NodeKind.TOKEN:
        token_string = graph.token_strings[position]
        feature, layer_name, clerp = position, "E", token_string if label is None else label
    else:
        ordinal = node - int(graph.nodes_of(NodeKind.TARGET)[0])
        token_prob = float(np.nan_to_num(graph.target_probs[ordinal], nan=0.0, posinf=0.0, neginf=0.0))
        name = graph.target_names[ordinal] if label is None else label
        feature = index if index >= 0 else -1 - ordinal
        layer_name, clerp = str(graph.n_layers + 1), f'Output "{name}" (p={token_prob:.3f})'
    activation = float(graph.activation[node]) if kind == NodeKind.FEATURE else None
    if activation is not None and not math.isfinite(activation):
        raise GraphExportError(f"feature {identifier} has a non-finite activation {activation}")
    return {
        "node_id": identifier,
        "feature": feature,
        "layer": layer_name,
        "ctx_idx": position,
        "feature_type": FEATURE_TYPES[kind],
        "jsNodeId": identifier,
        "clerp": clerp,
        "influence": float(share) if math.isfinite(share) else None,
        "activation": activation,
        "token_prob": token_prob,
        "is_target_logit": is_top_target,
    }


def _additions(graph: Graph, node: int, input_total: float) -> dict:
    """circuitmap's extra fields: ``input_total`` on features and targets, ``target_weight`` on targets."""
    kind = NodeKind(int(graph.kind[node]))
    extra: dict = {}
    if kind in (NodeKind.FEATURE, NodeKind.TARGET):
        extra["input_total"] = float(input_total)
    if kind == NodeKind.TARGET:
        extra["target_weight"] = float(graph.target_weight[node])
    return extra


def prompt_slug(prompt: str) -> str:
    """A URL- and file-safe slug of the prompt: ASCII letters and digits joined by dashes, at most 64 long."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:_SLUG_LENGTH].rstrip("-") or "graph"

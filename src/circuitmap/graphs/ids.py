"""Node ids used in exported JSON: unique by construction, and readable.

- feature: ``{layer}_{feature}_{position}`` (layer < n_layers)
- error node: ``err_{layer}_{position}``
- token: ``E_{token_id}_{position}``
- logit target: ``{n_layers + 1}_{token_id}_{position}`` (a layer no feature has)
- other target (logit difference, named direction): ``T_{ordinal}_{position}``, ordinal among targets

The reference implementation gave error nodes feature-like ids that could collide with real features; the
prefixes here cannot collide with each other or with the numeric feature and logit ids.
"""

from __future__ import annotations

import re

from circuitmap.graphs.graph import Graph, NodeKind

_PATTERNS = {
    NodeKind.FEATURE: re.compile(r"^(\d+)_(\d+)_(\d+)$"),
    NodeKind.ERROR: re.compile(r"^err_(\d+)_(\d+)$"),
    NodeKind.TOKEN: re.compile(r"^E_(\d+)_(\d+)$"),
    NodeKind.TARGET: re.compile(r"^T_(\d+)_(\d+)$"),
}


def node_id(graph: Graph, node: int) -> str:
    """The id of ``node`` (an index into the graph's node arrays)."""
    kind = NodeKind(int(graph.kind[node]))
    position = int(graph.position[node])
    if kind == NodeKind.FEATURE:
        return f"{int(graph.layer[node])}_{int(graph.index[node])}_{position}"
    if kind == NodeKind.ERROR:
        return f"err_{int(graph.layer[node])}_{position}"
    if kind == NodeKind.TOKEN:
        return f"E_{int(graph.index[node])}_{position}"
    if graph.index[node] >= 0:
        return f"{graph.n_layers + 1}_{int(graph.index[node])}_{position}"
    ordinal = node - int(graph.nodes_of(NodeKind.TARGET)[0])
    return f"T_{ordinal}_{position}"


def node_ids(graph: Graph) -> list[str]:
    """Ids of all nodes, in graph order."""
    return [node_id(graph, node) for node in range(graph.n_nodes)]


def index_by_id(graph: Graph) -> dict[str, int]:
    """Map from node id to node index."""
    return {identifier: node for node, identifier in enumerate(node_ids(graph))}

"""Node ids used in exported JSON, by interventions and on the command line: one grammar, readable and unique.

- feature: ``{layer}_{feature}_{position}`` (layer < n_layers); as an edit target the position may be ``*``,
  every position;
- error node: ``err_{layer}_{position}``
- token: ``E_{token_id}_{position}``
- logit target: ``{n_layers + 1}_{token_id}_{position}`` (a layer no feature has)
- other target (logit difference, named direction): ``T_{ordinal}_{position}``, ordinal among targets

The reference implementation gave error nodes feature-like ids that could collide with real features; the
prefixes here cannot collide with each other or with the numeric feature and logit ids. The explorer's
``parseNodeId`` (``server/static/explorer-data.js``) reads the same grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind

EVERY_POSITION = "*"
_SPACE = " \t\n\r"
_NUMERIC = re.compile(r"^([0-9]+)_([0-9]+)_([0-9]+|\*)$")
_PREFIXED = {
    "err": (NodeKind.ERROR, re.compile(r"^err_([0-9]+)_([0-9]+)$")),
    "E": (NodeKind.TOKEN, re.compile(r"^E_([0-9]+)_([0-9]+)$")),
    "T": (NodeKind.TARGET, re.compile(r"^T_([0-9]+)_([0-9]+)$")),
}


@dataclass(frozen=True)
class NodeRef:
    """What a node id says: its kind, layer (features, errors, logit targets), index (feature index, token
    id, or ordinal of a non-logit target) and position (None: every position, for feature edits only)."""

    kind: NodeKind
    layer: int | None
    index: int | None
    position: int | None


def feature_id(layer: int, index: int, position: int | None) -> str:
    """The id of a feature at ``position`` (None: the ``*`` form, every position)."""
    return f"{layer}_{index}_{EVERY_POSITION if position is None else position}"


def parse_node_id(text: str, n_layers: int | None = None) -> NodeRef:
    """Read a node id. A numeric id is a feature unless its layer is ``n_layers + 1`` (a logit target); only
    a feature may have the ``*`` position. A one-line error for anything else."""
    if isinstance(text, str):
        match = _NUMERIC.match(text.strip(_SPACE))
        if match is not None:
            layer, index, position = match.groups()
            kind = (
                NodeKind.TARGET if n_layers is not None and int(layer) == n_layers + 1 else NodeKind.FEATURE
            )
            if position == EVERY_POSITION and kind != NodeKind.FEATURE:
                raise CircuitmapError(f"{text!r}: only a feature id may name every position with '*'")
            return NodeRef(
                kind, int(layer), int(index), None if position == EVERY_POSITION else int(position)
            )
        prefix = text.strip(_SPACE).split("_", 1)[0]
        if prefix in _PREFIXED:
            kind, pattern = _PREFIXED[prefix]
            match = pattern.match(text.strip(_SPACE))
            if match is not None:
                first, position = (int(part) for part in match.groups())
                layer = first if kind == NodeKind.ERROR else None
                index = None if kind == NodeKind.ERROR else first
                return NodeRef(kind, layer, index, position)
    raise CircuitmapError(
        f"{text!r} is not a node id: features are layer_index_position (e.g. 7_960_4, or 7_960_* for every "
        "position), error nodes err_layer_position, tokens E_token_position, other targets T_ordinal_position"
    )


def parse_feature_id(text: str) -> tuple[int, int, int | None]:
    """``(layer, index, position)`` of a feature id (position None for ``*``); a one-line error otherwise."""
    ref = parse_node_id(text)
    if ref.kind != NodeKind.FEATURE:
        raise CircuitmapError(f"{text!r} is not a feature node id (layer_index_position, e.g. 7_960_4)")
    return ref.layer, ref.index, ref.position


def is_feature_id(text: str) -> bool:
    """Whether ``text`` reads as a feature id (``*`` position included)."""
    return isinstance(text, str) and _NUMERIC.match(text.strip(_SPACE)) is not None


def node_id(graph: Graph, node: int) -> str:
    """The id of ``node`` (an index into the graph's node arrays)."""
    kind = NodeKind(int(graph.kind[node]))
    position = int(graph.position[node])
    if kind == NodeKind.FEATURE:
        return feature_id(int(graph.layer[node]), int(graph.index[node]), position)
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

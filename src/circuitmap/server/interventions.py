"""Interventions from the explorer: edits of a stored graph's feature nodes, run on the server's engine.

A request names graph nodes; only feature nodes of that graph can be edited (error nodes, tokens and outputs
are refused by name). The prompt is the graph's own: its token ids from the full graph when it was kept, else
its prompt text tokenised again; either way the engine's tokens must read as the graph's, and the graph must
come from the engine's model, or the node ids would name other features. The answer holds the next-token
probabilities before and after the edits and the greedy continuation of each. Open-loop edits recompute
attention, as generation must, so the edited top token is the continuation's first; constrained edits freeze
it, and their continuation still runs open loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError, StoreError
from circuitmap.graphs.export import FEATURE_TYPES
from circuitmap.graphs.graph import NodeKind
from circuitmap.interventions import FeatureEdit, Supernode, generate_with, intervene
from circuitmap.interventions.edits import OPERATIONS
from circuitmap.interventions.intervene import MODES
from circuitmap.server.jobs import Engine
from circuitmap.server.store import MAX_IDS, MAX_LABEL, GraphStore
from circuitmap.validation import check_text

MAX_EDITS = 64
DEFAULT_NEW_TOKENS = 20
MAX_NEW_TOKENS = 200
TOP_TOKENS = 10
_FEATURE = FEATURE_TYPES[NodeKind.FEATURE]
_NOT_EDITABLE = {
    FEATURE_TYPES[NodeKind.ERROR]: "an error node",
    FEATURE_TYPES[NodeKind.TOKEN]: "a token",
    FEATURE_TYPES[NodeKind.TARGET]: "an output (logit) node",
}


@dataclass(frozen=True)
class InterventionRequest:
    """The checked body of an intervention request."""

    edits: list[FeatureEdit]
    max_new_tokens: int
    mode: str


def run_on_graph(store: GraphStore, name: str, engine: Engine, body: dict) -> dict:
    """Check ``body`` against graph ``name`` and run its edits under the engine's lock (blocking)."""
    document, _ = store.document(name)
    if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
        raise StoreError(f"graph {name!r} is not a viewer document (no metadata)", 422)
    request = parse_request(body, _node_types(document, name))
    info = document["metadata"].get("info")
    try:
        engine.transcoders.check_fingerprint(
            info.get("transcoders_fingerprint") if isinstance(info, dict) else None, f"graph {name!r}"
        )
    except CircuitmapError as error:
        raise StoreError(f"{error}: its feature nodes cannot be edited here", 409) from None
    ids = prompt_ids(store, name, document, engine)
    with engine.lock:
        return run_edits(engine, ids, request)


def parse_request(body: dict, node_types: dict[str, str]) -> InterventionRequest:
    """The edits, continuation length and mode of ``body``, each checked; ``node_types`` maps the graph's
    node ids to their ``feature_type``."""
    unknown = set(body) - {"edits", "max_new_tokens", "mode"}
    if unknown:
        raise StoreError(f"unknown fields: {', '.join(sorted(unknown))}")
    edits = body.get("edits")
    if not isinstance(edits, list) or not edits:
        raise StoreError("edits must be a non-empty list of {nodes, operation, value} objects")
    if len(edits) > MAX_EDITS:
        raise StoreError(f"{len(edits)} edits; at most {MAX_EDITS} are allowed")
    max_new_tokens = body.get("max_new_tokens", DEFAULT_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise StoreError("max_new_tokens must be a whole number")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise StoreError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}")
    mode = body.get("mode", "open_loop")
    if mode not in MODES:
        raise StoreError(f"unknown mode {str(mode)[:40]!r}; use {' or '.join(MODES)}")
    return InterventionRequest(
        [_edit(k, edit, node_types) for k, edit in enumerate(edits)], max_new_tokens, mode
    )


def _edit(k: int, edit, node_types: dict[str, str]) -> FeatureEdit:
    """Edit number ``k`` of a request as a ``FeatureEdit`` on one node or on a named group of nodes."""
    where = f"edit {k + 1}"
    if not isinstance(edit, dict):
        raise StoreError(f"{where} must be an object with nodes, operation and value")
    unknown = set(edit) - {"nodes", "operation", "value", "name"}
    if unknown:
        raise StoreError(f"{where}: unknown fields: {', '.join(sorted(unknown))}")
    nodes, operation, value, name = (edit.get(key) for key in ("nodes", "operation", "value", "name"))
    if not isinstance(nodes, list) or not all(isinstance(node, str) for node in nodes):
        raise StoreError(f"{where}: nodes must be a list of node ids")
    if len(nodes) > MAX_IDS:
        raise StoreError(f"{where}: {len(nodes)} nodes; at most {MAX_IDS} are allowed")
    if not nodes:
        raise StoreError(f"{where}: the supernode has no nodes")
    seen: set[str] = set()
    for node in nodes:
        if node in seen:
            raise StoreError(f"{where}: node {node!r} is listed twice")
        seen.add(node)
    for node in nodes:
        kind = node_types.get(node)
        if kind is None:
            raise StoreError(f"{where}: {node[:80]!r} is not a node of this graph")
        if kind != _FEATURE:
            what = _NOT_EDITABLE.get(kind, f"a {kind!r} node")
            raise StoreError(f"{where}: {node} is {what}; only feature nodes can be edited")
    if operation not in OPERATIONS:
        raise StoreError(f"{where}: unknown operation {str(operation)[:40]!r}; use {', '.join(OPERATIONS)}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(_float(value)):
        raise StoreError(f"{where}: the value must be a finite number")
    if name is not None:
        check_text(f"{where}: the name", name, max_length=MAX_LABEL)
    target = nodes[0] if name is None and len(nodes) == 1 else Supernode(name or "supernode", nodes)
    return FeatureEdit(target, operation, float(value))


def _float(value: int | float) -> float:
    """``value`` as a float; infinity for an integer too large for one."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _node_types(document: dict, name: str) -> dict[str, str]:
    """Node id → ``feature_type`` of every node of the document."""
    nodes = document.get("nodes")
    try:
        return {node["node_id"]: node["feature_type"] for node in nodes}
    except (KeyError, TypeError):
        raise StoreError(f"graph {name!r} is not a viewer document: its nodes are malformed", 422) from None


def prompt_ids(store: GraphStore, name: str, document: dict, engine: Engine) -> torch.Tensor:
    """The graph's prompt as token ids ``[1, T]``, checked to come from the engine's model and tokenizer."""
    metadata = document["metadata"]
    model = engine.model
    computed_with = metadata.get("model")
    if isinstance(computed_with, str) and computed_with and computed_with != model.name:
        raise StoreError(
            f"graph {name!r} was computed with model {computed_with!r}, but this server runs {model.name!r}: "
            "its feature nodes cannot be edited here",
            409,
        )
    if store.summary(name).exact_scores:
        tokens = store.full_graph(name).tokens
        if not tokens or max(tokens) >= model.d_vocab or min(tokens) < 0:
            raise StoreError(f"graph {name!r} holds token ids this model does not have", 409)
        ids = torch.tensor([tokens], device=model.device)
    else:
        prompt = metadata.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise StoreError(f"graph {name!r} has no prompt", 422)
        ids = model.encode(prompt)
    expected = metadata.get("prompt_tokens")
    if isinstance(expected, list) and model.token_strings(ids) != expected:
        raise StoreError(
            f"the prompt of graph {name!r} does not tokenise as it did when the graph was computed: "
            "it was made with another tokenizer",
            409,
        )
    return ids


def run_edits(engine: Engine, ids: torch.Tensor, request: InterventionRequest) -> dict:
    """The intervention's JSON (``InterventionResult.as_json``) with the greedy continuations before and
    after the edits."""
    model, transcoders = engine.model, engine.transcoders
    constrained = request.mode == "constrained"
    result = intervene(
        model,
        transcoders,
        ids,
        request.edits,
        mode=request.mode,
        freeze_attention=constrained,
        top_k=TOP_TOKENS,
    )
    n = request.max_new_tokens
    return {
        **result.as_json(),
        "continuation_before": generate_with(model, transcoders, ids, [], n),
        "continuation_after": generate_with(model, transcoders, ids, request.edits, n),
    }

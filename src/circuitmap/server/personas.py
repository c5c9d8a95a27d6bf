"""Persona vectors in the explorer: project prompts and graph nodes on them, and steer with them.

The server loads its vectors at start-up (``serve --persona FILE``, checked against the engine's model) and
names each by its file's stem. A vector's default layer is the best layer of the steering sweep recorded in
its file, else the middle layer. Every computation runs on the engine's model under its lock:

- a prompt (a user turn in the chat template) is projected on the vector's unit direction at a layer: at
  its last token, and at every token of a response when one is given (``circuitmap.persona.project``);
- a greedy continuation of the prompt is generated unsteered and steered along the vector (every position,
  the coefficient a multiple of the layer's typical residual norm unless ``relative`` is false);
- a graph's feature nodes are projected at a layer ``L``: a feature of a layer below ``L`` adds its
  activation times its write into the residual entering ``L`` (``persona.features.residual_writes``), and the
  projection is that addition dotted with the unit direction. Features of layer ``L`` and later write after
  that residual and have none. The graph must come from the engine's transcoder set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from circuitmap.errors import CircuitmapError, StoreError
from circuitmap.graphs.export import FEATURE_TYPES
from circuitmap.graphs.graph import NodeKind
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.models import Model
from circuitmap.persona import PersonaVector, chat_ids, load_persona_vector, project, steer
from circuitmap.persona.features import residual_writes
from circuitmap.persona.runs import read_residuals
from circuitmap.persona.steer import unit_direction
from circuitmap.server.jobs import MAX_PROMPT, Engine
from circuitmap.server.store import GraphStore
from circuitmap.validation import check_number, check_text

DEFAULT_NEW_TOKENS = 20
MAX_NEW_TOKENS = 200
_FEATURE = FEATURE_TYPES[NodeKind.FEATURE]


def load_personas(paths: Sequence[str | Path], model: Model) -> dict[str, PersonaVector]:
    """The persona vectors in ``paths``, each checked against ``model`` and named by its file's stem."""
    vectors: dict[str, PersonaVector] = {}
    for path in map(Path, paths):
        if path.stem in vectors:
            raise CircuitmapError(f"two persona vector files are named {path.stem!r}: rename one")
        vectors[path.stem] = load_persona_vector(path, model)
    return vectors


def default_layer(vector: PersonaVector) -> int:
    """The best layer of the sweep recorded in the vector's file, else the middle layer."""
    sweep = vector.info.get("sweep")
    best = sweep.get("best") if isinstance(sweep, dict) else None
    layer = best.get("layer") if isinstance(best, dict) else None
    if isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < vector.n_layers:
        return layer
    return vector.n_layers // 2


class Personas:
    """The server's persona vectors by name, and what the explorer asks of them (module docstring)."""

    def __init__(self, vectors: Mapping[str, PersonaVector], engine: Engine):
        for name, vector in vectors.items():
            vector.check_model(engine.model, f"persona vector {name!r}")
        self.vectors = dict(vectors)
        self.engine = engine

    def summaries(self) -> list[dict]:
        """Name, trait, layer count and default layer of every vector."""
        return [
            {
                "name": name,
                "trait": vector.info.get("trait"),
                "n_layers": vector.n_layers,
                "layer": default_layer(vector),
            }
            for name, vector in self.vectors.items()
        ]

    def get(self, name: str) -> PersonaVector:
        """Vector ``name``, or a 404 naming those there are."""
        if name not in self.vectors:
            loaded = ", ".join(self.vectors) or "none"
            raise StoreError(f"no persona vector named {name[:80]!r} (loaded: {loaded})", 404)
        return self.vectors[name]

    def project(self, name: str, body: dict) -> dict:
        """The projections of ``body``'s prompt (and response) on vector ``name`` (blocking)."""
        vector = self.get(name)
        _check_fields(body, {"prompt", "response", "layer"})
        prompt = check_text("the prompt", body.get("prompt"), max_length=MAX_PROMPT)
        response = body.get("response")
        if response is not None:
            check_text("the response", response, max_length=MAX_PROMPT)
        layer = _layer(body.get("layer"), vector)
        model = self.engine.model
        with self.engine.lock:
            if response is not None:
                found = project(model, vector, layer, prompt, response)
                return {
                    "tokens": found.tokens,
                    "values": found.per_token.tolist(),
                    "last_prompt": found.last_prompt,
                    "mean": found.mean,
                }
            unit = unit_direction(model, vector, layer)
            ids = chat_ids(model, prompt)
            [(_, residual)] = read_residuals(model, [(ids, ids[:0])], progress=False)
            last = float(residual[layer, 0].double() @ unit)
        return {"tokens": [], "values": [], "last_prompt": last, "mean": None}

    def steer(self, name: str, body: dict) -> dict:
        """The greedy continuations of ``body``'s prompt without and with steering along ``name``
        (blocking)."""
        vector = self.get(name)
        _check_fields(body, {"prompt", "layer", "coefficient", "relative", "max_new_tokens"})
        prompt = check_text("the prompt", body.get("prompt"), max_length=MAX_PROMPT)
        layer = _layer(body.get("layer"), vector)
        coefficient = float(check_number("the coefficient", body.get("coefficient")))
        relative = body.get("relative", True)
        if not isinstance(relative, bool):
            raise StoreError("relative must be true or false")
        requested = body.get("max_new_tokens", DEFAULT_NEW_TOKENS)
        new_tokens = int(check_number("max_new_tokens", requested, low=1, high=MAX_NEW_TOKENS, whole=True))
        model = self.engine.model
        with self.engine.lock:
            ids = chat_ids(model, prompt)
            unsteered = model.generate(ids, new_tokens)
            with steer(model, vector, layer, coefficient, relative=relative, prompt=ids) as handle:
                steered = model.generate(ids, new_tokens, before_forward=handle.at_position)
        return {"unsteered": unsteered, "steered": steered}

    def graph_projections(self, store: GraphStore, graph: str, name: str, layer_text: str | None) -> dict:
        """The projection of every feature node of ``graph`` below the layer (``layer_text``, default the
        vector's) on vector ``name`` (blocking)."""
        vector = self.get(name)
        layer = default_layer(vector) if layer_text is None else _layer_text(layer_text, vector)
        document, _ = store.document(graph)
        if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
            raise StoreError(f"graph {graph!r} is not a viewer document (no metadata)", 422)
        transcoders = self.engine.transcoders
        info = document["metadata"].get("info")
        try:
            transcoders.check_fingerprint(
                info.get("transcoders_fingerprint") if isinstance(info, dict) else None, f"graph {graph!r}"
            )
        except CircuitmapError as error:
            raise StoreError(f"{error}: its features cannot be projected here", 409) from None
        by_layer = _features_below(document, graph, layer, transcoders.n_layers, transcoders.d_features)
        values: dict[str, float] = {}
        with self.engine.lock:
            unit = unit_direction(self.engine.model, vector, layer)
            for source, features in sorted(by_layer.items()):
                ids, indices, activations = zip(*features, strict=True)
                writes = residual_writes(transcoders, source, layer)
                chosen = writes[torch.tensor(indices, device=writes.device)].detach().to("cpu", torch.float64)
                projected = torch.tensor(activations, dtype=torch.float64) * (chosen @ unit)
                values.update(zip(ids, projected.tolist(), strict=True))
        return {"layer": layer, "values": values}


def _check_fields(body: dict, fields: set[str]) -> None:
    unknown = set(body) - fields
    if unknown:
        raise StoreError(f"unknown fields: {', '.join(sorted(unknown))}")


def _layer(value: object, vector: PersonaVector) -> int:
    """A body's ``layer``: the vector's default when absent, else a layer the vector has."""
    if value is None:
        return default_layer(vector)
    return int(check_number("the layer", value, low=0, high=vector.n_layers - 1, whole=True))


def _layer_text(text: str, vector: PersonaVector) -> int:
    """The ``layer`` query parameter: a layer the vector has."""
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise StoreError(f"the layer must be a whole number, got {text[:40]!r}")
    return _layer(int(text), vector)


def _features_below(
    document: dict, graph: str, layer: int, n_layers: int, d_features: int
) -> dict[int, list[tuple[str, int, float]]]:
    """The document's feature nodes of layers below ``layer`` as ``(node id, feature, activation)`` by
    layer; a 422 for a malformed node, a 409 for a feature the transcoder set lacks."""
    nodes = document.get("nodes")
    if not isinstance(nodes, list) or not all(isinstance(node, dict) for node in nodes):
        raise StoreError(f"graph {graph!r} is not a viewer document: its nodes are malformed", 422)
    found: dict[int, list[tuple[str, int, float]]] = {}
    for node in nodes:
        if node.get("feature_type") != _FEATURE:
            continue
        identifier, value = node.get("node_id"), node.get("activation")
        try:
            source, feature, _ = parse_feature_id(identifier)
        except CircuitmapError:
            raise StoreError(f"graph {graph!r} has a feature node with a malformed id", 422) from None
        try:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            activation = float(value) if number else math.nan
        except OverflowError:
            activation = math.inf
        if not math.isfinite(activation):
            raise StoreError(f"graph {graph!r}: feature {identifier} has no finite activation", 422)
        if source >= n_layers or feature >= d_features:
            raise StoreError(
                f"graph {graph!r} has feature {identifier}, which this server's transcoder set lacks", 409
            )
        if source < layer:
            found.setdefault(source, []).append((identifier, feature, activation))
    return found

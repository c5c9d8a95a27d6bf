"""The explorer with persona vectors: an engine on the tiny chat model, random vector files, and a graph
computed on that engine."""

from __future__ import annotations

from pathlib import Path

import torch

from circuitmap.attribution import attribute
from circuitmap.graphs.export import graph_json
from circuitmap.persona import PersonaVector
from circuitmap.persona.vectors import model_fingerprint
from circuitmap.server import Engine
from helpers.graphs import write_graph_folder
from helpers.persona import chat_model
from helpers.transcoders import random_transcoders

N_LAYERS = 4
GRAPH_PROMPT = "The cat sat"


def persona_engine(kind: str = "plt-topk-skip") -> Engine:
    """An engine on the tiny float64 chat model (4 layers, a chat template) with random transcoders."""
    model = chat_model(n_layers=N_LAYERS, dtype=torch.float64)
    transcoders = random_transcoders(kind, N_LAYERS, model.d_model).to(dtype=torch.float64)
    return Engine(model, transcoders, model_spec="tiny-chat", transcoders_spec=kind)


def write_vector(folder: Path, name: str, model, *, seed: int, best_layer: int | None = None) -> Path:
    """A random persona vector of ``model`` saved as ``folder/name.safetensors`` (trait ``name``), with a
    sweep whose best point is at ``best_layer`` when given."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(model.n_layers, model.d_model, generator=generator)
    info = {**model_fingerprint(model), "trait": name}
    if best_layer is not None:
        info["sweep"] = {"best": {"layer": best_layer, "coefficient": 1.0}}
    return PersonaVector(directions, info).save(folder / f"{name}.safetensors")


def write_persona_graph(root: Path, engine: Engine, *, prune: bool = False) -> tuple[Path, dict]:
    """A graph folder holding graph ``cat`` of ``GRAPH_PROMPT`` on the engine, and its document: every node
    kept (so that every layer has many features) unless ``prune``."""
    graph = attribute(engine.model, engine.transcoders, GRAPH_PROMPT, progress=False)
    document = graph_json(graph, slug="cat", prune=prune)
    return write_graph_folder(root, document, graph), document

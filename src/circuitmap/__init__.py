"""circuitmap: attribution graphs, interventions and persona vectors for Hugging Face causal LMs."""

__version__ = "0.1.0"

from circuitmap.attribution import Direction, attribute
from circuitmap.errors import CircuitmapError
from circuitmap.features import BuildConfig, FeatureStore, build_features
from circuitmap.graphs import Graph, export_graph_json, graph_scores, load_graph, prune, subgraph_scores
from circuitmap.interventions import (
    FeatureEdit,
    InterventionResult,
    ResidualEdit,
    Supernode,
    check_graph,
    generate_with,
    intervene,
)
from circuitmap.models import DEFAULT_MODEL, Model, load_model, supported_families
from circuitmap.transcoders import (
    CrossLayerTranscoder,
    PerLayerTranscoders,
    Transcoders,
    load_transcoders,
    save_transcoders,
)

__all__ = [
    "DEFAULT_MODEL",
    "BuildConfig",
    "FeatureStore",
    "CircuitmapError",
    "CrossLayerTranscoder",
    "Direction",
    "FeatureEdit",
    "Graph",
    "InterventionResult",
    "Model",
    "PerLayerTranscoders",
    "ResidualEdit",
    "Supernode",
    "Transcoders",
    "attribute",
    "build_features",
    "check_graph",
    "export_graph_json",
    "generate_with",
    "graph_scores",
    "intervene",
    "load_graph",
    "load_model",
    "load_transcoders",
    "prune",
    "save_transcoders",
    "subgraph_scores",
    "supported_families",
]

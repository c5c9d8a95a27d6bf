"""circuitmap: transcoders, attribution graphs, feature dashboards and interventions for Hugging Face causal
language models.

Load a model (``load_model``) and a transcoder set (``load_transcoders``, or train one with
``circuitmap.training``); compute the attribution graph that explains a prediction (``attribute``), prune
and score it (``prune``, ``graph_scores``), group its features into named supernodes (``group_features``),
write it as a graph folder for the explorer (``compute_graph_folder``) and compare two of them
(``compare_graphs``); read what features mean (``build_features``, ``FeatureStore``); and test what a graph
claims by editing features (``intervene``, ``generate_with``, ``check_graph``, ``patch_edits``); show graphs
in a notebook (``show``).
"""

__version__ = "0.1.0"

from circuitmap.attribution import (
    AttributionConfig,
    Direction,
    HeadLoadings,
    QKAttribution,
    attribute,
    head_loadings,
    qk_attribution,
    salient_heads,
)
from circuitmap.batch import BatchConfig, attribute_batch
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.features import BuildConfig, FeatureStore, build_features
from circuitmap.graphs import (
    Graph,
    GraphFolder,
    PruneConfig,
    compare_graphs,
    export_graph_json,
    graph_scores,
    group_features,
    load_graph,
    prune,
    subgraph_scores,
)
from circuitmap.interventions import (
    EditHandle,
    FeatureEdit,
    InterventionResult,
    ResidualEdit,
    Supernode,
    apply_edits,
    check_graph,
    generate_with,
    intervene,
    patch_edits,
)
from circuitmap.models import DEFAULT_MODEL, Model, load_model, supported_families
from circuitmap.notebook import GraphView, show
from circuitmap.persona import (
    AlignedFeature,
    ExtractConfig,
    PersonaVector,
    aligned_features,
    export_control_vector,
    extract_persona_vectors,
    finetune_shift,
    load_persona_vector,
    load_trait,
    project,
    projection_difference,
    rank_samples,
    steer,
    steering,
    sweep_steering,
)
from circuitmap.pipeline import ComputedGraph, compute_graph, compute_graph_folder
from circuitmap.toy import DictionaryConfig, ToyConfig, train_sparse_dictionary, train_toy_models
from circuitmap.transcoders import (
    CrossLayerTranscoder,
    PerLayerTranscoders,
    Transcoders,
    load_transcoders,
    save_transcoders,
)

__all__ = [
    "DEFAULT_MODEL",
    "AttributionConfig",
    "BatchConfig",
    "BuildConfig",
    "CircuitmapError",
    "ComputedGraph",
    "AlignedFeature",
    "CrossLayerTranscoder",
    "DictionaryConfig",
    "Direction",
    "EditHandle",
    "ExtractConfig",
    "FeatureEdit",
    "FeatureStore",
    "Graph",
    "GraphFolder",
    "GraphView",
    "HeadLoadings",
    "Interrupted",
    "InterventionResult",
    "Model",
    "PerLayerTranscoders",
    "PersonaVector",
    "PruneConfig",
    "QKAttribution",
    "ResidualEdit",
    "Supernode",
    "ToyConfig",
    "Transcoders",
    "apply_edits",
    "attribute",
    "attribute_batch",
    "build_features",
    "aligned_features",
    "check_graph",
    "compare_graphs",
    "compute_graph",
    "compute_graph_folder",
    "export_control_vector",
    "export_graph_json",
    "finetune_shift",
    "extract_persona_vectors",
    "generate_with",
    "graph_scores",
    "group_features",
    "head_loadings",
    "intervene",
    "load_graph",
    "load_model",
    "load_persona_vector",
    "load_trait",
    "load_transcoders",
    "patch_edits",
    "project",
    "projection_difference",
    "prune",
    "qk_attribution",
    "rank_samples",
    "salient_heads",
    "save_transcoders",
    "show",
    "steer",
    "steering",
    "subgraph_scores",
    "sweep_steering",
    "supported_families",
    "train_sparse_dictionary",
    "train_toy_models",
]

"""Attribution graphs: the data structure, pruning and scores, files, graph folders, viewer JSON and the
comparison of two graphs."""

from circuitmap.graphs.compare import GraphComparison, compare_graphs
from circuitmap.graphs.export import export_graph_json, graph_json
from circuitmap.graphs.files import load_graph, save_graph
from circuitmap.graphs.folder import GraphFolder, viewer_document
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.grouping import FeatureGroup, Grouping, group_features
from circuitmap.graphs.pruning import (
    PruneConfig,
    PruneResult,
    Scores,
    graph_scores,
    node_influence,
    prune,
    subgraph_scores,
)

__all__ = [
    "FeatureGroup",
    "Graph",
    "GraphComparison",
    "GraphFolder",
    "Grouping",
    "NodeKind",
    "PruneConfig",
    "PruneResult",
    "Scores",
    "compare_graphs",
    "export_graph_json",
    "graph_json",
    "graph_scores",
    "group_features",
    "load_graph",
    "node_influence",
    "prune",
    "save_graph",
    "subgraph_scores",
    "viewer_document",
]

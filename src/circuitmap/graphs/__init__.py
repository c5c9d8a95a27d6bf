"""Attribution graphs: the data structure, pruning and scores, files, graph folders and viewer JSON."""

from circuitmap.graphs.export import export_graph_json, graph_json
from circuitmap.graphs.files import load_graph, save_graph
from circuitmap.graphs.folder import GraphFolder, viewer_document
from circuitmap.graphs.graph import Graph, NodeKind
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
    "Graph",
    "GraphFolder",
    "NodeKind",
    "PruneConfig",
    "PruneResult",
    "Scores",
    "export_graph_json",
    "graph_json",
    "graph_scores",
    "load_graph",
    "node_influence",
    "prune",
    "save_graph",
    "subgraph_scores",
    "viewer_document",
]

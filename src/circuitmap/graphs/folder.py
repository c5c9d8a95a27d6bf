"""A graph folder: what ``circuitmap attribute --out`` writes and the explorer serves, one folder per graph.

- ``graph.safetensors``: the full graph (``graphs.files``), which makes subgraph scores and checks exact;
- ``graph.json``: the pruned viewer document (``graphs.export``), with the explorer's saved state (pins,
  supernodes, labels) in its ``qParams``;
- ``heads.safetensors``, when asked for (``circuitmap attribute --head-loadings N``): some of the full
  graph's cross-position edges split over the attention heads that carry them
  (``attribution.heads.HeadLoadings``, stored by ``graphs.files.save_head_loadings``).

A folder is written as one unit: its files go into a hidden sibling folder, which then takes the place of
the old one, so a reader never finds a new document beside an old graph. Every file also carries the graph's
id (``info.graph_id``, given by ``attribute``), and readers refuse files whose ids differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from circuitmap.atomic import replace_folder
from circuitmap.errors import GraphFileError
from circuitmap.graphs.export import graph_json, write_graph_json
from circuitmap.graphs.files import (
    load_graph,
    load_head_loadings,
    read_graph_info,
    save_graph,
    save_head_loadings,
)
from circuitmap.graphs.graph import Graph
from circuitmap.graphs.pruning import PruneConfig

if TYPE_CHECKING:
    from circuitmap.attribution.heads import HeadLoadings

GRAPH_FILE = "graph.safetensors"
DOCUMENT_FILE = "graph.json"
HEADS_FILE = "heads.safetensors"


@dataclass(frozen=True)
class GraphFolder:
    """The folder of one graph (see the module docstring)."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def graph_file(self) -> Path:
        return self.path / GRAPH_FILE

    @property
    def document_file(self) -> Path:
        return self.path / DOCUMENT_FILE

    @property
    def heads_file(self) -> Path:
        return self.path / HEADS_FILE

    def has_graph(self) -> bool:
        return self.graph_file.is_file()

    def has_document(self) -> bool:
        return self.document_file.is_file()

    def has_head_loadings(self) -> bool:
        return self.heads_file.is_file()

    def _repr_html_(self) -> str:
        """In a notebook: the explorer's read-only view of the folder's document (``circuitmap.show``)."""
        from circuitmap.notebook import show

        return show(self)._repr_html_()

    def read_graph(self) -> Graph:
        """The full graph; a one-line error when the folder has none, or when its document was made from
        another graph."""
        if not self.has_graph():
            raise GraphFileError(f"{self.path} holds no full graph ({GRAPH_FILE})")
        graph = load_graph(self.graph_file)
        if self.has_document():
            check_pair(self.read_document(), graph.info, self.path)
        return graph

    def read_document(self) -> dict:
        """The viewer document; a one-line error when it is missing or is not a viewer document."""
        return read_document(self.document_file)

    def saved_supernodes(self) -> list[tuple[str, list[str]]]:
        """The supernodes saved in the document (``qParams.supernodes``) as ``(name, member ids)``; none
        when the folder has no document. Malformed entries are skipped."""
        if not self.has_document():
            return []
        return document_supernodes(self.read_document())

    def read_head_loadings(self) -> HeadLoadings:
        """The stored head loadings; a one-line error when the folder has none, or when they split the edges
        of another graph than its full graph."""
        if not self.has_head_loadings():
            raise GraphFileError(
                f"{self.path} holds no head loadings ({HEADS_FILE}): compute the graph with --head-loadings N"
            )
        loadings, recorded = load_head_loadings(self.heads_file)
        graph = graph_id(read_graph_info(self.graph_file)) if self.has_graph() else None
        if recorded is not None and graph is not None and recorded != graph:
            raise GraphFileError(
                f"{HEADS_FILE} and {GRAPH_FILE} in {self.path} come from different graphs (one was copied in "
                "by hand): compute the graph again"
            )
        return loadings

    def write(self, graph: Graph, document: dict, heads: HeadLoadings | None = None) -> None:
        """Write the full graph, the document and, when given, the head loadings of some of the graph's edges
        as one unit, replacing what the folder held."""
        if self.path.exists() and not self.path.is_dir():
            raise GraphFileError(f"{self.path} exists and is not a folder")
        if heads is not None and heads.edges.max(initial=-1) >= graph.n_edges:
            raise GraphFileError(
                f"the head loadings split edges that the graph lacks (it has {graph.n_edges})"
            )

        def fill(staging: Path) -> None:
            save_graph(graph, staging / GRAPH_FILE)
            write_graph_json(document, staging / DOCUMENT_FILE)
            if heads is not None:
                save_head_loadings(heads, staging / HEADS_FILE, graph_id(graph.info))

        replace_folder(self.path, fill)


def document_supernodes(document: dict) -> list[tuple[str, list[str]]]:
    """The supernodes saved in a viewer document (``qParams.supernodes``) as ``(name, member ids)``.
    Malformed entries are skipped."""
    q_params = document.get("qParams")
    saved = q_params.get("supernodes") if isinstance(q_params, dict) else None
    if not isinstance(saved, list):
        return []
    return [
        (group[0], [str(member) for member in group[1:]])
        for group in saved
        if isinstance(group, list) and len(group) >= 2 and isinstance(group[0], str)
    ]


def graph_id(info: object) -> str | None:
    """The id a graph's ``info`` records (None for graphs made without one)."""
    identifier = info.get("graph_id") if isinstance(info, dict) else None
    return identifier if isinstance(identifier, str) else None


def check_pair(document: dict, info: dict, folder: Path) -> None:
    """A one-line error when a folder's document records another graph id than its full graph's ``info``."""
    metadata = document.get("metadata")
    recorded = graph_id(metadata.get("info") if isinstance(metadata, dict) else None)
    if recorded is not None and graph_id(info) is not None and recorded != graph_id(info):
        raise GraphFileError(
            f"{DOCUMENT_FILE} and {GRAPH_FILE} in {folder} come from different graphs (a write was "
            "interrupted, or one was copied in by hand): compute the graph again"
        )


def viewer_document(source: str | Path, pruning: PruneConfig | None = None) -> dict:
    """The viewer document of a graph folder (its document, else its full graph pruned now), of a
    ``graph.json`` file, or of a ``.safetensors`` graph file (pruned now with ``pruning``)."""
    source = Path(source)
    if source.is_dir():
        folder = GraphFolder(source)
        if not (folder.has_document() or folder.has_graph()):
            raise GraphFileError(f"{source} holds neither {DOCUMENT_FILE} nor {GRAPH_FILE}")
        source = folder.document_file if folder.has_document() else folder.graph_file
    if not source.is_file():
        raise GraphFileError(f"no graph at {source}")
    if source.suffix == ".safetensors":
        return graph_json(load_graph(source), pruning)
    return read_document(source)


def read_document(path: str | Path) -> dict:
    """A viewer document read from ``path``; a one-line error when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"no viewer document at {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise GraphFileError(f"{path} is not a viewer JSON document: {error}") from None
    if not isinstance(document, dict) or not {"metadata", "nodes", "links"} <= set(document):
        raise GraphFileError(f"{path} is not a viewer JSON document (it needs metadata, nodes and links)")
    return document

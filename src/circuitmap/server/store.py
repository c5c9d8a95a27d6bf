"""The folder of graphs the explorer serves: one graph folder (``graphs.folder``) per graph.

Layout: ``<root>/<name>/`` holds the viewer document and, when the full graph was kept, the full graph,
which makes subgraph scores exact, and maybe the head loadings of some of its edges. This is what
``circuitmap attribute --out <root>/<name>`` writes.

Names are 1–100 letters, digits, ``.``, ``_`` or ``-``, not starting with ``.``; a graph folder or file that
is a symbolic link is refused, so nothing outside ``root`` is ever read or written. Writes are atomic (a
temporary file renamed into place) and serialised by one lock; every read of a document comes with its
revision, and a save against an older revision is refused, so two tabs cannot silently overwrite each other.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from circuitmap.atomic import remove_stale
from circuitmap.attribution.heads import HeadLoadings
from circuitmap.errors import CircuitmapError, GraphFileError, StoreError
from circuitmap.graphs.export import FEATURE_TYPES, document_links, write_graph_json
from circuitmap.graphs.files import load_graph, load_head_loadings, read_graph_info
from circuitmap.graphs.folder import (
    DOCUMENT_FILE,
    GRAPH_FILE,
    HEADS_FILE,
    GraphFolder,
    check_pair,
    graph_id,
)
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.pruning import Scores, subgraph_scores
from circuitmap.validation import check_text

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
MAX_LABEL = 500
MAX_IDS = 20_000
VIEW_FIELDS = {
    "nodeThreshold": float,
    "edgeThreshold": float,
    "showErrors": bool,
    "showPositive": bool,
    "showNegative": bool,
}
_TARGET_TYPE = FEATURE_TYPES[NodeKind.TARGET]
_CACHED_GRAPHS = 2


@dataclass(frozen=True)
class Summary:
    """What the graph list shows of one graph."""

    name: str
    prompt: str
    model: str
    transcoders: str
    created: str
    n_nodes: dict
    n_edges: dict
    scores: dict
    exact_scores: bool
    graph_id: str | None

    def as_json(self) -> dict:
        return dict(self.__dict__)


def check_name(name: str) -> str:
    """``name`` if it can name a graph folder, else a ``StoreError``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise StoreError(
            f"invalid graph name {name!r}: use 1-100 letters, digits, '.', '_' or '-', not starting with '.'"
        )
    return name


class GraphStore:
    """List, read, save, rename and delete the graphs under one folder (see the module docstring)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise CircuitmapError(f"graph folder {root} does not exist or is not a folder")
        self.root = root.resolve()
        remove_stale(self.root)
        self._lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._summaries: dict[str, tuple[str, Summary]] = {}
        self._graphs: OrderedDict[tuple[str, str], Graph] = OrderedDict()

    def folder(self, name: str) -> Path:
        """The folder of graph ``name``: a real folder directly under the root, never a link."""
        folder = self.root / check_name(name)
        if folder.is_symlink() or not folder.is_dir():
            raise StoreError(f"no graph named {name!r}", 404)
        return folder

    def _file(self, name: str, file_name: str) -> Path | None:
        """A file of graph ``name`` if it exists as a regular file (links are ignored)."""
        path = self.folder(name) / file_name
        return path if path.is_file() and not path.is_symlink() else None

    def _document_path(self, name: str) -> Path:
        path = self._file(name, DOCUMENT_FILE)
        if path is None:
            raise StoreError(f"no graph named {name!r}", 404)
        return path

    def names(self) -> list[str]:
        """Names of the graphs present, in name order."""
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if NAME_PATTERN.fullmatch(entry.name)
            and not entry.is_symlink()
            and entry.is_dir()
            and (entry / DOCUMENT_FILE).is_file()
            and not (entry / DOCUMENT_FILE).is_symlink()
        )

    def read(self, name: str) -> tuple[bytes, str]:
        """The document's bytes, exactly as stored, and its revision."""
        try:
            data = self._document_path(name).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no graph named {name!r}", 404) from None
        return data, _revision(data)

    def document(self, name: str) -> tuple[dict, str]:
        """The parsed document and its revision."""
        data, revision = self.read(name)
        try:
            return json.loads(data), revision
        except (ValueError, RecursionError) as error:
            raise StoreError(f"graph {name!r} has an unreadable {DOCUMENT_FILE}: {error}", 500) from None

    def summaries(self) -> list[Summary]:
        """A summary of every readable graph, newest first (unreadable ones are skipped)."""
        found = []
        for name in self.names():
            try:
                found.append(self.summary(name))
            except StoreError:
                continue
        return sorted(found, key=lambda summary: summary.created, reverse=True)

    def summary(self, name: str) -> Summary:
        """The summary of one graph, cached until its files change. Scores are exact when the folder holds
        the full graph the document was made from."""
        try:
            stat = self._document_path(name).stat()
        except FileNotFoundError:
            raise StoreError(f"no graph named {name!r}", 404) from None
        full = self._file(name, GRAPH_FILE)
        key = f"{_revision_of(stat)}/{_revision_of(full.stat()) if full is not None else ''}"
        cached = self._summaries.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        document, _ = self.document(name)
        try:
            metadata = document["metadata"]
            info = metadata.get("info") or {}
            created = info.get("created") or datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(
                timespec="seconds"
            )
            summary = Summary(
                name=name,
                prompt=str(metadata["prompt"]),
                model=str(metadata.get("model", metadata.get("scan", ""))),
                transcoders=str(metadata.get("transcoders", "")),
                created=str(created),
                n_nodes=metadata.get("n_nodes") or {"exported": len(document["nodes"])},
                n_edges=metadata.get("n_edges") or {"exported": len(document["links"])},
                scores=metadata.get("scores") or {},
                exact_scores=full is not None and self._pairs(document, full),
                graph_id=graph_id(info),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise StoreError(f"graph {name!r} is not a viewer document: missing {error}", 500) from None
        self._summaries[name] = (key, summary)
        return summary

    def save_state(self, name: str, state: dict) -> str:
        """Write the explorer's state into the document (see ``apply_state``); returns the new revision."""
        with self._lock:
            document, revision = self.document(name)
            expected = state.get("revision")
            if expected is not None and expected != revision:
                raise StoreError(
                    f"graph {name!r} was saved elsewhere since it was opened: reload it, then save again", 409
                )
            try:
                apply_state(document, state)
            except (KeyError, TypeError, AttributeError) as error:
                raise StoreError(
                    f"graph {name!r} is not a viewer document this explorer can save into: {error!r} is "
                    "missing or malformed",
                    422,
                ) from None
            path = write_graph_json(document, self._document_path(name))
            return _revision(path.read_bytes())

    def rename(self, name: str, new_name: str) -> str:
        """Rename graph ``name`` to ``new_name`` (also its document's slug)."""
        check_name(new_name)
        with self._lock:
            source = self.folder(name)
            document, _ = self.document(name)
            if not isinstance(document, dict) or not isinstance(document.get("metadata"), dict):
                raise StoreError(f"graph {name!r} is not a viewer document (no metadata): not renamed", 422)
            target = self.root / new_name
            if target.exists() or target.is_symlink():
                raise StoreError(f"a graph named {new_name!r} already exists", 409)
            source.rename(target)
            document["metadata"]["slug"] = new_name
            try:
                write_graph_json(document, target / DOCUMENT_FILE)
            except OSError as error:
                target.rename(source)
                raise StoreError(f"graph {name!r} was not renamed: {error.strerror or error}", 507) from None
            self._forget(name)
            return new_name

    def delete(self, name: str) -> None:
        """Delete graph ``name``: its document, full graph and head loadings, then its folder if nothing else
        is in it."""
        with self._lock:
            folder = self.folder(name)
            self._document_path(name)
            for file_name in (DOCUMENT_FILE, GRAPH_FILE, HEADS_FILE):
                path = folder / file_name
                if path.is_file() or path.is_symlink():
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
            self._forget(name)

    def add(self, name: str, graph: Graph, document: dict) -> str:
        """Create graph ``name`` (or ``name-2``, ``name-3`` … if taken) from a full graph and its viewer
        document, written as one unit (``GraphFolder.write``); returns the name used, which is also the
        document's slug."""
        check_name(name)
        with self._lock:
            chosen = self._free_name(name)
            document["metadata"]["slug"] = chosen
            GraphFolder(self.root / chosen).write(graph, document)
            return chosen

    def _free_name(self, name: str) -> str:
        candidate, number = name, 1
        while (self.root / candidate).exists() or (self.root / candidate).is_symlink():
            number += 1
            suffix = f"-{number}"
            candidate = name[: 100 - len(suffix)] + suffix
        return candidate

    def scores(self, name: str, pinned: list[str], supernodes: list[list[str]]) -> Scores:
        """Exact replacement and completeness of a subgraph, from the full graph (404 without one)."""
        graph = self.full_graph(name)
        members = [*_id_list("pinnedIds", pinned), *_members(supernodes)]
        try:
            return subgraph_scores(graph, members)
        except CircuitmapError as error:
            raise StoreError(str(error)) from None

    def links(self, name: str) -> list[dict]:
        """Every kept link of the document, those it leaves out for size included (``document_links``)."""
        graph = self.full_graph(name)
        document, _ = self.document(name)
        try:
            return document_links(graph, document)
        except CircuitmapError as error:
            raise StoreError(str(error), 409) from None

    def full_graph(self, name: str) -> Graph:
        """The full graph of ``name`` (404 without one; 409 when the document was made from another graph),
        kept in a small cache keyed by its file's revision."""
        path = self._file(name, GRAPH_FILE)
        if path is None:
            raise StoreError(f"graph {name!r} has no full graph ({GRAPH_FILE})", 404)
        if not self.summary(name).exact_scores:
            raise StoreError(
                f"graph {name!r}: its {DOCUMENT_FILE} and {GRAPH_FILE} come from different graphs; "
                "compute it again",
                409,
            )
        key = (name, _revision_of(path.stat()))
        with self._cache_lock:
            if key not in self._graphs:
                self._graphs[key] = load_graph(path)
                while len(self._graphs) > _CACHED_GRAPHS:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            return self._graphs[key]

    def head_loadings(self, name: str) -> HeadLoadings | None:
        """The head loadings stored with graph ``name`` (None when it has none), checked to split edges of its
        full graph (404 without one; 409 for loadings of another graph; 500 for an unreadable file)."""
        graph = self.full_graph(name)
        path = self._file(name, HEADS_FILE)
        if path is None:
            return None
        try:
            loadings, recorded = load_head_loadings(path)
        except GraphFileError as error:
            raise StoreError(str(error), 500) from None
        ours = graph_id(graph.info)
        if (recorded is not None and ours is not None and recorded != ours) or (
            loadings.edges.max(initial=-1) >= graph.n_edges
        ):
            raise StoreError(
                f"graph {name!r}: its {HEADS_FILE} splits the edges of another graph than its {GRAPH_FILE}; "
                "compute it again",
                409,
            )
        return loadings

    def _pairs(self, document: dict, full: Path) -> bool:
        """Whether the full graph at ``full`` is the one ``document`` was made from (graphs without ids
        pass)."""
        try:
            check_pair(document, read_graph_info(full), full.parent)
        except CircuitmapError:
            return False
        return True

    def _forget(self, name: str) -> None:
        self._summaries.pop(name, None)
        with self._cache_lock:
            for key in [key for key in self._graphs if key[0] == name]:
                del self._graphs[key]


def apply_state(document: dict, state: dict) -> None:
    """Write the explorer's state into a viewer document, after checking every part of it.

    ``state``: ``pinnedIds``, ``supernodes`` (``[label, id, …]``; members are pinned too), ``clickedId``
    ("" for none), ``labels`` (node id → label, written to the nodes' ``clerp``; a target's keeps the
    ``Output "…" (p=…)`` form) and ``view`` (the explorer's thresholds and toggles). Only the fields the
    state holds change: a state of labels alone keeps the saved pins, supernodes and selection.
    """
    if not isinstance(state, dict):
        raise StoreError("the state must be a JSON object")
    unknown = set(state) - {"revision", "pinnedIds", "supernodes", "clickedId", "labels", "view"}
    if unknown:
        raise StoreError(f"unknown state fields: {', '.join(sorted(unknown))}")
    nodes = {node["node_id"]: node for node in document["nodes"]}
    pinned = _known(_id_list("pinnedIds", state.get("pinnedIds", [])), nodes, "pinnedIds")
    groups = _supernodes(state.get("supernodes", []), nodes)
    clicked = state.get("clickedId", "")
    if not isinstance(clicked, str) or (clicked and clicked not in nodes):
        raise StoreError(f"clickedId {clicked!r} is not a node of the graph")
    labels = state.get("labels", {})
    if not isinstance(labels, dict):
        raise StoreError("labels must be an object of node id → label")
    _known(list(labels), nodes, "labels")
    for identifier, label in labels.items():
        check_text(f"the label of {identifier}", label, max_length=MAX_LABEL, empty=True)
    view = _view(state.get("view", {}))

    q_params = document["qParams"]
    if "pinnedIds" in state or "supernodes" in state:
        if "pinnedIds" not in state:
            pinned = [i for i in q_params.get("pinnedIds", []) if i in nodes]
        if "supernodes" not in state:
            groups = q_params.get("supernodes", [])
        members = [member for group in groups for member in group[1:]]
        q_params["pinnedIds"] = list(dict.fromkeys([*pinned, *members]))
        q_params["supernodes"] = groups
    if "clickedId" in state:
        q_params["clickedId"] = clicked
    if view:
        q_params["view"] = view
    for identifier, label in labels.items():
        node = nodes[identifier]
        if node["feature_type"] == _TARGET_TYPE:
            label = f'Output "{label}" (p={node["token_prob"]:.3f})'
        node["clerp"] = label


def _id_list(what: str, ids) -> list[str]:
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise StoreError(f"{what} must be a list of node ids")
    if len(ids) > MAX_IDS:
        raise StoreError(f"{what} has {len(ids)} ids; at most {MAX_IDS} are allowed")
    return ids


def _known(ids: list[str], nodes: dict, what: str) -> list[str]:
    unknown = [identifier for identifier in ids if identifier not in nodes]
    if unknown:
        raise StoreError(f"{what}: unknown node ids {', '.join(map(repr, unknown[:5]))}")
    return ids


def _members(supernodes) -> list[str]:
    if not isinstance(supernodes, list):
        raise StoreError("supernodes must be a list of [label, id, …] groups")
    members = []
    for group in supernodes:
        if not isinstance(group, list) or len(group) < 2 or not isinstance(group[0], str):
            raise StoreError(f"supernode {str(group)[:80]} must be [label, id, …] with at least one node id")
        members += _id_list(f"supernode {group[0]!r}", group[1:])
    return members


def _supernodes(supernodes, nodes: dict) -> list[list[str]]:
    _known(_members(supernodes), nodes, "supernodes")
    for group in supernodes:
        check_text("a supernode label", group[0], max_length=MAX_LABEL, empty=True)
    return [list(group) for group in supernodes]


def _view(view) -> dict:
    if not isinstance(view, dict):
        raise StoreError("view must be an object")
    checked = {}
    for key, value in view.items():
        kind = VIEW_FIELDS.get(key)
        if kind is None:
            raise StoreError(f"unknown view field {key!r}")
        if kind is bool and not isinstance(value, bool):
            raise StoreError(f"view.{key} must be true or false")
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise StoreError(f"view.{key} must be a number in [0, 1]")
            value = float(value)
        checked[key] = value
    return checked


def _revision_of(stat) -> str:
    """A file's revision as its modification time and size say."""
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def _revision(data: bytes) -> str:
    """A short digest of a document's bytes: equal bytes, equal revision."""
    return hashlib.sha256(data).hexdigest()[:20]

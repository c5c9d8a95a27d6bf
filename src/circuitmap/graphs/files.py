"""Save and load a ``Graph`` as one ``.safetensors`` file, losslessly and atomically.

Layout: every NumPy array of the graph (``ARRAY_FIELDS``) is a tensor of the same name and dtype; everything
else (prompt, tokens, token strings, layer count, target names, model and transcoder names, labels, info) is
one JSON document in the safetensors header metadata under ``METADATA_KEY``, with ``schema_version``
(``GRAPH_FILE_VERSION``). Label keys (node indices) are JSON strings in the file and ints again on load;
``info`` must be JSON-compatible (string keys; tuples come back as lists).

File names: a path whose name does not end in ``.safetensors`` gets that suffix appended (``"run/graph"`` →
``"run/graph.safetensors"``); ``save_graph`` returns the path it wrote, and ``load_graph`` applies the same
rule when the path as given does not exist. Writes are atomic (``circuitmap.atomic``), so a crash never
leaves a half-written graph under the final name.

Head loadings (``attribution.heads.HeadLoadings``: chosen edges of a graph split over attention heads) have a
file of their own, laid out the same way: each array a tensor of the same name, and ``n_layers``, ``n_heads``
and the id of the graph whose edges they split as JSON under ``HEADS_METADATA_KEY``
(``HEADS_FILE_VERSION``).

Never pickle: a graph file holds only tensors and JSON, so loading one cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from circuitmap.atomic import atomic_write
from circuitmap.errors import GraphFileError
from circuitmap.graphs.graph import Graph, NodeKind

if TYPE_CHECKING:
    from circuitmap.attribution.heads import HeadLoadings

GRAPH_FILE_VERSION = 1
METADATA_KEY = "circuitmap.graph"
SUFFIX = ".safetensors"

NODE_ARRAYS = ("kind", "layer", "position", "index", "activation", "value", "constant", "target_weight")
EDGE_ARRAYS = ("indptr", "indices", "weights")
ARRAY_FIELDS = (*NODE_ARRAYS, "target_probs", *EDGE_ARRAYS)
_INTEGER_ARRAYS = ("kind", "layer", "position", "index", "indptr", "indices")

# JSON fields of the metadata document and the Python type each must have.
_METADATA_FIELDS: dict[str, type] = {
    "prompt": str,
    "tokens": list,
    "token_strings": list,
    "n_layers": int,
    "target_names": list,
    "model_name": str,
    "transcoders_name": str,
    "labels": dict,
    "info": dict,
}
_LIST_ITEMS: dict[str, type] = {"tokens": int, "token_strings": str, "target_names": str}

HEADS_FILE_VERSION = 1
HEADS_METADATA_KEY = "circuitmap.heads"
HEAD_EDGE_ARRAYS = ("edges", "weight", "remainder")
"""Arrays with one entry per split edge."""
HEAD_LOADING_ARRAYS = ("edge", "layer", "head", "key_position", "value")
"""Arrays with one entry per loading."""
_HEAD_FLOAT_ARRAYS = ("weight", "remainder", "value")


def graph_file_path(path: str | Path) -> Path:
    """The file a graph saved as ``path`` goes to: ``path``, with ``.safetensors`` appended if it lacks it."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def save_graph(graph: Graph, path: str | Path) -> Path:
    """Write ``graph`` to one ``.safetensors`` file (atomically) and return the path written."""
    path = graph_file_path(path)
    if path.is_dir():
        raise GraphFileError(f"{path}: is a folder, not a graph file name")
    problem = _inconsistency(_arrays_of(graph), graph.tokens, graph.token_strings, graph.target_names)
    if problem:
        raise GraphFileError(f"{path}: cannot save an inconsistent graph: {problem}")
    document = {
        "schema_version": GRAPH_FILE_VERSION,
        "prompt": graph.prompt,
        "tokens": [int(token) for token in graph.tokens],
        "token_strings": list(graph.token_strings),
        "n_layers": int(graph.n_layers),
        "target_names": list(graph.target_names),
        "model_name": graph.model_name,
        "transcoders_name": graph.transcoders_name,
        "labels": {str(int(node)): label for node, label in graph.labels.items()},
        "info": graph.info,
    }
    try:
        metadata = {METADATA_KEY: json.dumps(document, ensure_ascii=False)}
    except TypeError as exc:
        raise GraphFileError(f"{path}: graph metadata is not JSON-serialisable: {exc}") from exc
    tensors = {name: np.ascontiguousarray(array) for name, array in _arrays_of(graph).items()}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    return path


def load_graph(path: str | Path) -> Graph:
    """Read a graph written by ``save_graph``; any problem with the file raises ``GraphFileError``."""
    path, document, arrays = _read(path, arrays=True)
    missing = [name for name in ARRAY_FIELDS if name not in arrays]
    if missing:
        raise GraphFileError(f"{path}: missing arrays: {', '.join(missing)}")
    problem = _inconsistency(arrays, document["tokens"], document["token_strings"], document["target_names"])
    if problem:
        raise GraphFileError(f"{path}: inconsistent graph: {problem}")
    try:
        labels = {int(node): str(label) for node, label in document["labels"].items()}
    except ValueError as exc:
        raise GraphFileError(f"{path}: label keys must be node indices: {exc}") from exc
    return Graph(
        prompt=document["prompt"],
        tokens=[int(token) for token in document["tokens"]],
        token_strings=list(document["token_strings"]),
        n_layers=document["n_layers"],
        target_names=list(document["target_names"]),
        model_name=document["model_name"],
        transcoders_name=document["transcoders_name"],
        labels=labels,
        info=document["info"],
        **arrays,
    )


def read_graph_info(path: str | Path) -> dict:
    """The ``info`` of a graph file, read from its header alone (the arrays stay on disk)."""
    return _read(path, arrays=False)[1]["info"]


def _read(path: str | Path, *, arrays: bool) -> tuple[Path, dict, dict[str, np.ndarray]]:
    """The path read (suffix rule applied), the checked metadata document and, with ``arrays``, the arrays."""
    path = Path(path)
    if not path.exists():
        path = graph_file_path(path)
    if not path.exists():
        raise GraphFileError(f"{path}: graph file not found")
    if path.is_dir():
        raise GraphFileError(f"{path}: is a folder, not a graph file")
    try:
        with safe_open(str(path), framework="np") as reader:
            header = reader.metadata() or {}
            names = set(reader.keys()) if arrays else set()
            found = {name: reader.get_tensor(name) for name in ARRAY_FIELDS if name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GraphFileError(
            f"{path}: not a readable safetensors file (truncated or another format): {exc}"
        ) from exc
    if METADATA_KEY not in header:
        raise GraphFileError(f"{path}: safetensors file without circuitmap graph metadata (not a graph file)")
    return path, _read_document(path, header[METADATA_KEY]), found


def _arrays_of(graph: Graph) -> dict[str, np.ndarray]:
    return {name: np.asarray(getattr(graph, name)) for name in ARRAY_FIELDS}


def _read_document(path: Path, text: str) -> dict:
    """Parse and check the JSON metadata document: version first, then every field's presence and type."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphFileError(f"{path}: graph metadata is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise GraphFileError(f"{path}: graph metadata is not a JSON object")
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GraphFileError(f"{path}: graph metadata has no valid schema_version ({version!r})")
    if version > GRAPH_FILE_VERSION:
        raise GraphFileError(
            f"{path}: graph file version {version} is newer than this circuitmap reads "
            f"(up to {GRAPH_FILE_VERSION}); upgrade circuitmap"
        )
    for field, kind in _METADATA_FIELDS.items():
        if field not in document:
            raise GraphFileError(f"{path}: graph metadata lacks {field!r}")
        if not isinstance(document[field], kind) or isinstance(document[field], bool):
            raise GraphFileError(f"{path}: graph metadata field {field!r} is not a {kind.__name__}")
    for field, kind in _LIST_ITEMS.items():
        if not all(isinstance(item, kind) and not isinstance(item, bool) for item in document[field]):
            raise GraphFileError(f"{path}: graph metadata field {field!r} must hold only {kind.__name__}s")
    return document


def _inconsistency(
    arrays: dict[str, np.ndarray], tokens: list, token_strings: list, target_names: list
) -> str | None:
    """What is wrong with the shapes and dtypes of a graph's parts, or None when they fit together."""
    for name, array in arrays.items():
        if array.ndim != 1:
            return f"{name} has {array.ndim} dimensions, expected 1"
        wanted = np.integer if name in _INTEGER_ARRAYS else np.floating
        if not np.issubdtype(array.dtype, wanted):
            return f"{name} has dtype {array.dtype}, expected {wanted.__name__}"
    n_nodes = len(arrays["kind"])
    for name in NODE_ARRAYS:
        if len(arrays[name]) != n_nodes:
            return f"{name} has {len(arrays[name])} entries, kind has {n_nodes} (n_nodes)"
    indptr, indices, weights = arrays["indptr"], arrays["indices"], arrays["weights"]
    if len(indptr) != n_nodes + 1:
        return f"indptr has {len(indptr)} entries, expected n_nodes + 1 = {n_nodes + 1}"
    if len(indices) != len(weights):
        return f"indices has {len(indices)} entries but weights has {len(weights)}"
    if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        return f"indptr must rise from 0 to the edge count {len(indices)}"
    if len(indices) and (indices.min() < 0 or indices.max() >= n_nodes):
        return f"edge sources must be node indices in [0, {n_nodes})"
    n_targets = int(np.count_nonzero(arrays["kind"] == NodeKind.TARGET))
    if not len(target_names) == len(arrays["target_probs"]) == n_targets:
        return (
            f"{n_targets} target nodes but {len(target_names)} target names "
            f"and {len(arrays['target_probs'])} target probabilities"
        )
    if len(tokens) != len(token_strings):
        return f"{len(tokens)} tokens but {len(token_strings)} token strings"
    return None


def save_head_loadings(loadings: HeadLoadings, path: str | Path, graph_id: str | None) -> Path:
    """Write ``loadings`` to one ``.safetensors`` file (atomically), recording ``graph_id``, the id of the
    graph whose edges they split; returns the path written."""
    path = Path(path)
    arrays = {
        name: np.ascontiguousarray(getattr(loadings, name))
        for name in (*HEAD_EDGE_ARRAYS, *HEAD_LOADING_ARRAYS)
    }
    problem = _loadings_inconsistency(arrays, loadings.n_layers, loadings.n_heads)
    if problem:
        raise GraphFileError(f"{path}: cannot save inconsistent head loadings: {problem}")
    document = {
        "schema_version": HEADS_FILE_VERSION,
        "graph_id": graph_id,
        "n_layers": int(loadings.n_layers),
        "n_heads": int(loadings.n_heads),
    }
    metadata = {HEADS_METADATA_KEY: json.dumps(document)}
    atomic_write(path, lambda temporary: save_file(arrays, str(temporary), metadata=metadata))
    return path


def load_head_loadings(path: str | Path) -> tuple[HeadLoadings, str | None]:
    """Head loadings written by ``save_head_loadings`` and the graph id they record; any problem with the file
    raises ``GraphFileError``."""
    from circuitmap.attribution.heads import HeadLoadings  # graphs sit below attribution: imported on use

    path = Path(path)
    names = (*HEAD_EDGE_ARRAYS, *HEAD_LOADING_ARRAYS)
    try:
        with safe_open(str(path), framework="np") as reader:
            header = reader.metadata() or {}
            arrays = {name: reader.get_tensor(name) for name in names if name in set(reader.keys())}
    except (SafetensorError, OSError, ValueError) as exc:
        raise GraphFileError(
            f"{path}: not a readable safetensors file (truncated or another format): {exc}"
        ) from exc
    if HEADS_METADATA_KEY not in header:
        raise GraphFileError(f"{path}: safetensors file without circuitmap head-loading metadata")
    try:
        document = json.loads(header[HEADS_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise GraphFileError(f"{path}: head-loading metadata is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise GraphFileError(f"{path}: head-loading metadata is not a JSON object")
    version = document.get("schema_version")
    if version != HEADS_FILE_VERSION:
        raise GraphFileError(
            f"{path}: head-loading file version {version!r} is not the one this circuitmap reads "
            f"({HEADS_FILE_VERSION})"
        )
    sizes = [document.get(name) for name in ("n_layers", "n_heads")]
    if not all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
        raise GraphFileError(f"{path}: head-loading metadata lacks positive n_layers and n_heads")
    graph_id = document.get("graph_id")
    if graph_id is not None and not isinstance(graph_id, str):
        raise GraphFileError(f"{path}: head-loading metadata has a graph_id that is not a string")
    missing = [name for name in names if name not in arrays]
    if missing:
        raise GraphFileError(f"{path}: missing arrays: {', '.join(missing)}")
    problem = _loadings_inconsistency(arrays, *sizes)
    if problem:
        raise GraphFileError(f"{path}: inconsistent head loadings: {problem}")
    return HeadLoadings(**arrays, n_layers=sizes[0], n_heads=sizes[1]), graph_id


def _loadings_inconsistency(arrays: dict[str, np.ndarray], n_layers: int, n_heads: int) -> str | None:
    """What is wrong with the shapes, dtypes and values of head loadings' arrays, or None when they fit."""
    for name, array in arrays.items():
        if array.ndim != 1:
            return f"{name} has {array.ndim} dimensions, expected 1"
        wanted = np.floating if name in _HEAD_FLOAT_ARRAYS else np.integer
        if not np.issubdtype(array.dtype, wanted):
            return f"{name} has dtype {array.dtype}, expected {wanted.__name__}"
    for group in (HEAD_EDGE_ARRAYS, HEAD_LOADING_ARRAYS):
        lengths = {len(arrays[name]) for name in group}
        if len(lengths) > 1:
            return f"{', '.join(group)} must have one length, got {sorted(lengths)}"
    if len(np.unique(arrays["edges"])) != len(arrays["edges"]) or arrays["edges"].min(initial=0) < 0:
        return "edges must be distinct edge indices"
    if not np.isin(arrays["edge"], arrays["edges"]).all():
        return "a loading names an edge that is not among the split edges"
    layer, head = arrays["layer"], arrays["head"]
    if len(layer) and (layer.min() < 0 or layer.max() >= n_layers or head.min() < 0 or head.max() >= n_heads):
        return f"heads must lie within {n_layers} layers of {n_heads} heads"
    if arrays["key_position"].min(initial=-1) < -1:
        return "key positions must be -1 (every position) or a position"
    return None

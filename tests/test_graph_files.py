"""Graph files: lossless round trips, the file-name rule, atomic writes, and one-line errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.graphs import random_graph
from safetensors import safe_open
from safetensors.numpy import save_file

from circuitmap.errors import CircuitmapError, GraphFileError
from circuitmap.graphs import files
from circuitmap.graphs.files import (
    ARRAY_FIELDS,
    GRAPH_FILE_VERSION,
    METADATA_KEY,
    load_graph,
    save_graph,
)
from circuitmap.graphs.graph import Graph

SCALAR_FIELDS = (
    "prompt",
    "tokens",
    "token_strings",
    "n_layers",
    "target_names",
    "model_name",
    "transcoders_name",
    "labels",
    "info",
)


def assert_same_graph(loaded: Graph, graph: Graph) -> None:
    for name in ARRAY_FIELDS:
        original, copy = getattr(graph, name), getattr(loaded, name)
        assert copy.dtype == original.dtype, name
        np.testing.assert_array_equal(copy, original, err_msg=name)
    for name in SCALAR_FIELDS:
        assert getattr(loaded, name) == getattr(graph, name), name
        assert type(getattr(loaded, name)) is type(getattr(graph, name)), name


def read_raw(path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and the metadata document of a graph file, for writing broken variants."""
    with safe_open(str(path), framework="np") as reader:
        names = reader.keys()
        arrays = {name: reader.get_tensor(name) for name in names}
        return arrays, json.loads(reader.metadata()[METADATA_KEY])


def write_raw(path, arrays: dict[str, np.ndarray], document: dict | None) -> None:
    metadata = None if document is None else {METADATA_KEY: json.dumps(document)}
    save_file(arrays, str(path), metadata=metadata)


@pytest.fixture
def saved(tmp_path):
    """A saved random graph: its path, tensors and metadata document."""
    path = save_graph(random_graph(0), tmp_path / "good.safetensors")
    return path, *read_raw(path)


@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64])
def test_round_trip_is_lossless(tmp_path, weight_dtype):
    graph = random_graph(
        1,
        weight_dtype=weight_dtype,
        prompt="Die Hauptstadt von Österreich ist → 日本 🙂",
        token_strings=["<bos>", "Die", " Österreich", " 🙂"],
    )
    graph.labels = {0: "Texas", 5: "Größe", len(graph.kind) - 1: "Δ logit"}
    graph.info = {"nested": {"a": [1, 2.5, None, True]}, "text": "ü"}
    path = save_graph(graph, tmp_path / "graph.safetensors")
    assert path == tmp_path / "graph.safetensors"
    loaded = load_graph(path)
    assert_same_graph(loaded, graph)
    assert loaded.weights.dtype == weight_dtype
    assert all(isinstance(key, int) for key in loaded.labels)
    np.testing.assert_array_equal(loaded.dense_adjacency(), graph.dense_adjacency())


def test_round_trip_of_a_graph_without_edges(tmp_path):
    graph = random_graph(2)
    graph.indptr = np.zeros_like(graph.indptr)
    graph.indices = graph.indices[:0]
    graph.weights = graph.weights[:0]
    graph.labels, graph.info = {}, {}
    assert_same_graph(load_graph(save_graph(graph, tmp_path / "empty.safetensors")), graph)


def test_suffix_is_appended_and_load_finds_it(tmp_path):
    graph = random_graph(3)
    path = save_graph(graph, tmp_path / "run" / "graph")
    assert path == tmp_path / "run" / "graph.safetensors" and path.is_file()
    assert_same_graph(load_graph(tmp_path / "run" / "graph"), graph)
    assert save_graph(graph, str(tmp_path / "g.v2")) == tmp_path / "g.v2.safetensors"


def test_saving_onto_a_folder_fails(tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(GraphFileError, match="is a folder"):
        save_graph(random_graph(4), tmp_path / "folder.safetensors")
    with pytest.raises(GraphFileError, match="is a folder"):
        load_graph(tmp_path / "folder.safetensors")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = save_graph(random_graph(5), tmp_path / "graph.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_graph(random_graph(6), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["graph.safetensors"]


def test_saving_an_inconsistent_graph_fails(tmp_path):
    graph = random_graph(7)
    graph.value = graph.value[:-1]
    with pytest.raises(GraphFileError, match="value has"):
        save_graph(graph, tmp_path / "graph.safetensors")
    graph = random_graph(7)
    graph.info = {"bad": object()}
    with pytest.raises(GraphFileError, match="not JSON-serialisable"):
        save_graph(graph, tmp_path / "graph.safetensors")
    assert not list(tmp_path.iterdir())


def expect_error(path, pattern: str) -> None:
    with pytest.raises(GraphFileError, match=pattern) as caught:
        load_graph(path)
    message = str(caught.value)
    assert isinstance(caught.value, CircuitmapError)
    assert str(path) in message and "\n" not in message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.safetensors", "not found")


def test_truncated_file(saved, tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(saved[0].read_bytes()[:-10])
    expect_error(path, "not a readable safetensors file")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_text('{"nodes": []}')
    expect_error(path, "not a readable safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    expect_error(empty, "not a readable safetensors file")


def test_safetensors_file_without_graph_metadata(saved, tmp_path):
    _, arrays, _ = saved
    path = tmp_path / "plain.safetensors"
    write_raw(path, arrays, None)
    expect_error(path, "without circuitmap graph metadata")


def test_newer_schema_version(saved, tmp_path):
    _, arrays, document = saved
    path = tmp_path / "newer.safetensors"
    write_raw(path, arrays, {**document, "schema_version": GRAPH_FILE_VERSION + 1})
    expect_error(path, "newer than this circuitmap reads")


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"schema_version": "1"}, "no valid schema_version"),
        ({"prompt": None}, "'prompt' is not a str"),
        ({"tokens": ["a"]}, "'tokens' must hold only ints"),
        ({"labels": {"first": "x"}}, "label keys must be node indices"),
    ],
)
def test_bad_metadata(saved, tmp_path, change, pattern):
    _, arrays, document = saved
    path = tmp_path / "bad.safetensors"
    write_raw(path, arrays, {**document, **change})
    expect_error(path, pattern)


def test_metadata_field_missing(saved, tmp_path):
    _, arrays, document = saved
    del document["n_layers"]
    path = tmp_path / "bad.safetensors"
    write_raw(path, arrays, document)
    expect_error(path, "lacks 'n_layers'")


def test_missing_arrays(saved, tmp_path):
    _, arrays, document = saved
    del arrays["weights"], arrays["kind"]
    path = tmp_path / "missing.safetensors"
    write_raw(path, arrays, document)
    expect_error(path, "missing arrays: kind, weights")


@pytest.mark.parametrize(
    "name, edit, pattern",
    [
        ("position", lambda a: a[:-1], "position has .* kind has"),
        ("indptr", lambda a: a[:-1], "indptr has .* n_nodes \\+ 1"),
        ("weights", lambda a: a[:-1], "indices has .* weights has"),
        ("indptr", lambda a: a[::-1].copy(), "indptr must rise"),
        ("indices", lambda a: a + 10_000, "edge sources must be node indices"),
        ("target_probs", lambda a: a[:1], "target nodes but"),
        ("layer", lambda a: a.astype(np.float32), "layer has dtype float32"),
        ("value", lambda a: a.reshape(1, -1), "value has 2 dimensions"),
    ],
)
def test_inconsistent_arrays(saved, tmp_path, name, edit, pattern):
    _, arrays, document = saved
    arrays[name] = edit(arrays[name])
    path = tmp_path / "inconsistent.safetensors"
    write_raw(path, arrays, document)
    expect_error(path, pattern)


def test_token_lists_must_match(saved, tmp_path):
    _, arrays, document = saved
    path = tmp_path / "tokens.safetensors"
    write_raw(path, arrays, {**document, "token_strings": document["token_strings"][:-1]})
    expect_error(path, "tokens but")

"""Graph folders: written as one unit, read back whole, never a new document beside an old graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.graphs import random_graph

from circuitmap.errors import GraphFileError
from circuitmap.graphs import GraphFolder, graph_json, viewer_document
from circuitmap.graphs import folder as folder_module
from circuitmap.graphs.folder import DOCUMENT_FILE, GRAPH_FILE


def _written(tmp_path, seed: int = 0, name: str = "paris") -> tuple[GraphFolder, object, dict]:
    graph = random_graph(seed)
    document = graph_json(graph, slug=name)
    folder = GraphFolder(tmp_path / name)
    folder.write(graph, document)
    return folder, graph, document


def test_round_trip(tmp_path):
    folder, graph, document = _written(tmp_path)
    assert sorted(p.name for p in folder.path.iterdir()) == [DOCUMENT_FILE, GRAPH_FILE]
    assert folder.has_graph() and folder.has_document()
    read = folder.read_graph()
    np.testing.assert_array_equal(read.weights, graph.weights)
    assert folder.read_document() == json.loads(json.dumps(document))
    assert [p.name for p in tmp_path.iterdir()] == ["paris"], "nothing else is left beside the folder"


def test_rewriting_replaces_the_folder_as_one_unit(tmp_path):
    folder, _, _ = _written(tmp_path, seed=0)
    (folder.path / "check.png").write_bytes(b"old")
    newer = random_graph(1)
    folder.write(newer, graph_json(newer, slug="paris"))
    np.testing.assert_array_equal(folder.read_graph().weights, newer.weights)
    assert folder.read_document()["metadata"]["n_edges"]["full"] == newer.n_edges
    assert sorted(p.name for p in folder.path.iterdir()) == [DOCUMENT_FILE, GRAPH_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["paris"]


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path, monkeypatch):
    folder, graph, document = _written(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_module, "write_graph_json", full_disk)
    newer = random_graph(1)
    with pytest.raises(OSError, match="No space left"):
        folder.write(newer, graph_json(newer))
    assert {p.name: p.read_bytes() for p in folder.path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["paris"], "the half-written copy is removed"


def test_saved_supernodes_skip_malformed_entries(tmp_path):
    folder, graph, document = _written(tmp_path)
    ids = [node["node_id"] for node in document["nodes"]]
    document["qParams"]["supernodes"] = [["group", ids[0], ids[1]], ["lonely"], "junk", [7, ids[0]]]
    folder.write(graph, document)
    assert folder.saved_supernodes() == [("group", [ids[0], ids[1]])]
    document["qParams"] = "not an object"
    folder.write(graph, document)
    assert folder.saved_supernodes() == []
    assert GraphFolder(tmp_path / "absent").saved_supernodes() == []


def test_viewer_document_of_a_folder_a_document_or_a_graph_file(tmp_path):
    folder, graph, document = _written(tmp_path)
    stored = folder.read_document()
    assert viewer_document(folder.path) == stored
    assert viewer_document(folder.document_file) == stored
    assert viewer_document(folder.graph_file) == json.loads(json.dumps(graph_json(graph)))
    folder.document_file.unlink()
    assert viewer_document(folder.path)["metadata"]["pruned"] is True, "the full graph, pruned now"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda tmp: tmp / "empty", "holds neither"),
        (lambda tmp: tmp / "missing.json", "no graph at"),
        (lambda tmp: tmp / "broken.json", "is not a viewer JSON document"),
        (lambda tmp: tmp / "list.json", "needs metadata, nodes and links"),
    ],
)
def test_what_is_not_a_graph_is_refused(tmp_path, setup, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(GraphFileError, match=message):
        viewer_document(setup(tmp_path))


def test_a_folder_without_a_graph_and_a_file_in_the_way(tmp_path):
    with pytest.raises(GraphFileError, match="holds no full graph"):
        GraphFolder(tmp_path).read_graph()
    (tmp_path / "taken").write_text("x")
    graph = random_graph(0)
    with pytest.raises(GraphFileError, match="is not a folder"):
        GraphFolder(tmp_path / "taken").write(graph, graph_json(graph))

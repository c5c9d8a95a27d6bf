"""Graph folders: written as one unit, read back whole, never a new document beside an old graph."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from helpers.graphs import random_graph

from circuitmap.attribution.heads import HeadLoadings, top_cross_position_edges
from circuitmap.errors import GraphFileError
from circuitmap.graphs import GraphFolder, graph_json, viewer_document
from circuitmap.graphs import folder as folder_module
from circuitmap.graphs.files import save_head_loadings
from circuitmap.graphs.folder import DOCUMENT_FILE, GRAPH_FILE, HEADS_FILE


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


def _with_loadings(seed: int, graph_id: str) -> tuple[object, HeadLoadings]:
    """A random graph with id ``graph_id`` and made-up loadings of its three largest cross-position edges
    over two heads of every layer, split by key position for the first edge."""
    graph = replace(random_graph(seed), info={"graph_id": graph_id})
    edges = top_cross_position_edges(graph, 3)
    rng = np.random.default_rng(seed)
    edge, layer, head = (column.ravel() for column in np.meshgrid(edges, range(graph.n_layers), range(2)))
    key_position = np.where(edge == edges[0], rng.integers(0, 3, len(edge)), -1)
    value = rng.normal(size=len(edge))
    weight = graph.weights[edges].astype(np.float64)
    sums = np.array([value[edge == e].sum() for e in edges])
    loadings = HeadLoadings(
        edges, weight, weight - sums, edge, layer, head, key_position, value, graph.n_layers, 2
    )
    return graph, loadings


def test_head_loadings_round_trip_and_belong_to_their_graph(tmp_path):
    graph, loadings = _with_loadings(0, "first")
    folder = GraphFolder(tmp_path / "paris")
    folder.write(graph, graph_json(graph, slug="paris"), loadings)
    assert sorted(p.name for p in folder.path.iterdir()) == [DOCUMENT_FILE, GRAPH_FILE, HEADS_FILE]
    read = folder.read_head_loadings()
    for name in ("edges", "weight", "remainder", "edge", "layer", "head", "key_position", "value"):
        np.testing.assert_array_equal(getattr(read, name), getattr(loadings, name))
    assert (read.n_layers, read.n_heads) == (graph.n_layers, 2)
    np.testing.assert_array_equal(
        read.matrix(int(loadings.edges[0])), loadings.matrix(int(loadings.edges[0]))
    )

    other, elsewhere = _with_loadings(1, "second")
    folder.write(other, graph_json(other, slug="paris"))
    assert not folder.has_head_loadings(), "a rewrite without loadings drops the old ones"
    with pytest.raises(GraphFileError, match="holds no head loadings"):
        folder.read_head_loadings()
    save_head_loadings(loadings, folder.heads_file, "first")
    with pytest.raises(GraphFileError, match="come from different graphs"):
        folder.read_head_loadings()
    folder.heads_file.write_bytes(b"not safetensors")
    with pytest.raises(GraphFileError, match="not a readable safetensors file"):
        folder.read_head_loadings()
    beyond = replace(elsewhere, edges=elsewhere.edges + other.n_edges)
    with pytest.raises(GraphFileError, match="split edges that the graph lacks"):
        folder.write(other, graph_json(other, slug="paris"), beyond)
    twisted = replace(elsewhere, layer=elsewhere.layer + other.n_layers)
    with pytest.raises(GraphFileError, match="heads must lie within"):
        folder.write(other, graph_json(other, slug="paris"), twisted)

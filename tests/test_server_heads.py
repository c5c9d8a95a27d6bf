"""The explorer's attention endpoints: stored head loadings listed as the library split them, other edges
split on demand, a head's pattern and QK pairs as the library and the model give them (with feature labels
from the database), servers without a model, and bad requests refused one line at a time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers.attention import model_scores
from helpers.features import build_engine_database
from starlette.testclient import TestClient

from circuitmap.attribution.heads import edge_targets, head_loadings, top_cross_position_edges
from circuitmap.attribution.qk import qk_attribution
from circuitmap.features import FeatureStore
from circuitmap.graphs import GraphFolder
from circuitmap.graphs.files import save_head_loadings
from circuitmap.graphs.folder import GRAPH_FILE, HEADS_FILE
from circuitmap.graphs.ids import node_id, parse_feature_id
from circuitmap.server import create_app

BASE = "http://127.0.0.1:8041"
HEADS = "/api/graphs/cat/heads"
QK = "/api/graphs/cat/qk"
STORED = 3
N_LAYERS, N_HEADS = 3, 4
"""The engine's tiny llama."""


@pytest.fixture(scope="module")
def stored(engine, computed):
    """The loadings of the graph's ``STORED`` most influential cross-position edges."""
    edges = top_cross_position_edges(computed[0], STORED, by="influence")
    return head_loadings(engine.model, engine.transcoders, computed[0], edges)


@pytest.fixture
def graphs(tmp_path, computed, stored):
    """A graph folder holding ``cat`` (conftest's ``computed``) with its full graph and stored loadings."""
    GraphFolder(tmp_path / "graphs" / "cat").write(*computed, stored)
    return tmp_path / "graphs"


@pytest.fixture
def client(graphs, engine):
    with TestClient(create_app(graphs, engine), base_url=BASE) as client:
        yield client


def ends(graph, edge: int) -> dict:
    """The request body naming graph edge ``edge``."""
    target = int(edge_targets(graph, np.array([edge]))[0])
    return {"source": node_id(graph, int(graph.indices[edge])), "target": node_id(graph, target)}


def expect_entry(entry: dict, graph, loadings, edge: int) -> None:
    """``entry`` lists the loadings of ``edge`` as the library split it, largest first."""
    assert {key: entry[key] for key in ("source", "target")} == ends(graph, edge)
    matrix = loadings.matrix(edge)
    assert entry["weight"] == pytest.approx(float(graph.weights[edge]))
    assert [abs(value) for *_, value in entry["heads"]] == sorted(
        (abs(v) for *_, v in entry["heads"]), reverse=True
    )
    for layer, head, value in entry["heads"]:
        assert value == pytest.approx(matrix[layer, head], abs=1e-12)
    source_layer = graph.layer[graph.indices[edge]]
    assert {(layer, head) for layer, head, _ in entry["heads"]} == {
        (layer, head) for layer in range(source_layer + 1, N_LAYERS) for head in range(N_HEADS)
    }
    assert sum(value for *_, value in entry["heads"]) + entry["remainder"] == pytest.approx(entry["weight"])


def test_stored_loadings_are_listed_and_other_edges_split_on_demand(client, computed, stored, engine):
    graph = computed[0]
    listed = client.get(HEADS).json()
    assert {key: listed[key] for key in ("n_layers", "n_heads", "computable")} == {
        "n_layers": N_LAYERS,
        "n_heads": N_HEADS,
        "computable": True,
    }
    assert len(listed["edges"]) == STORED
    for entry, edge in zip(listed["edges"], stored.edges.tolist(), strict=True):
        expect_entry(entry, graph, stored, edge)
    first = client.post(HEADS, json=ends(graph, int(stored.edges[0]))).json()
    assert first["stored"] is True and first["heads"] == listed["edges"][0]["heads"]

    other = int(np.setdiff1d(top_cross_position_edges(graph, 20), stored.edges)[-1])
    answer = client.post(HEADS, json=ends(graph, other))
    assert answer.status_code == 200, answer.text
    assert answer.json()["stored"] is False
    expect_entry(answer.json(), graph, head_loadings(engine.model, engine.transcoders, graph, [other]), other)


def expected_pattern(engine, graph, layer: int, head: int) -> np.ndarray:
    """The head's attention pattern as the softmax of the masked scores the model computes."""
    queries, keys, scaling = model_scores(engine.model, torch.tensor([graph.tokens]))[layer]
    group = head // (queries.shape[1] // keys.shape[1])
    scores = scaling * queries[0, head].double() @ keys[0, group].double().T
    causal = torch.ones_like(scores, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(causal, -torch.inf), -1).numpy()


def test_qk_gives_the_pattern_and_pairs_of_the_library(graphs, engine, computed, stored, tmp_path):
    graph = computed[0]
    edge = int(stored.edges[0])
    layer, head = np.unravel_index(np.abs(stored.matrix(edge)).argmax(), (N_LAYERS, N_HEADS))
    site = {
        "layer": int(layer),
        "head": int(head),
        "query": int(graph.position[edge_targets(graph, np.array([edge]))[0]]),
        "key": int(graph.position[graph.indices[edge]]),
    }
    database = build_engine_database(engine, tmp_path)
    with FeatureStore(database, transcoders=engine.transcoders) as features:
        with TestClient(create_app(graphs, engine, features=features), base_url=BASE) as client:
            answer = client.post(QK, json={**site, "top": 40})
            assert answer.status_code == 200, answer.text
            data = answer.json()
            assert client.post(QK, json=site).json()["pairs"] == data["pairs"][:12]
        result = qk_attribution(engine.model, engine.transcoders, graph, *site.values())
        assert data["score"] == pytest.approx(result.score, abs=1e-12)
        assert [(p["query"], p["key"]) for p in data["pairs"]] == [pair[:2] for pair in result.top_pairs(40)]
        assert [p["value"] for p in data["pairs"]] == pytest.approx(
            [pair[2] for pair in result.top_pairs(40)]
        )
        assert [len(data[side]) for side in ("query_nodes", "key_nodes")] == [
            min(40, len(nodes)) for nodes in (result.query_nodes, result.key_nodes)
        ]
        assert abs(data["query_nodes"][0]["value"]) == pytest.approx(np.abs(result.query_totals).max())
        shown = {p[side] for p in data["pairs"] for side in ("query", "key")}
        shown |= {entry["id"] for side in ("query_nodes", "key_nodes") for entry in data[side]}
        labelled = {node: features.label(*parse_feature_id(node)[:2]) for node in shown if node[0].isdigit()}
        assert data["labels"] == {node: label.text for node, label in labelled.items() if label is not None}
        assert data["labels"], "some features of the pairs have labels in the database"
    pattern = expected_pattern(engine, graph, site["layer"], site["head"])
    assert [len(row) for row in data["pattern"]] == list(range(1, len(graph.tokens) + 1))
    for query, row in enumerate(data["pattern"]):
        np.testing.assert_allclose(row, pattern[query, : query + 1], atol=1e-5)


def test_without_a_model_stored_loadings_are_served_and_the_rest_explained(graphs, computed, stored):
    """A server without a model serves the stored loadings, explains what it cannot compute, and deletes a
    graph's loadings with it."""
    graph = computed[0]
    with TestClient(create_app(graphs), base_url=BASE) as client:
        listed = client.get(HEADS).json()
        assert listed["computable"] is False and len(listed["edges"]) == STORED
        assert client.post(HEADS, json=ends(graph, int(stored.edges[1]))).json()["stored"] is True
        other = int(np.setdiff1d(top_cross_position_edges(graph, 20), stored.edges)[0])
        missing = client.post(HEADS, json=ends(graph, other))
        assert missing.status_code == 404 and "--head-loadings N" in missing.json()["detail"]
        site = {"layer": 1, "head": 0, "query": 2, "key": 1}
        refused = client.post(QK, json=site)
        assert refused.status_code == 404 and "--model and --transcoders" in refused.json()["detail"]
        assert client.delete("/api/graphs/cat").status_code == 204
    assert not (graphs / "cat").exists(), "deleting a graph deletes its stored loadings too"


def test_bad_requests_are_refused_one_line_each(client, computed):
    graph = computed[0]
    edge = int(top_cross_position_edges(graph, 1)[0])
    good = ends(graph, edge)
    same = next(
        e
        for e in range(graph.n_edges)
        if graph.position[graph.indices[e]] == graph.position[edge_targets(graph, np.array([e]))[0]]
    )
    site = {"layer": 1, "head": 0, "query": 3, "key": 1}
    cases = [
        (HEADS, {**good, "weight": 1}, 400, "unknown fields: weight"),
        (HEADS, {**good, "source": 3}, 400, "source must be a node id"),
        (HEADS, {"source": good["source"]}, 400, "target must be a node id"),
        (HEADS, {**good, "source": "9_9_99"}, 400, "'9_9_99' is not a node of the full graph"),
        (HEADS, {"source": good["target"], "target": good["source"]}, 400, "the full graph has no edge"),
        (HEADS, ends(graph, same), 400, "is not cross-position: both nodes sit at position"),
        (QK, {**site, "layer": "1"}, 400, "layer must be a whole number"),
        (QK, {**site, "key": True}, 400, "key must be a whole number"),
        (QK, {k: v for k, v in site.items() if k != "head"}, 400, "head must be a whole number"),
        (QK, {**site, "top": 0}, 400, "top must be a whole number from 1 to 100"),
        (QK, {**site, "top": 101}, 400, "top must be a whole number from 1 to 100"),
        (QK, {**site, "query": 1, "key": 3}, 400, "comes after query position 1: attention is causal"),
        (QK, {**site, "layer": 3}, 400, "layer 3 is out of range: the model has 3 layers"),
        (QK, {**site, "colour": 1}, 400, "unknown fields: colour"),
        ("/api/graphs/nope/heads", good, 404, "no graph named 'nope'"),
        ("/api/graphs/nope/qk", site, 404, "no graph named 'nope'"),
    ]
    for url, body, status, message in cases:
        response = client.post(url, json=body)
        detail = response.json()["detail"]
        assert response.status_code == status and message in detail and "\n" not in detail, (body, detail)
    for content in (b"[1]", b"{"):
        response = client.post(HEADS, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400


def test_a_graph_without_its_full_graph_or_from_elsewhere(client, graphs, computed, stored):
    graph, document = computed
    folder = GraphFolder(graphs / "cat")
    save_head_loadings(stored, folder.heads_file, "another-graph")
    mixed = client.get(HEADS)
    assert mixed.status_code == 409 and f"its {HEADS_FILE} splits the edges of another graph" in mixed.text
    site = {"layer": 1, "head": 0, "query": 3, "key": 1}
    folder.write(replace(graph, model_name="another-model"), document)
    assert client.get(HEADS).json() == {"n_layers": None, "n_heads": None, "computable": False, "edges": []}
    for url, body in ((HEADS, ends(graph, int(stored.edges[0]))), (QK, site)):
        response = client.post(url, json=body)
        assert (
            response.status_code == 409 and "computed with model 'another-model'" in response.json()["detail"]
        )
    (folder.path / GRAPH_FILE).unlink()
    assert client.get(HEADS).json() == {"n_layers": None, "n_heads": None, "computable": False, "edges": []}
    for url, body in ((HEADS, ends(graph, int(stored.edges[0]))), (QK, site)):
        response = client.post(url, json=body)
        assert (
            response.status_code == 404 and f"has no full graph ({GRAPH_FILE})" in response.json()["detail"]
        )

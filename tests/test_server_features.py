"""The explorer server with a feature database: dashboards, search, label edits, their protections, and the
feature labels that graph documents carry."""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import UTC, datetime

import jsonschema
import pytest
import torch
from helpers.features import ENGINE_BUILD, build_engine_database
from helpers.graphs import write_graph_folder
from helpers.transcoders import random_transcoders
from starlette.testclient import TestClient

from circuitmap.cli import main
from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.features.graph_labels import add_feature_labels
from circuitmap.graphs.export import json_schema, write_graph_json
from circuitmap.server import Engine, create_app

BASE = "http://127.0.0.1:8041"
FEATURE_TYPE = "cross layer transcoder"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(engine, tmp_path_factory):
    """A feature database of the engine's transcoders, built once."""
    return build_engine_database(engine, tmp_path_factory.mktemp("features"))


@pytest.fixture
def db_path(built, tmp_path):
    """A fresh copy of the built database, so label edits stay within one test."""
    return shutil.copy(built, tmp_path / "features.sqlite")


@pytest.fixture
def features(db_path, engine):
    with FeatureStore(db_path, transcoders=engine.transcoders) as store:
        yield store


@pytest.fixture
def graphs(tmp_path, computed):
    """A graph folder holding one graph, ``cat`` (conftest's ``computed``), whose feature nodes have no
    labels of their own."""
    graph, document = computed
    return write_graph_folder(tmp_path, document, graph)


@pytest.fixture
def client(graphs, features):
    with TestClient(create_app(graphs, features=features), base_url=BASE) as client:
        yield client


def labelled_feature(store: FeatureStore) -> tuple[int, int]:
    """A feature of the database with an automatic label that holds a word."""
    for layer in range(store.n_layers):
        for feature in range(store.d_features):
            label = store.label(layer, feature)
            if label is not None and label.source == "auto" and re.search(r"\w", label.text):
                return layer, feature
    raise AssertionError("the tiny database has no labelled feature")


def feature_nodes(document: dict) -> list[dict]:
    return [node for node in document["nodes"] if node["feature_type"] == FEATURE_TYPE]


def key_of(node: dict) -> tuple[int, int]:
    layer, feature, _ = node["node_id"].split("_")
    return int(layer), int(feature)


def schema_with_label_source() -> dict:
    """The viewer schema, with ``label_source`` on nodes if the schema does not name it yet."""
    schema = json_schema()
    properties = schema["$defs"]["node"]["properties"]
    properties.setdefault("label_source", {"enum": ["auto", "manual", "llm"]})
    return schema


# ---------------------------------------------------------------- reading


def test_config_names_the_database(client, features, graphs):
    config = client.get("/api/config").json()["features"]
    assert config["n_layers"] == features.n_layers and config["d_features"] == features.d_features
    assert config["tokens"] >= ENGINE_BUILD.tokens
    with TestClient(create_app(graphs), base_url=BASE) as plain:
        assert plain.get("/api/config").json()["features"] is None


def test_dashboard_is_the_store_dashboard(client, features):
    layer, feature = labelled_feature(features)
    response = client.get(f"/api/features/{layer}/{feature}")
    assert response.status_code == 200
    dashboard = response.json()
    assert dashboard == features.get(layer, feature).as_json()
    assert dashboard["top_examples"] and dashboard["label"]["source"] == "auto"
    assert len(dashboard["histogram_edges"]) == len(dashboard["histogram"]) + 1
    example = dashboard["top_examples"][0]
    assert len(example["tokens"]) == len(example["activations"])
    assert example["activations"][example["peak"]] == pytest.approx(example["max_activation"], rel=1e-6)


def test_search_by_label_token_and_number(client, features):
    layer, feature = labelled_feature(features)
    direct = client.get(f"/api/features/search?q={layer}/{feature}").json()["hits"]
    assert [(hit["layer"], hit["feature"]) for hit in direct] == [(layer, feature)]
    word = re.findall(r"\w+", features.label(layer, feature).text)[0]
    hits = client.get("/api/features/search", params={"q": word, "limit": "100"}).json()["hits"]
    assert hits and all({"layer", "feature", "label", "tokens"} <= set(hit) for hit in hits)
    assert client.get("/api/features/search?q=").json() == {"hits": []}
    limited = client.get("/api/features/search", params={"q": word, "limit": "1"}).json()["hits"]
    assert len(limited) <= 1


def test_a_manual_label_round_trips_with_author_and_time(client, features, db_path, engine):
    layer, feature = labelled_feature(features)
    automatic = features.label(layer, feature).text
    before = datetime.now(UTC).replace(microsecond=0)
    response = client.put(
        f"/api/features/{layer}/{feature}/label", json={"text": "  cats  sitting ", "author": "Ada"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["label"]["text"] == "cats sitting" and body["label"]["source"] == "manual"
    assert body["label"]["author"] == "Ada" and body["saved"]["author"] == "Ada"
    created = datetime.fromisoformat(body["label"]["created"])
    assert before <= created <= datetime.now(UTC) and [x["source"] for x in body["labels"]][-1] == "manual"

    with FeatureStore(db_path, transcoders=engine.transcoders) as fresh:
        stored = fresh.label(layer, feature)
        assert (stored.text, stored.source, stored.author) == ("cats sitting", "manual", "Ada")
    assert client.get(f"/api/features/{layer}/{feature}").json()["label"]["text"] == "cats sitting"
    found = client.get("/api/features/search", params={"q": "cats sitting"}).json()["hits"]
    assert (layer, feature) in {(hit["layer"], hit["feature"]) for hit in found}

    cleared = client.put(f"/api/features/{layer}/{feature}/label", json={"text": ""}).json()
    assert cleared["label"]["text"] == automatic and cleared["label"]["source"] == "auto"


# ---------------------------------------------------------------- protections


def test_label_edits_are_protected_like_other_writes(graphs, features):
    layer, feature = labelled_feature(features)
    path = f"/api/features/{layer}/{feature}/label"
    with TestClient(create_app(graphs, features=features, max_body=1000), base_url=BASE) as client:
        evil = client.put(path, json={"text": "x"}, headers={"origin": "http://evil.example"})
        assert evil.status_code == 403
        other_port = client.put(path, json={"text": "x"}, headers={"origin": "http://127.0.0.1:9999"})
        assert other_port.status_code == 403
        plain = client.put(path, content=b'{"text": "x"}', headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        assert client.put(path, json={"text": "x" * 2000}).status_code == 413
        assert "access-control-allow-origin" not in client.get(f"/api/features/{layer}/{feature}").headers
        same = client.put(path, json={"text": "fine"}, headers={"origin": BASE})
        assert same.status_code == 200
    with TestClient(create_app(graphs, features=features), base_url="http://evil.example") as client:
        assert client.get(f"/api/features/{layer}/{feature}").status_code == 421
    assert features.label(layer, feature).text == "fine"


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/api/features/x/1", None, "layer must be a whole number"),
        ("/api/features/0/-1", None, "feature must be a whole number"),
        ("/api/features/99/0", None, "no feature 0 in layer 99"),
        ("/api/features/0/100000", None, "no feature 100000"),
        ("/api/features/search?q=" + "a" * 201, None, "at most 200"),
        ("/api/features/search?q=a&limit=0", None, "limit must be"),
        ("/api/features/0/1/label", {"text": 3}, "must be a string"),
        ("/api/features/0/1/label", {"author": "me"}, "must be a string"),
        ("/api/features/0/1/label", {"text": "ok", "author": 7}, "author must be a string"),
        ("/api/features/0/1/label", {"text": "x" * 501}, "at most 500"),
        ("/api/features/0/1/label", {"text": "ok", "author": "a" * 101}, "at most 100"),
        ("/api/features/0/1/label", {"text": "\ud800"}, "not valid Unicode"),
        ("/api/features/9/1/label", {"text": "ok"}, "no feature 1 in layer 9"),
        ("/api/features/0/1/label", [1], "must be a JSON object"),
    ],
)
def test_bad_requests_get_one_line_errors(client, features, path, body, message):
    if body is None:
        response = client.get(path)
    else:
        content = json.dumps(body).encode()
        response = client.put(path, content=content, headers={"content-type": "application/json"})
    detail = response.json()["detail"]
    assert response.status_code == 400 and message in detail and "\n" not in detail
    assert features.label(0, 1) is None or features.label(0, 1).source != "manual"


def test_without_a_database_the_endpoints_say_so(graphs):
    with TestClient(create_app(graphs), base_url=BASE) as client:
        for response in (
            client.get("/api/features/0/1"),
            client.get("/api/features/search?q=cat"),
            client.put("/api/features/0/1/label", json={"text": "x"}),
        ):
            assert response.status_code == 404 and "--features" in response.json()["detail"]


def test_a_database_of_another_set_is_refused(graphs, db_path, engine):
    other = Engine(
        engine.model,
        random_transcoders("plt-topk-skip", 3, 32, seed=1).to(dtype=torch.float64),
        model_spec="tiny-llama",
        transcoders_spec="other",
    )
    with pytest.raises(CircuitmapError, match="another transcoder set"):
        FeatureStore.open_for(other.transcoders, str(db_path))
    with FeatureStore(db_path) as unchecked, pytest.raises(CircuitmapError, match="another transcoder set"):
        create_app(graphs, other, features=unchecked)
    with FeatureStore.open_for(engine.transcoders, str(db_path)) as store:
        assert store.n_layers == 3


def test_the_default_database_is_opened_when_it_exists(db_path, engine, tmp_path, monkeypatch):
    default = tmp_path / "cache" / "default.sqlite"
    monkeypatch.setattr("circuitmap.features.store.default_database_path", lambda transcoders: default)
    assert FeatureStore.open_for(engine.transcoders) is None
    assert FeatureStore.open_for(None) is None
    default.parent.mkdir()
    shutil.copy(db_path, default)
    with FeatureStore.open_for(engine.transcoders) as store:
        assert store.path == default


def test_serve_reports_a_missing_database(tmp_path, capsys):
    missing = tmp_path / "missing.sqlite"
    assert main(["serve", "--graphs", str(tmp_path / "g"), "--features", str(missing), "--port", "0"]) == 2
    assert "no such feature database" in capsys.readouterr().err


# ---------------------------------------------------------------- labels in graph documents


def test_served_documents_carry_feature_labels(client, graphs, features):
    on_disk = json.loads((graphs / "cat" / "graph.json").read_text())
    nodes = feature_nodes(on_disk)
    assert nodes and not any(node["clerp"] for node in nodes)
    own = nodes[0]
    on_disk["nodes"][on_disk["nodes"].index(own)]["clerp"] = "my own label"
    write_graph_json(on_disk, graphs / "cat" / "graph.json")

    response = client.get("/api/graphs/cat")
    served = {node["node_id"]: node for node in feature_nodes(response.json())}
    labels = features.labels_of([key_of(node) for node in nodes])
    assert served[own["node_id"]]["clerp"] == "my own label" and "label_source" not in served[own["node_id"]]
    labelled = [node for node in nodes[1:] if key_of(node) in labels]
    assert labelled
    for node in labelled:
        label = labels[key_of(node)]
        assert served[node["node_id"]]["clerp"] == label.text
        assert served[node["node_id"]]["label_source"] == label.source
    jsonschema.validate(response.json(), schema_with_label_source())

    revision = response.headers["etag"].strip('"')
    saved = client.put("/api/graphs/cat/state", json={"revision": revision, "pinnedIds": []})
    assert saved.status_code == 200
    assert "label_source" not in (graphs / "cat" / "graph.json").read_text()

    layer, feature = key_of(labelled[0])
    client.put(f"/api/features/{layer}/{feature}/label", json={"text": "edited in the database"})
    again = {node["node_id"]: node for node in client.get("/api/graphs/cat").json()["nodes"]}
    assert again[labelled[0]["node_id"]]["clerp"] == "edited in the database"
    assert again[labelled[0]["node_id"]]["label_source"] == "manual"


def test_a_document_of_another_set_is_served_unlabelled_and_refused_by_the_library(client, graphs, features):
    on_disk = json.loads((graphs / "cat" / "graph.json").read_text())
    on_disk["metadata"]["info"]["transcoders_fingerprint"] = "f" * 64
    write_graph_json(on_disk, graphs / "cat" / "graph.json")
    served = client.get("/api/graphs/cat").json()
    assert not any(node.get("label_source") for node in feature_nodes(served))
    with pytest.raises(CircuitmapError, match="another transcoder set .* than the feature database"):
        add_feature_labels(on_disk, features)


def test_a_document_with_a_malformed_feature_id_is_served_as_stored(client, graphs):
    odd = {
        "metadata": {},
        "nodes": [{"node_id": "odd", "feature_type": FEATURE_TYPE, "clerp": ""}],
        "links": [],
    }
    (graphs / "odd").mkdir()
    (graphs / "odd" / "graph.json").write_text(json.dumps(odd))
    response = client.get("/api/graphs/odd")
    assert response.status_code == 200 and response.json() == odd


def test_add_feature_labels_asks_once_and_skips_unknown_features(computed, features, monkeypatch):
    document = json.loads(json.dumps(computed[1]))
    document["nodes"].append({**feature_nodes(document)[0], "node_id": "99_0_1", "clerp": ""})
    calls = []
    original = features.labels_of
    monkeypatch.setattr(features, "labels_of", lambda keys: calls.append(list(keys)) or original(keys))
    add_feature_labels(document, features)
    assert len(calls) == 1 and (99, 0) not in calls[0]
    stranger = next(node for node in document["nodes"] if node["node_id"] == "99_0_1")
    assert stranger["clerp"] == "" and "label_source" not in stranger
    tokens = [node for node in document["nodes"] if node["feature_type"] == "embedding"]
    assert all("label_source" not in node for node in tokens)


def test_computed_graphs_carry_feature_labels(graphs, engine, features):
    with TestClient(create_app(graphs, engine, features=features), base_url=BASE) as client:
        job_id = client.post("/api/jobs", json={"prompt": "A cat ran", "name": "ran"}).json()["id"]
        job_path = f"/api/jobs/{job_id}"
        deadline = time.monotonic() + 60
        while (job := client.get(job_path).json())["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["state"] == "done", job
        written = json.loads((graphs / "ran" / "graph.json").read_text())
    nodes = feature_nodes(written)
    labels = features.labels_of([key_of(node) for node in nodes])
    assert any(key_of(node) in labels for node in nodes)
    for node in nodes:
        label = labels.get(key_of(node))
        assert node["clerp"] == (label.text if label else "")
        assert node.get("label_source") == (label.source if label else None)
    jsonschema.validate(written, schema_with_label_source())

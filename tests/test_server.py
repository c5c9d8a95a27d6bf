"""The explorer server: graph folder API, saved state, jobs, logit lens, HTML export and each safety rule."""

from __future__ import annotations

import json
import shutil
import threading
import time
from html.parser import HTMLParser

import jsonschema
import numpy as np
import pytest
import torch
from helpers.graphs import SERVER_PROMPT, write_graph_folder
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders
from starlette.testclient import TestClient

from circuitmap.cli import main
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.features import logit_lens
from circuitmap.graphs import subgraph_scores
from circuitmap.graphs.export import json_schema
from circuitmap.server import GraphStore, check_bind, create_app, render_html
from circuitmap.server.export_html import DOCUMENT_ID


@pytest.fixture
def graphs(tmp_path, computed):
    """A graph folder holding one graph, ``cat`` (conftest's ``computed``), with its full graph."""
    graph, document = computed
    return write_graph_folder(tmp_path, document, graph)


@pytest.fixture
def client(graphs):
    with TestClient(create_app(graphs), base_url="http://127.0.0.1:8041") as client:
        yield client


def _state(document: dict) -> tuple[list[str], str]:
    features = [n["node_id"] for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return features, features[0]


def test_lists_and_serves_graphs(client, computed):
    listed = client.get("/api/graphs").json()["graphs"]
    assert [entry["name"] for entry in listed] == ["cat"]
    entry = listed[0]
    assert entry["prompt"] == SERVER_PROMPT and entry["exact_scores"] is True
    assert entry["n_nodes"]["exported"] == len(computed[1]["nodes"])
    assert entry["created"] == computed[0].info["created"]
    response = client.get("/api/graphs/cat")
    assert response.status_code == 200 and response.headers["etag"].strip('"')
    assert response.json() == json.loads(json.dumps(computed[1]))
    assert client.get("/api/config").json()["can_compute"] is False


def test_page_and_assets_come_from_the_package(client):
    page = client.get("/graph/cat")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for source in ("/static/", "https://", "http://"):
        assert (source in page.text) == (source == "/static/")
    parser = _Scripts()
    parser.feed(page.text)
    assert parser.links and all(link.startswith("/static/") for link in parser.links)
    for link in parser.links:
        asset = client.get(link)
        assert asset.status_code == 200 and asset.headers["content-type"].split("/")[1].startswith(
            ("javascript", "css")
        )


@pytest.mark.parametrize(
    "path",
    [
        "/static/store.py",
        "/static/..%2Fstore.py",
        "/static/%2e%2e%2fapp.py",
        "/static/../app.py",
        "/static/.hidden",
    ],
)
def test_no_endpoint_reads_other_files(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "import" not in response.text


def test_saving_state_writes_it_into_the_document_atomically(client, graphs):
    document = client.get("/api/graphs/cat")
    revision = document.headers["etag"].strip('"')
    features, first = _state(document.json())
    state = {
        "revision": revision,
        "pinnedIds": features[:1],
        "supernodes": [["pair", features[1], features[2]]],
        "clickedId": first,
        "labels": {first: "cat-ish", features[1]: "sits"},
        "view": {"nodeThreshold": 0.5, "edgeThreshold": 0.01, "showErrors": False},
    }
    saved = client.put("/api/graphs/cat/state", json=state)
    assert saved.status_code == 200
    on_disk = json.loads((graphs / "cat" / "graph.json").read_text())
    jsonschema.validate(on_disk, json_schema())
    q_params = on_disk["qParams"]
    assert q_params["pinnedIds"] == [features[0], features[1], features[2]]
    assert q_params["supernodes"] == [["pair", features[1], features[2]]]
    assert q_params["clickedId"] == first and q_params["view"]["nodeThreshold"] == 0.5
    clerps = {node["node_id"]: node["clerp"] for node in on_disk["nodes"]}
    assert clerps[first] == "cat-ish" and clerps[features[1]] == "sits"
    assert saved.json()["revision"] == client.get("/api/graphs/cat").headers["etag"].strip('"')
    assert not [path for path in (graphs / "cat").iterdir() if path.name.startswith(".")]

    stale = client.put("/api/graphs/cat/state", json=state)
    assert stale.status_code == 409 and "reload" in stale.json()["detail"]


def test_a_target_label_keeps_the_output_form(client, graphs):
    document = client.get("/api/graphs/cat").json()
    target = next(node for node in document["nodes"] if node["feature_type"] == "logit")
    assert (
        client.put("/api/graphs/cat/state", json={"labels": {target["node_id"]: "next"}}).status_code == 200
    )
    saved = json.loads((graphs / "cat" / "graph.json").read_text())
    jsonschema.validate(saved, json_schema())
    clerp = next(node["clerp"] for node in saved["nodes"] if node["node_id"] == target["node_id"])
    assert clerp.startswith('Output "next" (p=')


@pytest.mark.parametrize(
    "state, message",
    [
        ({"pinnedIds": ["99_1_1"]}, "unknown node ids"),
        ({"pinnedIds": "1_2_3"}, "list of node ids"),
        ({"supernodes": [["only a label"]]}, "at least one node id"),
        ({"labels": {"nope": "x"}}, "unknown node ids"),
        ({"clickedId": "nope"}, "clickedId"),
        ({"view": {"nodeThreshold": 2}}, "in [0, 1]"),
        ({"view": {"zoom": 1}}, "unknown view field"),
        ({"colour": "red"}, "unknown state fields"),
    ],
)
def test_bad_state_is_refused_and_nothing_changes(client, graphs, state, message):
    before = (graphs / "cat" / "graph.json").read_bytes()
    response = client.put("/api/graphs/cat/state", json=state)
    assert response.status_code == 400 and message in response.json()["detail"]
    assert (graphs / "cat" / "graph.json").read_bytes() == before


def test_a_long_label_is_refused(client, computed):
    features, first = _state(computed[1])
    response = client.put("/api/graphs/cat/state", json={"labels": {first: "x" * 501}})
    assert response.status_code == 400 and "at most 500" in response.json()["detail"]


def test_rename_and_delete(client, graphs):
    assert client.post("/api/graphs/cat/rename", json={"name": "feline"}).json() == {"name": "feline"}
    assert json.loads((graphs / "feline" / "graph.json").read_text())["metadata"]["slug"] == "feline"
    assert client.get("/api/graphs/cat").status_code == 404
    shutil.copytree(graphs / "feline", graphs / "other")
    assert client.post("/api/graphs/feline/rename", json={"name": "other"}).status_code == 409
    for bad in ("..", ".hidden", "a/b", "/etc", "", "x" * 101):
        response = client.post("/api/graphs/feline/rename", json={"name": bad})
        assert response.status_code == 400 and "invalid graph name" in response.json()["detail"]
    (graphs / "feline" / "notes.txt").write_text("mine")
    assert client.delete("/api/graphs/feline").status_code == 204
    assert [path.name for path in (graphs / "feline").iterdir()] == ["notes.txt"]
    assert client.delete("/api/graphs/other").status_code == 204 and not (graphs / "other").exists()
    assert client.get("/api/graphs").json()["graphs"] == []


def test_names_cannot_leave_the_graph_folder(client, graphs, tmp_path):
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "graph.json").write_text('{"secret": true}')
    (graphs / "link").symlink_to(secret, target_is_directory=True)
    (graphs / "cat" / "graph.json").rename(graphs / "cat" / "real.json")
    (graphs / "cat" / "graph.json").symlink_to(secret / "graph.json")
    assert client.get("/api/graphs").json()["graphs"] == []
    for path in ("/api/graphs/link", "/api/graphs/cat", "/api/graphs/..", "/api/graphs/%2e%2e"):
        response = client.get(path)
        assert response.status_code in (400, 404) and "secret" not in response.text
    assert client.get("/api/graphs/..%2Foutside").status_code in (400, 404)
    assert client.delete("/api/graphs/link").status_code == 404 and (secret / "graph.json").exists()
    assert client.post("/api/graphs/link/rename", json={"name": "mine"}).status_code == 404


def test_body_size_is_limited(graphs):
    with TestClient(create_app(graphs, max_body=1000), base_url="http://localhost") as client:
        big = {"labels": {"x": "y" * 2000}}
        response = client.put("/api/graphs/cat/state", json=big)
        assert response.status_code == 413

        def chunks():
            for _ in range(10):
                yield b" " * 500

        streamed = client.put(
            "/api/graphs/cat/state", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413


def test_no_cors_and_no_cross_site_writes(client):
    evil = {"origin": "http://evil.example"}
    read = client.get("/api/graphs", headers=evil)
    assert "access-control-allow-origin" not in read.headers
    preflight = client.options(
        "/api/graphs/cat/state", headers={**evil, "access-control-request-method": "PUT"}
    )
    assert preflight.status_code >= 400 and "access-control-allow-origin" not in preflight.headers
    assert client.put("/api/graphs/cat/state", json={}, headers=evil).status_code == 403
    assert client.delete("/api/graphs/cat", headers=evil).status_code == 403
    plain = client.post(
        "/api/graphs/cat/rename", content=b'{"name": "x"}', headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    other_port = client.put("/api/graphs/cat/state", json={}, headers={"origin": "http://127.0.0.1:9999"})
    assert other_port.status_code == 403
    same = client.put("/api/graphs/cat/state", json={}, headers={"origin": "http://127.0.0.1:8041"})
    assert same.status_code == 200


def test_errors_are_one_line_json(client, graphs):
    for response, status in (
        (client.get("/api/nothing"), 404),
        (client.post("/api/graphs", json={}), 405),
        (
            client.put(
                "/api/graphs/cat/state", content=b"[" * 50_000, headers={"content-type": "application/json"}
            ),
            400,
        ),
        (
            client.put(
                "/api/graphs/cat/state",
                content=json.dumps({"labels": {_state_ids(graphs)[0]: "\ud800"}}).encode(),
                headers={"content-type": "application/json"},
            ),
            400,
        ),
    ):
        assert response.status_code == status and "\n" not in response.json()["detail"]


def test_a_document_without_viewer_state_is_refused_not_corrupted(client, graphs):
    broken = {"metadata": {"prompt": "x"}, "nodes": [], "links": []}
    (graphs / "broken").mkdir()
    (graphs / "broken" / "graph.json").write_text(json.dumps(broken))
    response = client.put("/api/graphs/broken/state", json={"pinnedIds": []})
    assert response.status_code == 422 and "qParams" in response.json()["detail"]
    assert json.loads((graphs / "broken" / "graph.json").read_text()) == broken
    (graphs / "nometa").mkdir()
    (graphs / "nometa" / "graph.json").write_text("[]")
    assert client.post("/api/graphs/nometa/rename", json={"name": "renamed"}).status_code == 422
    assert (graphs / "nometa").is_dir() and not (graphs / "renamed").exists()


def _state_ids(graphs) -> list[str]:
    document = json.loads((graphs / "cat" / "graph.json").read_text())
    return [node["node_id"] for node in document["nodes"]]


def test_requests_must_address_this_machine(graphs):
    app = create_app(graphs)
    with TestClient(app, base_url="http://evil.example") as client:
        response = client.get("/api/graphs")
        assert response.status_code == 421 and "localhost" in response.json()["detail"]
    with TestClient(app, base_url="http://localhost:8041") as client:
        assert client.get("/api/graphs").status_code == 200
    with TestClient(create_app(graphs, allowed_hosts=None), base_url="http://10.1.2.3") as client:
        assert client.get("/api/graphs").status_code == 200


def test_network_servers_still_check_the_host(monkeypatch):
    import socket

    from circuitmap.server.launch import allowed_hosts

    assert allowed_hosts("127.0.0.1", []) == {"localhost", "127.0.0.1", "::1"}
    network = allowed_hosts("0.0.0.0", ["proxy.example"])
    assert {"localhost", "0.0.0.0", "proxy.example", socket.gethostname().lower()} <= network
    assert "evil.example" not in network
    assert allowed_hosts("0.0.0.0", ["*"]) is None


def test_non_loopback_needs_an_explicit_host(monkeypatch, tmp_path, capsys):
    check_bind("127.0.0.1", explicit=False)
    check_bind("::1", explicit=False)
    check_bind("localhost", explicit=False)
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(CircuitmapError, match="pass --host"):
            check_bind(host, explicit=False)
        check_bind(host, explicit=True)
    served = []
    monkeypatch.setattr(
        "circuitmap.server.launch.serve", lambda app, sock, url: served.append(url) or sock.close()
    )
    assert main(["serve", "--graphs", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 0
    assert "anyone who can reach this machine" in capsys.readouterr().err
    assert main(["serve", "--graphs", str(tmp_path), "--port", "0"]) == 0
    assert served[0].startswith("http://0.0.0.0:") and served[1].startswith("http://127.0.0.1:")


def test_serve_reports_a_busy_port_and_half_given_engines(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--graphs", str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--graphs", str(tmp_path), "--model", "m"]) == 2
    assert "--model and --transcoders go together" in capsys.readouterr().err


def test_every_kept_link_is_served_on_request(client, computed):
    graph, document = computed
    served = client.get("/api/graphs/cat/links").json()["links"]
    key = lambda link: (link["source"], link["target"], link["weight"])  # noqa: E731
    assert sorted(map(key, served)) == sorted(map(key, document["links"]))
    assert client.get("/api/graphs/nothing/links").status_code == 404


def test_scores_are_exact_with_the_full_graph(client, computed, graphs):
    graph, document = computed
    features, _ = _state(document)
    body = {"pinnedIds": features[:3], "supernodes": [["g", features[3]]]}
    result = client.post("/api/graphs/cat/scores", json=body).json()
    expected = subgraph_scores(graph, features[:4])
    assert result["exact"] is True
    assert result["replacement"] == pytest.approx(expected.replacement, rel=1e-12)
    assert result["completeness"] == pytest.approx(expected.completeness, rel=1e-12)
    assert client.post("/api/graphs/cat/scores", json={"pinnedIds": ["nope"]}).status_code == 400
    (graphs / "cat" / "graph.safetensors").unlink()
    assert client.post("/api/graphs/cat/scores", json=body).status_code == 404


def test_logit_lens_is_the_direction_through_the_final_norm_and_unembedding():
    model = tiny_model("gpt2", dtype=torch.float64)
    transcoders = random_transcoders("clt-topk", model.n_layers, 32).to(dtype=torch.float64)
    lens = logit_lens(model, transcoders, [(1, 5)], k=4)[0]
    direction = transcoders.decoder_vectors(1, torch.tensor([5]))[0].sum(0)
    norm = model.hf_model.transformer.ln_f
    centred = direction - direction.mean()
    normed = norm.weight * centred / (centred.pow(2).mean() + norm.eps).sqrt()
    with torch.no_grad():
        logits = model.unembedding @ normed
    top = logits.topk(4)
    assert [value for _, value in lens.top] == pytest.approx(top.values.tolist(), rel=1e-6)
    assert [token for token, _ in lens.top] == model.token_strings(top.indices)
    assert lens.bottom[0][1] == pytest.approx(float(logits.min()), rel=1e-6)
    with pytest.raises(CircuitmapError, match="no feature 99 in layer 1"):
        logit_lens(model, transcoders, [(1, 99)])


def test_documents_carry_the_lens_and_exact_input_totals(computed):
    graph, document = computed
    jsonschema.validate(document, json_schema())
    features = [node for node in document["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert features and all(len(node["lens"]["top"]) == 10 for node in features)
    rows = graph.target_indices()
    totals = np.bincount(rows, weights=np.abs(graph.weights), minlength=graph.n_nodes)
    index = {graph.node_id(node): node for node in range(graph.n_nodes)}
    for node in document["nodes"]:
        if "input_total" in node:
            assert node["input_total"] == pytest.approx(totals[index[node["node_id"]]], rel=1e-12)
    targets = [node for node in document["nodes"] if node["feature_type"] == "logit"]
    assert sum(node["target_weight"] for node in targets) == pytest.approx(1.0)


def _wait(client, job_id: str, states=("done", "failed", "cancelled"), timeout=60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_jobs_compute_a_graph_in_the_background(graphs, engine):
    with TestClient(create_app(graphs, engine), base_url="http://localhost") as client:
        assert client.get("/api/config").json()["can_compute"] is True
        started = client.post("/api/jobs", json={"prompt": "A dog ran", "name": "cat"})
        assert started.status_code == 202
        job = _wait(client, started.json()["id"])
        assert job["state"] == "done" and job["graph"] == "cat-2" and job["total"] > 0
        assert job["done"] == job["total"]
        document = client.get("/api/graphs/cat-2").json()
        assert document["metadata"]["prompt"] == "A dog ran" and document["metadata"]["slug"] == "cat-2"
        jsonschema.validate(document, json_schema())
        features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert features and all(len(node["lens"]["top"]) == 10 for node in features)
        names = [entry["name"] for entry in client.get("/api/graphs").json()["graphs"]]
        assert sorted(names) == ["cat", "cat-2"]
        assert not [path for path in graphs.iterdir() if path.name.startswith(".")]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "x" * 4001}, "at most 4000"),
        ({"prompt": "ok", "name": "../x"}, "invalid graph name"),
    ],
)
def test_bad_jobs_are_refused(graphs, engine, body, message):
    with TestClient(create_app(graphs, engine), base_url="http://localhost") as client:
        response = client.post("/api/jobs", json=body)
        assert response.status_code == 400 and message in response.json()["detail"]


def test_a_failed_job_says_why(graphs, engine, monkeypatch):
    with TestClient(create_app(graphs, engine), base_url="http://localhost") as client:
        job = _wait(client, client.post("/api/jobs", json={"prompt": "€uro"}).json()["id"])
        assert job["state"] in ("done", "failed")
        too_long = client.post("/api/jobs", json={"prompt": "word " * 200})
        assert too_long.status_code == 400 and "the model's context is 64" in too_long.json()["detail"]

        def failing(*args, **kwargs):
            raise CircuitmapError("no transcoder feature is active on this prompt")

        monkeypatch.setattr("circuitmap.pipeline.attribute", failing)
        failed = _wait(client, client.post("/api/jobs", json={"prompt": "A cat"}).json()["id"])
        assert failed["state"] == "failed" and "no transcoder feature is active" in failed["error"]


def test_cancel_stops_a_running_job_and_writes_nothing(graphs, engine, monkeypatch):
    running = threading.Event()

    def slow_attribute(*args, progress, stop, **kwargs):
        while not stop.is_set():
            progress("attribution", 0, 100)
            running.set()
            time.sleep(0.01)
        raise Interrupted("stopped")

    monkeypatch.setattr("circuitmap.pipeline.attribute", slow_attribute)
    with TestClient(create_app(graphs, engine), base_url="http://localhost") as client:
        first = client.post("/api/jobs", json={"prompt": "slow"}).json()["id"]
        second = client.post("/api/jobs", json={"prompt": "queued"}).json()["id"]
        assert running.wait(10)
        assert client.get(f"/api/jobs/{first}").json()["state"] == "running"
        client.delete(f"/api/jobs/{second}")
        client.delete(f"/api/jobs/{first}")
        assert _wait(client, first)["state"] == "cancelled"
        assert _wait(client, second)["state"] == "cancelled"
        assert [entry["name"] for entry in client.get("/api/graphs").json()["graphs"]] == ["cat"]
        assert client.get("/api/jobs/99").status_code == 404
    with TestClient(create_app(graphs), base_url="http://localhost") as client:
        response = client.post("/api/jobs", json={"prompt": "x"})
        assert response.status_code == 404 and "--model and --transcoders" in response.json()["detail"]


class _Scripts(HTMLParser):
    """Collects the text of each <script> element and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self.links: list[str] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.links += [value for key, value in attrs if key in ("src", "href") and value]
        if tag == "script":
            self._open = attributes
            self.scripts.append((attributes, ""))

    def handle_data(self, data):
        if self._open is not None:
            attributes, text = self.scripts[-1]
            self.scripts[-1] = (attributes, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = None


def test_exported_html_is_self_contained_and_survives_hostile_labels(computed):
    _, document = computed
    document = json.loads(json.dumps(document))
    hostile = "</script><script>alert(1)</script><!-- ü"
    document["nodes"][0]["clerp"] = hostile
    parser = _Scripts()
    parser.feed(render_html(document))
    assert parser.links == []
    embedded = [text for attributes, text in parser.scripts if attributes.get("id") == DOCUMENT_ID]
    assert len(embedded) == 1 and json.loads(embedded[0]) == document
    code = [text for attributes, text in parser.scripts if "id" not in attributes]
    assert code and all(text.strip() for text in code)


def test_export_html_command(graphs, tmp_path, capsys):
    out = tmp_path / "cat.html"
    assert main(["export-html", str(graphs / "cat"), "-o", str(out)]) == 0
    assert "open it in any browser" in capsys.readouterr().out
    assert DOCUMENT_ID in out.read_text()
    from_full = tmp_path / "full.html"
    assert main(["export-html", str(graphs / "cat" / "graph.safetensors"), "-o", str(from_full)]) == 0
    assert main(["export-html", str(tmp_path / "missing"), "-o", str(out)]) == 2
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["export-html", str(tmp_path / "bad.json"), "-o", str(out)]) == 2
    assert "not a viewer JSON document" in capsys.readouterr().err
    assert main(["export-html", str(graphs / "cat"), "-o", str(tmp_path)]) == 2
    document = json.loads((graphs / "cat" / "graph.json").read_text())
    document["nodes"][0]["clerp"] = "\ud800"
    (tmp_path / "surrogate.json").write_text(json.dumps(document))
    assert main(["export-html", str(tmp_path / "surrogate.json"), "-o", str(out)]) == 2
    assert "not valid Unicode" in capsys.readouterr().err


def test_store_refuses_a_missing_folder(tmp_path):
    with pytest.raises(CircuitmapError, match="does not exist"):
        GraphStore(tmp_path / "nope")


def test_a_state_of_labels_alone_keeps_the_saved_pins_and_supernodes(client, graphs):
    document = client.get("/api/graphs/cat").json()
    features, first = _state(document)
    group = ["pair", features[1], features[2]]
    assert (
        client.put("/api/graphs/cat/state", json={"supernodes": [group], "clickedId": first}).status_code
        == 200
    )
    assert client.put("/api/graphs/cat/state", json={"labels": {first: "cat-ish"}}).status_code == 200
    q_params = json.loads((graphs / "cat" / "graph.json").read_text())["qParams"]
    assert q_params["supernodes"] == [group] and q_params["pinnedIds"] == group[1:]
    assert q_params["clickedId"] == first


def test_a_rename_that_cannot_rewrite_the_document_is_undone(client, graphs, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("circuitmap.server.store.write_graph_json", full_disk)
    response = client.post("/api/graphs/cat/rename", json={"name": "kitten"})
    assert response.status_code == 507 and "was not renamed" in response.json()["detail"]
    assert (graphs / "cat" / "graph.json").is_file() and not (graphs / "kitten").exists()
    monkeypatch.setattr("circuitmap.atomic.os.replace", full_disk)
    saved = client.put("/api/graphs/cat/state", json={"clickedId": ""})
    assert saved.status_code == 507 and "No space left" in saved.json()["detail"]


def test_a_document_beside_another_graph_gives_no_exact_scores(client, graphs, computed):
    graph, document = computed
    other = json.loads(json.dumps(document))
    other["metadata"]["info"]["graph_id"] = "0" * 32
    (graphs / "cat" / "graph.json").write_text(json.dumps(other))
    listed = client.get("/api/graphs").json()["graphs"][0]
    assert listed["exact_scores"] is False and listed["graph_id"] == "0" * 32
    response = client.post("/api/graphs/cat/scores", json={"pinnedIds": []})
    assert response.status_code == 409 and "come from different graphs" in response.json()["detail"]
    (graphs / "cat" / "graph.json").write_text(json.dumps(document))
    assert client.post("/api/graphs/cat/scores", json={"pinnedIds": []}).status_code == 200

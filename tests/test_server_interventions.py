"""The explorer's intervention endpoint: edits of a graph's feature nodes give what the library gives, bad
edits are refused one line at a time, and the server's protections and engine lock apply."""

from __future__ import annotations

import json
import threading

import pytest
from helpers.graphs import SERVER_PROMPT, write_graph_folder
from starlette.testclient import TestClient

from circuitmap.graphs.export import write_graph_json
from circuitmap.interventions import FeatureEdit, Supernode, generate_with, intervene
from circuitmap.server import create_app

BASE = "http://127.0.0.1:8041"
URL = "/api/graphs/cat/intervene"
FEATURE_TYPE = "cross layer transcoder"


@pytest.fixture
def graphs(tmp_path, computed):
    """A graph folder holding one graph, ``cat`` (conftest's ``computed``), with its full graph."""
    graph, document = computed
    return write_graph_folder(tmp_path, document, graph)


@pytest.fixture
def client(graphs, engine):
    with TestClient(create_app(graphs, engine), base_url=BASE) as client:
        yield client


def features(document: dict, count: int) -> list[str]:
    """The ``count`` most influential feature node ids."""
    nodes = [node for node in document["nodes"] if node["feature_type"] == FEATURE_TYPE]
    return [node["node_id"] for node in sorted(nodes, key=lambda node: node["influence"])[:count]]


def ablation(document: dict) -> dict:
    """A request body that ablates the most influential feature node."""
    return {"edits": [{"nodes": features(document, 1), "operation": "scale", "value": 0}]}


def node_of(document: dict, feature_type: str) -> str:
    return next(node["node_id"] for node in document["nodes"] if node["feature_type"] == feature_type)


def expected(engine, edits, new_tokens: int = 20, mode: str = "open_loop") -> dict:
    """What the library gives for ``edits`` on the server's prompt: open loop with attention recomputed, as
    the continuations are, or constrained."""
    model, transcoders = engine.model, engine.transcoders
    result = intervene(
        model, transcoders, SERVER_PROMPT, edits, mode=mode, freeze_attention=mode != "open_loop"
    )
    return {
        **json.loads(json.dumps(result.as_json())),
        "continuation_before": model.generate(SERVER_PROMPT, new_tokens),
        "continuation_after": generate_with(model, transcoders, SERVER_PROMPT, edits, new_tokens),
    }


def test_a_scale_edit_gives_what_the_library_gives(client, engine, computed):
    node = features(computed[1], 1)[0]
    response = client.post(URL, json={"edits": [{"nodes": [node], "operation": "scale", "value": 0.25}]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer == expected(engine, FeatureEdit.scale(node, 0.25))
    assert answer["edits"] == [f"scale {node} 0.25"]
    clean = engine.model.top_next_tokens(SERVER_PROMPT, 10)
    assert [token for token, _ in answer["top_before"]] == [token for token, _ in clean]
    assert [p for _, p in answer["top_before"]] == pytest.approx([p for _, p in clean], rel=1e-5)
    assert answer["top_after"] != answer["top_before"]
    assert answer["continuation_before"] == engine.model.generate(SERVER_PROMPT, 20)
    assert len(answer["targets"]) >= 1 and {"token", "prob_before", "prob_after"} <= set(answer["targets"][0])


def test_a_supernode_edit_acts_on_every_member(client, engine, computed):
    members = features(computed[1], 3)
    body = {
        "edits": [{"nodes": members, "operation": "scale", "value": 0, "name": "trio"}],
        "max_new_tokens": 7,
    }
    answer = client.post(URL, json=body).json()
    assert answer == expected(engine, FeatureEdit.ablate(Supernode("trio", members)), 7)
    assert answer["edits"] == ["scale trio 0"]
    alone = client.post(URL, json={"edits": [{"nodes": members[:1], "operation": "scale", "value": 0}]})
    assert alone.json()["top_after"] != answer["top_after"]


def test_set_and_add_in_constrained_mode(client, engine, computed):
    a, b = features(computed[1], 2)
    body = {
        "edits": [
            {"nodes": [a], "operation": "set", "value": 3.5},
            {"nodes": [b], "operation": "add", "value": -0.5},
        ],
        "mode": "constrained",
        "max_new_tokens": 5,
    }
    answer = client.post(URL, json=body).json()
    edits = [FeatureEdit.set(a, 3.5), FeatureEdit.add(b, -0.5)]
    assert answer == expected(engine, edits, 5, mode="constrained")
    assert answer["mode"] == "constrained"


def test_without_the_full_graph_the_prompt_text_is_used(client, engine, computed, graphs):
    (graphs / "cat" / "graph.safetensors").unlink()
    node = features(computed[1], 1)[0]
    answer = client.post(URL, json={"edits": [{"nodes": [node], "operation": "scale", "value": 2}]})
    assert answer.json() == expected(engine, FeatureEdit.scale(node, 2))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda meta: meta.update(prompt_tokens=["x", *meta["prompt_tokens"][1:]]), "another tokenizer"),
        (lambda meta: meta.update(model="another-model"), "computed with model 'another-model'"),
        (
            lambda meta: meta["info"].update(transcoders_fingerprint="f" * 64),
            "made with another transcoder set (fingerprint ffffffffffff)",
        ),
    ],
)
def test_a_graph_of_another_model_is_refused(client, computed, graphs, change, message):
    (graphs / "cat" / "graph.safetensors").unlink()
    document = json.loads(json.dumps(computed[1]))
    change(document["metadata"])
    write_graph_json(document, graphs / "cat" / "graph.json")
    response = client.post(URL, json=ablation(document))
    assert response.status_code == 409 and message in response.json()["detail"]


def _bad_bodies(document: dict) -> list[tuple[dict, str]]:
    node = features(document, 1)[0]

    def edit(**fields) -> dict:
        return {"edits": [{"nodes": [node], "operation": "scale", "value": 0, **fields}]}

    return [
        ({}, "non-empty list"),
        ({"edits": []}, "non-empty list"),
        ({"edits": {"nodes": [node]}}, "non-empty list"),
        ({"edits": ["x"]}, "edit 1 must be an object"),
        (edit(nodes=[]), "no nodes"),
        (edit(nodes=node), "list of node ids"),
        (edit(nodes=[node, node]), "listed twice"),
        (edit(nodes=["99_1_1"]), "not a node of this graph"),
        (edit(nodes=[node_of(document, "mlp reconstruction error")]), "is an error node"),
        (edit(nodes=[node_of(document, "embedding")]), "is a token"),
        (edit(nodes=[node_of(document, "logit")]), "is an output (logit) node"),
        (edit(operation="multiply"), "unknown operation 'multiply'"),
        (edit(operation=None), "unknown operation"),
        (edit(value="2"), "finite number"),
        (edit(value=True), "finite number"),
        (edit(value=None), "finite number"),
        (edit(value=10**400), "finite number"),
        (edit(name=""), "the name is empty"),
        (edit(name=7), "the name must be a string"),
        (edit(colour="red"), "unknown fields: colour"),
        ({**edit(), "max_new_tokens": 0}, "from 1 to 200"),
        ({**edit(), "max_new_tokens": 201}, "from 1 to 200"),
        ({**edit(), "max_new_tokens": "5"}, "whole number"),
        ({**edit(), "mode": "closed_loop"}, "unknown mode"),
        ({**edit(), "prompt": "other"}, "unknown fields: prompt"),
        ({"edits": [edit()["edits"][0]] * 65}, "at most 64"),
    ]


def test_bad_edits_are_refused_one_line_each(client, computed):
    for body, message in _bad_bodies(computed[1]):
        response = client.post(URL, json=body)
        assert response.status_code == 400, (body, response.text)
        detail = response.json()["detail"]
        assert message in detail and "\n" not in detail, (body, detail)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_values_are_refused(client, computed, literal):
    node = features(computed[1], 1)[0]
    content = f'{{"edits": [{{"nodes": ["{node}"], "operation": "set", "value": {literal}}}]}}'
    response = client.post(URL, content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "finite number" in response.json()["detail"]


def test_an_unknown_graph_and_a_bad_body(client):
    body = {"edits": [{"nodes": ["1_2_3"], "operation": "scale", "value": 0}]}
    missing = client.post("/api/graphs/nope/intervene", json=body)
    assert missing.status_code == 404 and "no graph named 'nope'" in missing.json()["detail"]
    for content in (b"[1, 2]", b"{", b""):
        response = client.post(URL, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "\n" not in response.json()["detail"]


def test_a_server_without_a_model_says_so(graphs, computed):
    body = ablation(computed[1])
    with TestClient(create_app(graphs), base_url=BASE) as client:
        assert client.get("/api/config").json()["can_compute"] is False
        response = client.post(URL, json=body)
        assert response.status_code == 404 and "--model and --transcoders" in response.json()["detail"]


def test_host_origin_type_and_size_rules_apply(graphs, engine, computed):
    body = ablation(computed[1])
    app = create_app(graphs, engine, max_body=1000)
    with TestClient(app, base_url="http://evil.example") as client:
        assert client.post(URL, json=body).status_code == 421
    with TestClient(app, base_url=BASE) as client:
        assert client.post(URL, json=body, headers={"origin": "http://evil.example"}).status_code == 403
        assert client.post(URL, json=body, headers={"origin": "http://127.0.0.1:9999"}).status_code == 403
        plain = client.post(URL, content=json.dumps(body), headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        big = {"edits": [{"nodes": ["x" * 2000], "operation": "scale", "value": 0}]}
        assert client.post(URL, json=big).status_code == 413
        same = client.post(URL, json=body, headers={"origin": BASE})
        assert same.status_code == 200 and "access-control-allow-origin" not in same.headers


def test_an_intervention_waits_for_the_engine(client, engine, computed):
    body = ablation(computed[1])
    answers = []
    with engine.lock:
        worker = threading.Thread(target=lambda: answers.append(client.post(URL, json=body)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not answers
    worker.join(30)
    assert answers[0].status_code == 200


def test_edits_that_overflow_the_model_are_refused(client, computed):
    body = {"edits": [{"nodes": features(computed[1], 1), "operation": "set", "value": 1e300}]}
    response = client.post(URL, json=body)
    assert response.status_code == 400 and "NaN or infinite" in response.json()["detail"]

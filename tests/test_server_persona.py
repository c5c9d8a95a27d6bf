"""The explorer's persona routes: the vectors listed with their default layers, prompts projected and
continuations steered as the library does, graph feature nodes projected as their activation times their
decoder written into the layer, bad requests refused one line at a time, and ``serve --persona``."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers.persona_explorer import N_LAYERS, persona_engine, write_persona_graph, write_vector
from starlette.testclient import TestClient

import circuitmap.cli as cli
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.export import write_graph_json
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.persona import chat_ids, load_persona_vector, project
from circuitmap.server import create_app
from circuitmap.server.personas import load_personas

BASE = "http://127.0.0.1:8041"
FEATURE_TYPE = "cross layer transcoder"
PROMPT = "Hi?"


@pytest.fixture(scope="module")
def chat_engine():
    return persona_engine()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, chat_engine):
    """The graph folder (graph ``cat``, unpruned) and two vectors: ``glad`` with a sweep whose best layer is
    3, ``sad`` without one."""
    root = tmp_path_factory.mktemp("persona")
    graphs, document = write_persona_graph(root, chat_engine)
    paths = [
        write_vector(root, "glad", chat_engine.model, seed=1, best_layer=3),
        write_vector(root, "sad", chat_engine.model, seed=2),
    ]
    return {"root": root, "graphs": graphs, "document": document, "paths": paths}


@pytest.fixture(scope="module")
def vectors(folder, chat_engine):
    return load_personas(folder["paths"], chat_engine.model)


@pytest.fixture
def client(folder, chat_engine, vectors):
    with TestClient(create_app(folder["graphs"], chat_engine, personas=vectors), base_url=BASE) as client:
        yield client


def unit(vector, layer: int) -> torch.Tensor:
    direction = vector.layer(layer).double()
    return direction / direction.norm()


def hand_steered(model, vector, layer: int, coefficient: float, relative: bool, n: int) -> str:
    """The greedy continuation with ``coefficient ×`` the vector (or, relative, its unit times the median
    residual norm of the prompt at the layer) added to the residual entering ``layer`` everywhere."""
    ids = chat_ids(model, PROMPT)
    if relative:
        residual = model.activations(ids, ["resid_pre"])["resid_pre", layer][0].double()
        delta = coefficient * residual.norm(dim=-1).median() * unit(vector, layer)
    else:
        delta = coefficient * vector.layer(layer).double()
    with model.add_to_residual(layer, delta.to(model.dtype)):
        return model.generate(ids, n)


def hand_projection(transcoders, node: dict, layer: int, direction: torch.Tensor) -> float:
    """A feature node's activation times what its decoder writes into the residual entering ``layer``
    (every slot before it, for a cross-layer transcoder), dotted with ``direction``."""
    source, feature, _ = parse_feature_id(node["node_id"])
    if transcoders.kind == "clt":
        write = sum(transcoders.decoder_vectors(source, [feature], out) for out in range(source, layer))
    else:
        write = transcoders.decoder_vectors(source, [feature])
    return node["activation"] * float(write[0].double() @ direction)


def test_the_vectors_are_listed_with_their_default_layers(client):
    assert client.get("/api/personas").json() == [
        {"name": "glad", "trait": "glad", "n_layers": N_LAYERS, "layer": 3},
        {"name": "sad", "trait": "sad", "n_layers": N_LAYERS, "layer": N_LAYERS // 2},
    ]


def test_a_response_is_projected_as_the_library_projects_it(client, chat_engine, vectors):
    body = {"prompt": PROMPT, "response": "Yes, gladly.", "layer": 1}
    answer = client.post("/api/personas/sad/project", json=body).json()
    expected = project(chat_engine.model, vectors["sad"], 1, PROMPT, "Yes, gladly.")
    assert answer["tokens"] == expected.tokens == list("Yes, gladly.")
    assert answer["values"] == pytest.approx(expected.per_token.tolist(), rel=1e-9)
    assert answer["last_prompt"] == pytest.approx(expected.last_prompt, rel=1e-9)
    assert answer["mean"] == pytest.approx(expected.mean, rel=1e-9)


def test_without_a_response_only_the_last_prompt_token_is_projected(client, chat_engine, vectors):
    answer = client.post("/api/personas/glad/project", json={"prompt": PROMPT}).json()
    expected = project(chat_engine.model, vectors["glad"], 3, PROMPT, "x")
    assert answer == {
        "tokens": [],
        "values": [],
        "last_prompt": pytest.approx(expected.last_prompt),
        "mean": None,
    }
    other = client.post("/api/personas/glad/project", json={"prompt": PROMPT, "layer": 0}).json()
    assert other["last_prompt"] != pytest.approx(answer["last_prompt"])


@pytest.mark.parametrize(("coefficient", "relative"), [(2.0, True), (-1.5, False)])
def test_steering_adds_the_vector_as_by_hand(client, chat_engine, vectors, coefficient, relative):
    body = {
        "prompt": PROMPT,
        "layer": 1,
        "coefficient": coefficient,
        "relative": relative,
        "max_new_tokens": 9,
    }
    answer = client.post("/api/personas/glad/steer", json=body).json()
    model = chat_engine.model
    assert answer["unsteered"] == model.generate(chat_ids(model, PROMPT), 9)
    assert answer["steered"] == hand_steered(model, vectors["glad"], 1, coefficient, relative, 9)
    assert answer["steered"] != answer["unsteered"]


def test_steering_defaults_to_relative_at_the_default_layer_with_twenty_tokens(client, chat_engine, vectors):
    answer = client.post("/api/personas/glad/steer", json={"prompt": PROMPT, "coefficient": 0.5}).json()
    assert answer["steered"] == hand_steered(chat_engine.model, vectors["glad"], 3, 0.5, True, 20)


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_graph_nodes_are_projected_through_their_decoders(tmp_path, folder, chat_engine, vectors, kind):
    if kind == "plt":
        engine, document, graphs = chat_engine, folder["document"], folder["graphs"]
    else:  # the same document read with cross-layer transcoders (no fingerprint recorded: any set passes)
        engine = persona_engine("clt-topk")
        document = json.loads(json.dumps(folder["document"]))
        del document["metadata"]["info"]["transcoders_fingerprint"]
        graphs = tmp_path / "graphs"
        (graphs / "cat").mkdir(parents=True)
        write_graph_json(document, graphs / "cat" / "graph.json")
    features = [node for node in document["nodes"] if node["feature_type"] == FEATURE_TYPE]
    with TestClient(create_app(graphs, engine, personas=vectors), base_url=BASE) as client:
        for layer in (1, 3):
            answer = client.get(f"/api/graphs/cat/persona/sad?layer={layer}").json()
            below = [node for node in features if int(node["layer"]) < layer]
            assert answer["layer"] == layer and set(answer["values"]) == {node["node_id"] for node in below}
            direction = unit(vectors["sad"], layer)
            for node in below:
                expected = hand_projection(engine.transcoders, node, layer, direction)
                assert answer["values"][node["node_id"]] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        default = client.get("/api/graphs/cat/persona/glad").json()
        assert default["layer"] == 3 and len(default["values"]) == sum(int(n["layer"]) < 3 for n in features)
        assert client.get("/api/graphs/cat/persona/sad?layer=0").json() == {"layer": 0, "values": {}}


def refused(response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail, detail


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "the prompt must be a string"),
        ({"prompt": " "}, "the prompt is empty"),
        ({"prompt": 5}, "the prompt must be a string"),
        ({"prompt": "x" * 4001}, "at most 4000"),
        ({"prompt": PROMPT, "response": ""}, "the response is empty"),
        ({"prompt": PROMPT, "response": ["a"]}, "the response must be a string"),
        ({"prompt": PROMPT, "layer": N_LAYERS}, "the layer must be in [0, 3], got 4"),
        ({"prompt": PROMPT, "layer": -1}, "the layer must be in [0, 3]"),
        ({"prompt": PROMPT, "layer": 1.5}, "the layer must be a whole number"),
        ({"prompt": PROMPT, "layer": True}, "the layer must be a number"),
        ({"prompt": PROMPT, "layer": "2"}, "the layer must be a number"),
        ({"prompt": PROMPT, "layer": 10**400}, "the layer must be a finite number"),
        ({"prompt": PROMPT, "system": "x"}, "unknown fields: system"),
    ],
)
def test_bad_projection_bodies_are_refused(client, body, message):
    refused(client.post("/api/personas/glad/project", json=body), 400, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": PROMPT}, "the coefficient must be a number, got None"),
        ({"prompt": PROMPT, "coefficient": "1"}, "the coefficient must be a number"),
        ({"prompt": PROMPT, "coefficient": True}, "the coefficient must be a number"),
        ({"prompt": PROMPT, "coefficient": 10**400}, "the coefficient must be a finite number"),
        ({"prompt": PROMPT, "coefficient": 1, "relative": "yes"}, "relative must be true or false"),
        ({"prompt": PROMPT, "coefficient": 1, "max_new_tokens": 0}, "max_new_tokens must be in [1, 200]"),
        ({"prompt": PROMPT, "coefficient": 1, "max_new_tokens": 201}, "max_new_tokens must be in [1, 200]"),
        ({"prompt": PROMPT, "coefficient": 1, "max_new_tokens": "5"}, "max_new_tokens must be a number"),
        (
            {"prompt": PROMPT, "coefficient": 1, "max_new_tokens": 10**30},
            "max_new_tokens must be in [1, 200]",
        ),
        ({"prompt": PROMPT, "coefficient": 1, "layer": 7}, "the layer must be in [0, 3]"),
        ({"prompt": PROMPT, "coefficient": 1, "positions": "all"}, "unknown fields: positions"),
        ({"coefficient": 1}, "the prompt must be a string"),
    ],
)
def test_bad_steering_bodies_are_refused(client, body, message):
    refused(client.post("/api/personas/glad/steer", json=body), 400, message)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_coefficients_are_refused(client, literal):
    content = f'{{"prompt": "Hi?", "coefficient": {literal}}}'
    response = client.post(
        "/api/personas/glad/steer", content=content, headers={"content-type": "application/json"}
    )
    refused(response, 400, "the coefficient must be a finite number")


def test_unknown_vectors_graphs_and_layers_are_refused(client, folder):
    for method, path in (
        ("POST", "/api/personas/happy/project"),
        ("POST", "/api/personas/happy/steer"),
        ("GET", "/api/graphs/cat/persona/happy"),
    ):
        body = {"prompt": PROMPT, "coefficient": 1} if method == "POST" else None
        refused(
            client.request(method, path, json=body),
            404,
            "no persona vector named 'happy' (loaded: glad, sad)",
        )
    refused(client.get("/api/graphs/nope/persona/glad"), 404, "no graph named 'nope'")
    refused(client.get("/api/graphs/cat/persona/glad?layer=4"), 400, "the layer must be in [0, 3], got 4")
    refused(client.get("/api/graphs/cat/persona/glad?layer=-1"), 400, "the layer must be a whole number")
    refused(client.get("/api/graphs/cat/persona/glad?layer=two"), 400, "the layer must be a whole number")
    for content in (b"[1, 2]", b"{", b""):
        response = client.post(
            "/api/personas/glad/project", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400 and "\n" not in response.json()["detail"]


def test_a_graph_of_another_transcoder_set_is_refused(tmp_path, folder, chat_engine, vectors):
    document = json.loads(json.dumps(folder["document"]))
    document["metadata"]["info"]["transcoders_fingerprint"] = "f" * 64
    graphs = tmp_path / "graphs"
    (graphs / "cat").mkdir(parents=True)
    write_graph_json(document, graphs / "cat" / "graph.json")
    with TestClient(create_app(graphs, chat_engine, personas=vectors), base_url=BASE) as client:
        refused(
            client.get("/api/graphs/cat/persona/glad"),
            409,
            "made with another transcoder set (fingerprint ffffffffffff)",
        )
        del document["metadata"]["info"]["transcoders_fingerprint"]
        feature = next(node for node in document["nodes"] if node["feature_type"] == FEATURE_TYPE)
        feature["node_id"] = f"0_{chat_engine.transcoders.d_features}_1"
        write_graph_json(document, graphs / "cat" / "graph.json")
        refused(client.get("/api/graphs/cat/persona/glad"), 409, "which this server's transcoder set lacks")


def test_a_server_without_vectors_lists_none_and_refuses_the_routes(folder, chat_engine):
    with TestClient(create_app(folder["graphs"], chat_engine), base_url=BASE) as client:
        assert client.get("/api/personas").json() == []
        refused(client.post("/api/personas/glad/project", json={"prompt": PROMPT}), 404, "--persona FILE")
        refused(client.get("/api/graphs/cat/persona/glad"), 404, "--persona FILE")


def test_vectors_need_an_engine_of_their_model(folder, vectors, chat_engine, tmp_path):
    with pytest.raises(CircuitmapError, match="persona vectors need an engine"):
        create_app(folder["graphs"], personas=vectors)
    other = load_persona_vector(folder["paths"][0])
    other.directions = other.directions[:2]
    with pytest.raises(CircuitmapError, match="width 32, 2 layers"):
        create_app(folder["graphs"], chat_engine, personas={"short": other})
    (tmp_path / "again").mkdir()
    twin = tmp_path / "again" / "glad.safetensors"
    twin.write_bytes(folder["paths"][0].read_bytes())
    with pytest.raises(CircuitmapError, match="two persona vector files are named 'glad'"):
        load_personas([folder["paths"][0], twin], chat_engine.model)


def test_a_projection_waits_for_the_engine(client, chat_engine):
    answers = []
    with chat_engine.lock:
        worker = threading.Thread(
            target=lambda: answers.append(client.post("/api/personas/glad/project", json={"prompt": PROMPT}))
        )
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not answers
    worker.join(30)
    assert answers[0].status_code == 200


def test_serve_refuses_persona_without_an_engine(tmp_path, capsys, folder):
    vector = str(folder["paths"][0])
    assert cli.main(["serve", "--graphs", str(tmp_path), "--persona", vector, "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "circuitmap: error: --persona needs --model and --transcoders: persona vectors run on the model"
    ]


def test_serve_loads_the_vectors_into_the_page(tmp_path, monkeypatch, capsys, folder, chat_engine):
    monkeypatch.setattr("circuitmap.cli.serve.load_model_from_args", lambda args: chat_engine.model)
    monkeypatch.setattr("circuitmap.cli.serve.load_transcoders", lambda spec: chat_engine.transcoders)
    apps = []
    monkeypatch.setattr(
        "circuitmap.server.launch.serve", lambda app, sock, url: apps.append(app) or sock.close()
    )
    command = [
        "serve",
        "--graphs",
        str(folder["graphs"]),
        "--model",
        "m",
        "--transcoders",
        "t",
        "--port",
        "0",
    ]
    paths = [str(path) for path in folder["paths"]]
    assert cli.main([*command, "--persona", paths[1], "--persona", paths[0]]) == 0
    with TestClient(apps[0], base_url=BASE) as client:
        assert [vector["name"] for vector in client.get("/api/personas").json()] == ["sad", "glad"]
    other = tmp_path / "narrow.safetensors"
    vector = load_persona_vector(paths[0])
    vector.directions = vector.directions[:, :16]
    vector.info["d_model"] = 16
    vector.save(other)
    assert cli.main([*command, "--persona", str(other)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has width 32 and 4 layers" in lines[0]

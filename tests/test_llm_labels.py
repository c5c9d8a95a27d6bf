"""LLM labels against a real local chat-completions server: storage, prompt, retries, errors, precedence."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers.features import build_tiny_llama_database, labelled_features

from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore, llm_labels
from circuitmap.features.llm_labels import build_prompt, clean_label, label_features

KEY = "sk-test-secret-123"
MODEL = "tiny-labeller-1"


class ChatServer:
    """A chat-completions endpoint on 127.0.0.1 that answers from a script, then with a default label."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[tuple[int, object]] = []
        self.default = (200, "Cat sentence numbers")
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, reply = server.script.pop(0) if server.script else server.default
                if isinstance(reply, bytes):
                    payload = reply
                elif status == 200:
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                    ).encode()
                else:
                    payload = json.dumps({"error": {"message": reply}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return build_tiny_llama_database(tmp_path_factory.mktemp("llm_labels"))


@pytest.fixture
def db(database, tmp_path):
    """A fresh copy of the database for each test, as labels are written into it."""
    return shutil.copy(database, tmp_path / "features.sqlite")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture(scope="module")
def active(database):
    """Features with top contexts (never-active ones have no evidence to send)."""
    with FeatureStore(database) as store:
        found = []
        for layer, feature in labelled_features(store):
            dashboard = store.get(layer, feature)
            if dashboard.top_examples and dashboard.output_top and dashboard.input_top:
                found.append((layer, feature))
        return found


def run(db, features, server, **options):
    options = {"api_key": KEY, "progress": False, "backoff": 0.0, **options}
    return label_features(db, features, base_url=server.base_url, model=MODEL, **options)


def test_labels_are_stored_as_llm_with_author_and_evidence(db, server, active):
    features = active[:3]
    report = run(db, features, server)
    assert report.labelled == 3 and report.failed == [] and report.requests == 3

    with FeatureStore(db) as store:
        for layer, feature in features:
            label = store.label(layer, feature)
            assert (label.text, label.source, label.author) == ("Cat sentence numbers", "llm", MODEL)
            assert label.evidence["endpoint"] == f"127.0.0.1:{server.httpd.server_address[1]}"
            assert label.evidence["contexts"] >= 1 and label.evidence["promoted"]
            kinds = [entry.source for entry in store.get(layer, feature).labels]
            assert kinds == ["auto", "llm"], "the automatic label is kept, the LLM one shown"
        assert store.search("sentence numbers")[0].label == "Cat sentence numbers"

    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"]["model"] == MODEL and request["body"]["temperature"] == 0.0
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]


def test_prompt_holds_the_evidence(db, server, active):
    layer, feature = active[0]
    run(db, [(layer, feature)], server)
    prompt = server.requests[0]["body"]["messages"][1]["content"]
    with FeatureStore(db) as store:
        dashboard = store.get(layer, feature)
    assert prompt == build_prompt(dashboard)
    top = dashboard.top_examples[0]
    peak = top.tokens[top.peak].replace("\n", "\\n")
    assert f"[[{peak}]]" in prompt
    assert json.dumps(dashboard.output_top[0][0]) in prompt
    assert json.dumps(dashboard.input_top[0][0]) in prompt
    assert f"Feature {feature} of layer {layer}" in prompt
    assert len(prompt) < 4000, "the prompt stays compact"


def test_server_errors_and_rate_limits_are_retried(db, server, active):
    server.script = [(500, "overloaded"), (429, "slow down"), (200, "Numbers after cat")]
    report = run(db, active[:1], server)
    assert report.labelled == 1 and report.requests == 3
    with FeatureStore(db) as store:
        assert store.label(*active[0]).text == "Numbers after cat"

    server.requests.clear()
    server.script = [(503, "down")] * 3
    with pytest.raises(CircuitmapError, match="HTTP 503.*down"):
        run(db, active[1:2], server, retries=2)
    assert len(server.requests) == 3, "two retries, then the error"


def test_unauthorised_gives_a_clear_error_without_the_key(db, server, active):
    server.script = [(401, f"Incorrect API key provided: {KEY}")]
    with pytest.raises(CircuitmapError) as caught:
        run(db, active[:2], server)
    message = str(caught.value)
    assert "HTTP 401" in message and "Incorrect API key provided" in message
    assert KEY not in message and "***" in message and "\n" not in message
    assert len(server.requests) == 1, "a 401 is not retried"
    with FeatureStore(db) as store:
        assert all(store.label(*key).source == "auto" for key in active[:2])


def test_garbage_replies(db, server, active):
    server.script = [
        (200, 'Sure! Here is a label:\n\n**Label:** "Closing the cat sentence".\nIt fires because ...'),
        (200, "   "),
        (200, "x " * 200),
    ]
    report = run(db, active[:3], server)
    assert report.labelled == 2 and len(report.failed) == 1 and report.failed[0][:2] == active[1]
    with FeatureStore(db) as store:
        assert store.label(*active[0]).text == "Closing the cat sentence"
        assert store.label(*active[1]).source == "auto"
        long = store.label(*active[2]).text
        assert len(long) <= 80 and "\n" not in long

    server.script = [(200, b"<html>not json</html>")]
    with pytest.raises(CircuitmapError, match="not JSON.*not json"):
        run(db, active[3:4], server)
    server.script = [(200, b'{"choices": []}')]
    with pytest.raises(CircuitmapError, match="no choices"):
        run(db, active[3:4], server)


def test_interruption_keeps_finished_labels(db, server, active):
    server.script = [(200, "First"), (200, "Second"), (200, "Third"), (400, "bad request")]
    with pytest.raises(CircuitmapError, match="HTTP 400"):
        run(db, active[:6], server, batch_size=2)
    with FeatureStore(db) as store:
        texts = [store.label(*key).text for key in active[:3]]
        assert texts == ["First", "Second", "Third"]
        assert all(store.label(*key).source == "auto" for key in active[3:6])

    server.requests.clear()
    report = run(db, active[:6], server)
    assert report.already_labelled == 3 and report.labelled == 3 and len(server.requests) == 3


def test_ctrl_c_keeps_finished_labels(db, server, active, monkeypatch):
    server.script = [(200, "One"), (200, "Two"), (200, "Three")]
    seen = []

    def interrupted(reply):
        seen.append(reply)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return clean_label(reply)

    monkeypatch.setattr(llm_labels, "clean_label", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(db, active[:5], server, batch_size=10)
    with FeatureStore(db) as store:
        assert [store.label(*key).text for key in active[:2]] == ["One", "Two"]
        assert store.label(*active[2]).source == "auto"


def test_label_precedence_manual_over_llm_over_auto(db, server, active):
    manual, plain = active[0], active[1]
    with FeatureStore(db) as store:
        store.set_label(*manual, "hand-written", author="me")

    report = run(db, [manual, plain], server)
    assert report.already_labelled == 1 and report.labelled == 1

    report = run(db, [manual, plain], server, skip_labelled=False)
    assert report.labelled == 2
    with FeatureStore(db) as store:
        assert store.label(*manual).text == "hand-written" and store.label(*manual).source == "manual"
        assert store.label(*plain).source == "llm"
        store.set_label(*manual, "")
        assert store.label(*manual).source == "llm", "clearing the manual label shows the LLM one"
        assert store.labels_of([manual, plain])[manual].source == "llm"


def test_unreachable_endpoint_and_bad_arguments(db, active):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    with pytest.raises(CircuitmapError, match=f"cannot reach http://127.0.0.1:{port}/chat/completions"):
        label_features(
            db, active[:1], base_url=f"http://127.0.0.1:{port}", model=MODEL, retries=1, backoff=0.0
        )
    with pytest.raises(CircuitmapError, match="base URL"):
        label_features(db, active[:1], base_url="ftp://example.org", model=MODEL)
    with pytest.raises(CircuitmapError, match="no feature 9 in layer 99"):
        label_features(db, [(99, 9)], base_url="http://127.0.0.1:9", model=MODEL)


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Cat names", "Cat names"),
        ("\"Numbers after 'cat'.\"", "Numbers after 'cat'"),
        ("<think>the tokens are digits</think>\nDigits in counts", "Digits in counts"),
        ("- Label: says hello", "says hello"),
        ("```\nClosing brackets\n```", "Closing brackets"),
        ("Label:", ""),
        (None, ""),
    ],
)
def test_clean_label(reply, label):
    assert clean_label(reply) == label

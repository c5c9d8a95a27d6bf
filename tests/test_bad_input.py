"""Bad input, as two tables: one over every command of the command line, one over the explorer's endpoints.

The command line's contract (README, "Command line"): bad input prints one line starting with
``circuitmap: error:`` to stderr and no traceback, exits with status 2, and leaves nothing new behind: the
outputs it was asked to write do not exist afterwards, and files that existed are unchanged. Lines a command
prints before it meets the problem (the model's load time, the feature database it opened, progress bars)
may come first; the error line is the last line and the only one with the prefix.

The explorer's contract (README, "Exploring graphs in the browser"): every bad request gets a 4xx status and
the JSON body ``{"detail": "<one line>"}``, never a 500, and changes nothing on disk.

A command-line case is an argument builder, called with the shared read-only inputs (``World``) and a
scratch folder for the case's outputs, and a text the error line must contain (None when any one-line error
will do). A server case is a request (method, path, and a JSON body, or raw text for what ``json=`` cannot
send: lone surrogates, NaN and infinities, deep nesting, bytes that are not UTF-8), the status it must get and
a text its detail must contain. Everything runs on a tiny random llama (64-token context, one token per
character) with random transcoders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.models import char_tokenizer, tiny_hf_model
from helpers.transcoders import random_transcoders
from safetensors.torch import save_file
from starlette.testclient import TestClient

import circuitmap
from circuitmap.cli import main
from circuitmap.features import FeatureStore
from circuitmap.graphs import Graph, NodeKind
from circuitmap.server import Engine, create_app

PROMPT = "The cat sat"
TOO_LONG = "the cat sat on the mat. " * 8  # 192 tokens; the model reads 64
SURROGATE = "bad \udcff text"  # what Python makes of bytes that are not UTF-8 in an argument
HUGE_INT = "9" * 30  # beyond 64 bits
ERROR_PREFIX = "circuitmap: error:"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
FEATURE_BUILD = circuitmap.BuildConfig(
    tokens=2000, context_length=32, batch_size=8, top=8, samples=10, window=16, before=8
)
CORPUS = "\n\n".join(f"The cat number {i} sat on the mat and said hello {i * 7}." for i in range(300))


# ---------------------------------------------------------------------------------------------------------
# Shared inputs: a model, transcoder sets, a graph folder, a feature database, and broken files of each kind.


@dataclass
class World:
    """The shared inputs every case reads and none may change; ``world / name`` is any other file."""

    root: Path
    model: Path
    transcoders: Path
    other_transcoders: Path  # the same shape with other weights: another set's fingerprint
    narrow_transcoders: Path  # width 16: does not fit the model
    graph: Path  # a graph folder as `attribute --out` writes it
    db: Path  # the feature database of `transcoders`
    corpus: Path
    file: Path  # a regular file: nothing can be written under it, whoever runs the tests
    feature: str  # a feature node of the graph
    inactive: str  # a feature at the same layer and position that is not active there
    error_node: str
    token_node: str
    logit_node: str

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _random_bytes(path: Path, prefix: bytes = b"", size: int = 4096) -> Path:
    path.write_bytes(prefix + os.urandom(size))
    return path


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _copy(source: Path, path: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, path)
    else:
        shutil.copy(source, path)
    return path


def _build_world(root: Path) -> World:
    model, transcoders, graph = root / "model", root / "transcoders", root / "graph"
    tiny_hf_model("llama").save_pretrained(model)
    char_tokenizer().save_pretrained(model)
    random_transcoders("plt-topk-skip", 3, 32).save(transcoders)
    random_transcoders("plt-topk-skip", 3, 32, seed=1).save(root / "other_transcoders")
    random_transcoders("plt-topk-skip", 3, 16).save(root / "narrow_transcoders")
    argv = ["attribute", "--model", model, "--transcoders", transcoders, "--prompt", PROMPT, "--out", graph]
    assert main([str(arg) for arg in [*argv, "--force"]]) == 0
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    db = root / "features.sqlite"
    loaded_model, loaded_transcoders = (
        circuitmap.load_model(str(model)),
        circuitmap.load_transcoders(transcoders),
    )
    circuitmap.build_features(loaded_model, loaded_transcoders, corpus, db, FEATURE_BUILD, progress=False)

    # Files of the wrong kind, empty, corrupt (random bytes) or truncated (the first half of a good one).
    (root / "file.txt").write_text("just some text\n", encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n\n   \n\n", encoding="utf-8")
    (root / "empty_folder").mkdir()
    (root / "wrong_field.jsonl").write_text('{"body": "the cat sat"}\n' * 50, encoding="utf-8")
    (root / "broken.jsonl").write_text('{"text": "the cat\n' * 50, encoding="utf-8")
    for name in ("corrupt.safetensors", "corrupt.gguf", "corrupt.bin", "corrupt.sqlite", "corrupt.npz"):
        _random_bytes(root / name)
    _random_bytes(root / "garbled.gguf", prefix=b"GGUF\x03\x00\x00\x00")  # the right magic, then noise
    _truncated(db, root / "truncated.sqlite")
    with sqlite3.connect(root / "no_tables.sqlite") as connection:
        connection.execute("CREATE TABLE unrelated (x INTEGER)")
    connection.close()

    _random_bytes(_copy(model, root / "corrupt_model") / "model.safetensors")
    _truncated(model / "model.safetensors", _copy(model, root / "truncated_model") / "model.safetensors")
    _random_bytes(_copy(transcoders, root / "corrupt_transcoders") / "layer_0.safetensors")
    layer_1 = _copy(transcoders, root / "truncated_transcoders") / "layer_1.safetensors"
    _truncated(transcoders / "layer_1.safetensors", layer_1)
    _random_bytes(_copy(transcoders, root / "corrupt_config") / "config.yaml", prefix=b"model_kind: [\n")

    for name in ("corrupt_document", "truncated_document", "nested_document", "list_document"):
        (root / name).mkdir()
    _random_bytes(root / "corrupt_document" / "graph.json")
    _truncated(graph / "graph.json", root / "truncated_document" / "graph.json")
    (root / "nested_document" / "graph.json").write_text("[" * 100_000, encoding="utf-8")
    (root / "list_document" / "graph.json").write_text("[]", encoding="utf-8")
    _random_bytes(_copy(graph, root / "corrupt_document_graph") / "graph.json")
    _random_bytes(_copy(graph, root / "corrupt_full_graph") / "graph.safetensors")
    full = _copy(graph, root / "truncated_full_graph") / "graph.safetensors"
    _truncated(graph / "graph.safetensors", full)

    save_file({"v": torch.randn(32)}, root / "vector.safetensors")
    save_file({"v": torch.randn(16)}, root / "narrow_vector.safetensors")
    save_file({"v": torch.full((32,), float("nan"))}, root / "nan_vector.safetensors")
    save_file({"a": torch.randn(32), "b": torch.randn(32)}, root / "two_vectors.safetensors")

    loaded = Graph.load(graph / "graph.safetensors")
    active = {loaded.node_id(int(node)) for node in loaded.nodes_of(NodeKind.FEATURE)}
    document = json.loads((graph / "graph.json").read_text(encoding="utf-8"))
    by_type: dict[str, str] = {}
    for node in document["nodes"]:
        by_type.setdefault(node["feature_type"], node["node_id"])
    feature = by_type["cross layer transcoder"]
    layer, _, position = feature.split("_")
    inactive = next(f"{layer}_{i}_{position}" for i in range(48) if f"{layer}_{i}_{position}" not in active)
    return World(
        root=root,
        model=model,
        transcoders=transcoders,
        other_transcoders=root / "other_transcoders",
        narrow_transcoders=root / "narrow_transcoders",
        graph=graph,
        db=db,
        corpus=corpus,
        file=root / "file.txt",
        feature=feature,
        inactive=inactive,
        error_node=by_type["mlp reconstruction error"],
        token_node=by_type["embedding"],
        logit_node=by_type["logit"],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return _build_world(tmp_path_factory.mktemp("bad-input-world"))


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """A private cache, offline hubs, and guards that stop a case which got past its checks before it trains
    the demo's quick transcoders or listens on a port."""
    monkeypatch.setenv("CIRCUITMAP_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_serving(*args, **kwargs):
        raise AssertionError("bad input got as far as serving")

    def no_training(*args, **kwargs):
        raise AssertionError("bad input got as far as training the quick transcoders")

    monkeypatch.setattr("circuitmap.server.launch.serve", no_serving)
    monkeypatch.setattr("circuitmap.cli.demo.ensure_quick_transcoders", no_training)


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``, with each file's size and modification time (a write changes
    them; a folder's own time is left out, since a probe created and removed in it changes it)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            stat = path.lstat()
            found[str(path)] = "folder" if path.is_dir() else (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return found


def _changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


# ---------------------------------------------------------------------------------------------------------
# The command line.

Build = Callable[[World, Path], list]


def cli(case_id: str, build: Build, expect: str | None, *, modes=False):
    """A command-line case: ``build(world, scratch)`` gives the arguments, ``expect`` is a text the error line
    must contain. ``modes`` cases take read or write permission away, which does not stop root."""
    marks = [pytest.mark.skipif(IS_ROOT, reason="file modes do not stop root")] if modes else []
    return pytest.param(build, expect, id=case_id, marks=marks)


def _m(w: World) -> list:
    return ["--model", w.model]


def _mt(w: World, transcoders: Path | None = None) -> list:
    return ["--model", w.model, "--transcoders", transcoders or w.transcoders]


def _attribute(w: World, s: Path, *extra) -> list:
    return ["attribute", *_mt(w), "--prompt", PROMPT, "--out", s / "graph", "--force", *extra]


def _demo(w: World, s: Path, *extra) -> list:
    return ["demo", *_m(w), "--out", s / "demo", "--no-serve", *extra]


def _serve(w: World, s: Path, *extra) -> list:
    return ["serve", "--graphs", s / "graphs", *extra]


def _export(w: World, s: Path, graph: Path | None = None, *extra) -> list:
    return ["export-html", graph or w.graph, "-o", s / "page.html", *extra]


SMALL_BUILD = ["--tokens", "200", "--context-length", "16", "--batch-size", "4", "--top", "4"]
SMALL_BUILD += ["--samples", "4", "--window", "8", "--before", "4"]


def _build(w: World, s: Path, *extra, corpus: Path | None = None) -> list:
    corpus = corpus or w.corpus
    return ["features", "build", *_mt(w), "--corpus", corpus, "--db", s / "f.sqlite", *SMALL_BUILD, *extra]


def _scratch_db(w: World, s: Path) -> Path:
    """A copy of the feature database, for a case that could write into it."""
    return _copy(w.db, s / "features.sqlite")


LLM_URL = "http://127.0.0.1:9/v1"  # nothing listens there: a request that is sent fails at once


def _label_llm(w: World, s: Path, *extra, db: Path | None = None) -> list:
    common = ["--base-url", LLM_URL, "--model", "m", "--retries", "0", "--timeout", "5"]
    return ["features", "label-llm", db or w.db, *common, *extra]


def _intervene(w: World, s: Path, *extra) -> list:
    return ["intervene", *_mt(w), "--prompt", PROMPT, "--json", s / "result.json", *extra]


def _vector(w: World, s: Path, name: str, *extra) -> list:
    return _intervene(w, s, "--vector", w / name, "--vector-layer", "0", *extra)


def _check(w: World, s: Path, *extra, graph: Path | None = None) -> list:
    outputs = ["--plot", s / "check.png", "--json", s / "check.json"]
    return ["check", graph or w.graph, *_mt(w), *outputs, *extra]


SMALL_TRAIN = ["--d-features", "16", "--k", "4", "--tokens", "256", "--batch-size", "32"]
SMALL_TRAIN += ["--context-length", "16", "--model-batch-size", "4", "--chunk-contexts", "4"]
SMALL_TRAIN += ["--eval-tokens", "0", "--quiet"]


def _train(w: World, s: Path, *extra, corpus: Path | None = None) -> list:
    return ["train", *_m(w), "--corpus", corpus or w.corpus, "--out", s / "run", *SMALL_TRAIN, *extra]


def _evaluate(w: World, s: Path, *extra, corpus: Path | None = None) -> list:
    return ["evaluate-transcoders", *_mt(w), "--corpus", corpus or w.corpus, "--tokens", "200", *extra]


def _unreadable(path: Path) -> Path:
    path.chmod(0)
    return path


def _read_only(path: Path) -> Path:
    """A new folder nothing can be written in (but by root)."""
    path.mkdir()
    path.chmod(0o555)
    return path


NOT_A_DB = "not a circuitmap feature database"
NO_DB = "no such feature database"
NOT_A_FOLDER = "is not a folder"
NOT_UNICODE = "not valid unicode"
OTHER_SET = "another transcoder set"
WRONG_WIDTH = "width 16 but the model has 3 layers of width 32"
PAST_CONTEXT = "but the model's context is 64"
NOT_A_DOCUMENT = "is not a viewer JSON document"

CLI_CASES = [
    # Usage errors, for any command.
    cli("usage-no-command", lambda w, s: [], "the following arguments are required"),
    cli("usage-unknown-command", lambda w, s: ["explode"], "invalid choice: 'explode'"),
    cli("usage-unknown-option", lambda w, s: ["next", *_m(w), "--bogus"], "unrecognized arguments: --bogus"),
    # next: the model, the prompt, -k, the device and dtype.
    cli("next-missing-model", lambda w, s: ["next", "--model", s / "absent"], "no such file or folder"),
    cli("next-empty-folder-model", lambda w, s: ["next", "--model", w / "empty_folder"], "cannot load"),
    cli("next-text-file-model", lambda w, s: ["next", "--model", w.file], "not a model file"),
    cli("next-corrupt-gguf", lambda w, s: ["next", "--model", w / "corrupt.gguf"], "not a GGUF file"),
    cli("next-garbled-gguf", lambda w, s: ["next", "--model", w / "garbled.gguf"], "cannot read GGUF file"),
    cli(
        "next-empty-gguf",
        lambda w, s: ["next", "--model", _copy(w / "empty.txt", s / "empty.gguf")],
        "not a GGUF file",
    ),
    cli("next-corrupt-llama2c", lambda w, s: ["next", "--model", w / "corrupt.bin"], "not a valid llama2.c"),
    cli("next-corrupt-weights", lambda w, s: ["next", "--model", w / "corrupt_model"], "safetensors"),
    cli("next-truncated-weights", lambda w, s: ["next", "--model", w / "truncated_model"], "safetensors"),
    cli(
        "next-unreadable-model",
        lambda w, s: [
            "next",
            "--model",
            _unreadable(_copy(w.model, s / "model") / "model.safetensors").parent,
        ],
        "model.safetensors",  # safetensors reports an unreadable file as missing
        modes=True,
    ),
    cli("next-empty-prompt", lambda w, s: ["next", *_m(w), ""], "the prompt is empty"),
    cli("next-blank-prompt", lambda w, s: ["next", *_m(w), "  \n "], "the prompt is empty"),
    cli("next-prompt-past-context", lambda w, s: ["next", *_m(w), TOO_LONG], PAST_CONTEXT),
    cli("next-surrogate-prompt", lambda w, s: ["next", *_m(w), SURROGATE], NOT_UNICODE),
    cli("next-surrogate-model", lambda w, s: ["next", "--model", f"{w.model}\udcff"], NOT_UNICODE),
    cli("next-k-zero", lambda w, s: ["next", *_m(w), "-k", "0"], "must be a positive integer"),
    cli("next-k-negative", lambda w, s: ["next", *_m(w), "-k", "-3"], "must be a positive integer"),
    cli("next-k-not-a-number", lambda w, s: ["next", *_m(w), "-k", "three"], "invalid positive_int value"),
    cli("next-unknown-dtype", lambda w, s: ["next", *_m(w), "--dtype", "float7"], "unknown dtype 'float7'"),
    cli("next-unknown-device", lambda w, s: ["next", *_m(w), "--device", "toaster"], "unknown device"),
    # generate: lengths, temperature, seed, prompt.
    cli("generate-zero-tokens", lambda w, s: ["generate", *_m(w), "--max-new-tokens", "0"], "max_new_tokens"),
    cli("generate-negative-tokens", lambda w, s: ["generate", *_m(w), "--max-new-tokens", "-5"], "max_new"),
    cli(
        "generate-past-context", lambda w, s: ["generate", *_m(w), "--max-new-tokens", "100000"], PAST_CONTEXT
    ),
    cli(
        "generate-nan-temperature",
        lambda w, s: ["generate", *_m(w), "--sample", "--temperature", "nan"],
        "temperature",
    ),
    cli(
        "generate-inf-temperature",
        lambda w, s: ["generate", *_m(w), "--sample", "--temperature", "inf"],
        "temperature",
    ),
    cli(
        "generate-zero-temperature",
        lambda w, s: ["generate", *_m(w), "--sample", "--temperature", "0"],
        "temperature must be positive",
    ),
    cli(
        "generate-negative-temperature",
        lambda w, s: ["generate", *_m(w), "--sample", "--temperature", "-1"],
        "temperature must be positive",
    ),
    cli(
        "generate-huge-seed",
        lambda w, s: ["generate", *_m(w), "--sample", "--seed", HUGE_INT],
        "seed",
    ),
    cli("generate-empty-prompt", lambda w, s: ["generate", *_m(w), ""], "the prompt is empty"),
    cli("generate-prompt-past-context", lambda w, s: ["generate", *_m(w), TOO_LONG], PAST_CONTEXT),
    # transcoders: the set, and the model and prompt it is checked on.
    cli("transcoders-missing", lambda w, s: ["transcoders", s / "absent"], "not found"),
    cli("transcoders-empty-folder", lambda w, s: ["transcoders", w / "empty_folder"], "no config.yaml"),
    cli("transcoders-text-file", lambda w, s: ["transcoders", w.file], "expected a folder"),
    cli("transcoders-corrupt-npz", lambda w, s: ["transcoders", w / "corrupt.npz"], "not a valid .npz"),
    cli(
        "transcoders-corrupt-layer",
        lambda w, s: ["transcoders", w / "corrupt_transcoders", *_m(w)],
        "layer_0.safetensors",
    ),
    cli(
        "transcoders-truncated-layer",
        lambda w, s: ["transcoders", w / "truncated_transcoders", *_m(w)],
        "layer_1.safetensors",
    ),
    cli("transcoders-corrupt-config", lambda w, s: ["transcoders", w / "corrupt_config"], "config.yaml"),
    cli("transcoders-wrong-width", lambda w, s: ["transcoders", w.narrow_transcoders, *_m(w)], WRONG_WIDTH),
    cli(
        "transcoders-empty-prompt",
        lambda w, s: ["transcoders", w.transcoders, *_m(w), "--prompt", ""],
        "the prompt is empty",
    ),
    cli(
        "transcoders-prompt-past-context",
        lambda w, s: ["transcoders", w.transcoders, *_m(w), "--prompt", TOO_LONG],
        PAST_CONTEXT,
    ),
    cli(
        "transcoders-unreadable",
        lambda w, s: [
            "transcoders",
            _unreadable(_copy(w.transcoders, s / "t") / "layer_0.safetensors").parent,
        ],
        "layer_0.safetensors",  # safetensors reports an unreadable file as missing
        modes=True,
    ),
    # attribute: inputs, settings, targets, directions, feature labels, the output folder.
    cli("attribute-missing-model", lambda w, s: [*_attribute(w, s), "--model", s / "absent"], "no such file"),
    cli(
        "attribute-missing-transcoders",
        lambda w, s: [*_attribute(w, s), "--transcoders", s / "absent"],
        "not found",
    ),
    cli(
        "attribute-corrupt-transcoders",
        lambda w, s: [*_attribute(w, s), "--transcoders", w / "corrupt_transcoders"],
        "layer_0.safetensors",
    ),
    cli(
        "attribute-wrong-width",
        lambda w, s: [*_attribute(w, s), "--transcoders", w.narrow_transcoders],
        WRONG_WIDTH,
    ),
    cli("attribute-empty-prompt", lambda w, s: _attribute(w, s, "--prompt", ""), "the prompt is empty"),
    cli("attribute-prompt-past-context", lambda w, s: _attribute(w, s, "--prompt", TOO_LONG), PAST_CONTEXT),
    cli("attribute-surrogate-prompt", lambda w, s: _attribute(w, s, "--prompt", SURROGATE), NOT_UNICODE),
    cli(
        "attribute-out-under-a-file",
        lambda w, s: [*_attribute(w, s), "--out", w.file / "sub" / "g"],
        NOT_A_FOLDER,
    ),
    cli(
        "attribute-out-in-read-only-folder",
        lambda w, s: [*_attribute(w, s), "--out", _read_only(s / "ro") / "graph"],
        "permission denied",
        modes=True,
    ),
    cli(
        "attribute-out-is-a-file",
        lambda w, s: [*_attribute(w, s), "--out", _copy(w.file, s / "file")],
        "exists and is not a folder",
    ),
    cli(
        "attribute-node-threshold-above-1",
        lambda w, s: _attribute(w, s, "--node-threshold", "1.5"),
        "in (0, 1]",
    ),
    cli(
        "attribute-node-threshold-negative",
        lambda w, s: _attribute(w, s, "--node-threshold", "-0.1"),
        "(0, 1]",
    ),
    cli("attribute-node-threshold-nan", lambda w, s: _attribute(w, s, "--node-threshold", "nan"), "finite"),
    cli("attribute-edge-threshold-inf", lambda w, s: _attribute(w, s, "--edge-threshold", "inf"), "finite"),
    cli(
        "attribute-edge-threshold-above-1",
        lambda w, s: _attribute(w, s, "--edge-threshold", "2"),
        "edge_threshold",
    ),
    cli("attribute-zero-logits", lambda w, s: _attribute(w, s, "--max-n-logits", "0"), "max_n_logits"),
    cli(
        "attribute-logit-prob-zero",
        lambda w, s: _attribute(w, s, "--desired-logit-prob", "0"),
        "desired_logit",
    ),
    cli(
        "attribute-logit-prob-above-1", lambda w, s: _attribute(w, s, "--desired-logit-prob", "1.5"), "(0, 1]"
    ),
    cli("attribute-logit-prob-nan", lambda w, s: _attribute(w, s, "--desired-logit-prob", "nan"), "finite"),
    cli(
        "attribute-negative-feature-nodes",
        lambda w, s: _attribute(w, s, "--max-feature-nodes", "-5"),
        "max_feature_nodes",
    ),
    cli("attribute-zero-batch", lambda w, s: _attribute(w, s, "--batch-size", "0"), "batch_size"),
    cli("attribute-top-zero", lambda w, s: _attribute(w, s, "--top", "0"), "must be a positive integer"),
    cli("attribute-empty-target", lambda w, s: _attribute(w, s, "--target", ""), "not a single token"),
    cli(
        "attribute-multi-token-target",
        lambda w, s: _attribute(w, s, "--target", " Paris"),
        "not a single token",
    ),
    cli("attribute-surrogate-target", lambda w, s: _attribute(w, s, "--target", SURROGATE), NOT_UNICODE),
    cli("attribute-direction-without-file", lambda w, s: _attribute(w, s, "--direction", "up"), "NAME=FILE"),
    cli(
        "attribute-direction-missing-file",
        lambda w, s: _attribute(w, s, "--direction", f"up={s / 'absent'}"),
        "vector file not found",
    ),
    cli(
        "attribute-direction-corrupt-file",
        lambda w, s: _attribute(w, s, "--direction", f"up={w / 'corrupt.safetensors'}"),
        "not a readable safetensors file",
    ),
    cli(
        "attribute-direction-wrong-width",
        lambda w, s: _attribute(w, s, "--direction", f"up={w / 'narrow_vector.safetensors'}"),
        "16 entries",
    ),
    cli(
        "attribute-direction-nan",
        lambda w, s: _attribute(w, s, "--direction", f"up={w / 'nan_vector.safetensors'}"),
        "direction 'up' has NaN or infinite entries",
    ),
    cli(
        "attribute-direction-two-tensors",
        lambda w, s: _attribute(w, s, "--direction", f"up={w / 'two_vectors.safetensors'}"),
        "FILE:KEY",
    ),
    cli(
        "attribute-missing-features", lambda w, s: _attribute(w, s, "--features", s / "absent.sqlite"), NO_DB
    ),
    cli(
        "attribute-corrupt-features",
        lambda w, s: _attribute(w, s, "--features", w / "corrupt.sqlite"),
        NOT_A_DB,
    ),
    cli(
        "attribute-features-of-another-set",
        lambda w, s: [*_attribute(w, s), "--transcoders", w.other_transcoders, "--features", w.db],
        OTHER_SET,
    ),
    # demo: only what is refused before the quick transcoders would be trained.
    cli("demo-missing-model", lambda w, s: [*_demo(w, s), "--model", s / "absent"], "no such file or folder"),
    cli("demo-out-under-a-file", lambda w, s: [*_demo(w, s), "--out", w.file / "sub"], NOT_A_FOLDER),
    cli("demo-surrogate-prompt", lambda w, s: _demo(w, s, "--prompt", SURROGATE), NOT_UNICODE),
    cli("demo-empty-prompt", lambda w, s: _demo(w, s, "--prompt", ""), "the prompt is empty"),
    cli(
        "demo-prompt-past-context",
        lambda w, s: _demo(w, s, "--prompt", TOO_LONG),
        PAST_CONTEXT,
    ),
    cli(
        "demo-port-too-large",
        lambda w, s: ["demo", *_m(w), "--out", s / "demo", "--port", "70000"],
        "port",
    ),
    cli(
        "demo-port-negative",
        lambda w, s: ["demo", *_m(w), "--out", s / "demo", "--port", "-1"],
        "port",
    ),
    cli("demo-port-not-a-number", lambda w, s: _demo(w, s, "--port", "http"), "invalid int value: 'http'"),
    # serve: only what is refused before it listens.
    cli(
        "serve-port-too-large", lambda w, s: _serve(w, s, "--port", "70000"), "the port must be in [0, 65535]"
    ),
    cli("serve-port-negative", lambda w, s: _serve(w, s, "--port", "-1"), "the port must be in [0, 65535]"),
    cli("serve-model-without-transcoders", lambda w, s: _serve(w, s, *_m(w)), "go together"),
    cli(
        "serve-transcoders-without-model",
        lambda w, s: _serve(w, s, "--transcoders", w.transcoders),
        "go together",
    ),
    cli("serve-wrong-width", lambda w, s: _serve(w, s, *_mt(w, w.narrow_transcoders)), WRONG_WIDTH),
    cli(
        "serve-negative-feature-nodes",
        lambda w, s: _serve(w, s, *_mt(w), "--max-feature-nodes", "-5"),
        "max_feature_nodes",
    ),
    cli("serve-missing-features", lambda w, s: _serve(w, s, "--features", s / "absent.sqlite"), NO_DB),
    cli("serve-corrupt-features", lambda w, s: _serve(w, s, "--features", w / "corrupt.sqlite"), NOT_A_DB),
    cli(
        "serve-features-not-a-database",
        lambda w, s: _serve(w, s, "--features", w / "no_tables.sqlite"),
        NOT_A_DB,
    ),
    cli("serve-features-is-a-folder", lambda w, s: _serve(w, s, "--features", w / "empty_folder"), NO_DB),
    cli(
        "serve-features-of-another-set",
        lambda w, s: _serve(w, s, *_mt(w, w.other_transcoders), "--features", w.db),
        OTHER_SET,
    ),
    cli("serve-graphs-is-a-file", lambda w, s: ["serve", "--graphs", w.file], "file exists"),
    cli(
        "serve-graphs-under-a-file", lambda w, s: ["serve", "--graphs", w.file / "graphs"], "not a directory"
    ),
    cli("serve-surrogate-host", lambda w, s: _serve(w, s, "--host", SURROGATE), NOT_UNICODE),
    # export-html: the graph, the page, settings, feature labels.
    cli("export-missing-graph", lambda w, s: _export(w, s, s / "absent"), "no graph at"),
    cli("export-empty-folder", lambda w, s: _export(w, s, w / "empty_folder"), "neither graph.json nor"),
    cli("export-text-file", lambda w, s: _export(w, s, w.file), NOT_A_DOCUMENT),
    cli("export-corrupt-document", lambda w, s: _export(w, s, w / "corrupt_document"), NOT_A_DOCUMENT),
    cli("export-truncated-document", lambda w, s: _export(w, s, w / "truncated_document"), NOT_A_DOCUMENT),
    cli("export-deeply-nested-document", lambda w, s: _export(w, s, w / "nested_document"), NOT_A_DOCUMENT),
    cli("export-document-not-an-object", lambda w, s: _export(w, s, w / "list_document"), NOT_A_DOCUMENT),
    cli(
        "export-corrupt-full-graph",
        lambda w, s: _export(w, s, w / "corrupt_full_graph" / "graph.safetensors"),
        "not a readable safetensors file",
    ),
    cli(
        "export-truncated-full-graph",
        lambda w, s: _export(w, s, w / "truncated_full_graph" / "graph.safetensors"),
        "not a readable safetensors file",
    ),
    cli(
        "export-out-under-a-file",
        lambda w, s: ["export-html", w.graph, "-o", w.file / "sub" / "page.html"],
        NOT_A_FOLDER,
    ),
    cli(
        "export-out-in-read-only-folder",
        lambda w, s: ["export-html", w.graph, "-o", _read_only(s / "ro") / "page.html"],
        "permission denied",
        modes=True,
    ),
    cli(
        "export-out-is-a-folder",
        lambda w, s: ["export-html", w.graph, "-o", w / "empty_folder"],
        "is a folder",
    ),
    cli(
        "export-surrogate-output",
        lambda w, s: ["export-html", w.graph, "-o", s / "p\udcff.html"],
        NOT_UNICODE,
    ),
    cli(
        "export-node-threshold-above-1", lambda w, s: _export(w, s, None, "--node-threshold", "1.5"), "(0, 1]"
    ),
    cli("export-node-threshold-nan", lambda w, s: _export(w, s, None, "--node-threshold", "nan"), "finite"),
    cli(
        "export-edge-threshold-negative", lambda w, s: _export(w, s, None, "--edge-threshold", "-1"), "(0, 1]"
    ),
    cli(
        "export-missing-features", lambda w, s: _export(w, s, None, "--features", s / "absent.sqlite"), NO_DB
    ),
    cli(
        "export-corrupt-features",
        lambda w, s: _export(w, s, None, "--features", w / "corrupt.sqlite"),
        NOT_A_DB,
    ),
    # features build: the corpus, the settings, the database.
    cli("build-missing-corpus", lambda w, s: _build(w, s, corpus=s / "absent.txt"), "no such corpus file"),
    cli("build-empty-corpus", lambda w, s: _build(w, s, corpus=w / "empty.txt"), "too little text"),
    cli("build-blank-corpus", lambda w, s: _build(w, s, corpus=w / "blank.txt"), "too little text"),
    cli(
        "build-empty-folder-corpus", lambda w, s: _build(w, s, corpus=w / "empty_folder"), "no .txt or .jsonl"
    ),
    cli("build-broken-jsonl-corpus", lambda w, s: _build(w, s, corpus=w / "broken.jsonl"), "not valid JSON"),
    cli(
        "build-unreadable-corpus",
        lambda w, s: _build(w, s, corpus=_unreadable(_copy(w.corpus, s / "corpus.txt"))),
        "permission denied",
        modes=True,
    ),
    cli("build-zero-tokens", lambda w, s: _build(w, s, "--tokens", "0"), "tokens must be at least 1"),
    cli("build-negative-top", lambda w, s: _build(w, s, "--top", "-1"), "top must be at least 1"),
    cli("build-zero-batch", lambda w, s: _build(w, s, "--batch-size", "0"), "batch_size must be at least 1"),
    cli("build-context-of-one", lambda w, s: _build(w, s, "--context-length", "1"), "context_length"),
    cli("build-context-past-model", lambda w, s: _build(w, s, "--context-length", "1000"), PAST_CONTEXT),
    cli("build-window-past-context", lambda w, s: _build(w, s, "--window", "64"), "window (64)"),
    cli("build-huge-seed", lambda w, s: _build(w, s, "--seed", HUGE_INT), "seed"),
    cli(
        "build-checkpoint-zero",
        lambda w, s: _build(w, s, "--checkpoint-minutes", "0"),
        "--checkpoint-minutes",
    ),
    cli("build-checkpoint-nan", lambda w, s: _build(w, s, "--checkpoint-minutes", "nan"), "finite"),
    cli(
        "build-db-in-read-only-folder",
        lambda w, s: [*_build(w, s), "--db", _read_only(s / "ro") / "f.sqlite"],
        "permission denied",
        modes=True,
    ),
    cli(
        "build-db-under-a-file",
        lambda w, s: [*_build(w, s), "--db", w.file / "sub" / "f.sqlite"],
        NOT_A_FOLDER,
    ),
    cli(
        "build-db-is-corrupt",
        lambda w, s: [*_build(w, s), "--db", _copy(w / "corrupt.sqlite", s / "corrupt.sqlite")],
        NOT_A_DB,
    ),
    cli(
        "build-db-of-another-set",
        lambda w, s: [*_build(w, s), "--transcoders", w.other_transcoders, "--db", _scratch_db(w, s)],
        OTHER_SET,
    ),
    cli(
        "build-wrong-width", lambda w, s: [*_build(w, s), "--transcoders", w.narrow_transcoders], WRONG_WIDTH
    ),
    # features show / search / label: the database and the feature named.
    cli("show-missing-db", lambda w, s: ["features", "show", s / "absent.sqlite", "0", "0"], NO_DB),
    cli("show-corrupt-db", lambda w, s: ["features", "show", w / "corrupt.sqlite", "0", "0"], NOT_A_DB),
    cli("show-truncated-db", lambda w, s: ["features", "show", w / "truncated.sqlite", "0", "0"], NOT_A_DB),
    cli("show-empty-db", lambda w, s: ["features", "show", w / "empty.txt", "0", "0"], NOT_A_DB),
    cli(
        "show-not-a-feature-db", lambda w, s: ["features", "show", w / "no_tables.sqlite", "0", "0"], NOT_A_DB
    ),
    cli("show-folder-as-db", lambda w, s: ["features", "show", w / "empty_folder", "0", "0"], NO_DB),
    cli(
        "show-unreadable-db",
        lambda w, s: ["features", "show", _unreadable(_scratch_db(w, s)), "0", "0"],
        None,
        modes=True,
    ),
    cli(
        "show-layer-out-of-range",
        lambda w, s: ["features", "show", w.db, "99", "0"],
        "no feature 0 in layer 99",
    ),
    cli("show-negative-layer", lambda w, s: ["features", "show", w.db, "--", "-1", "0"], "in layer -1"),
    cli("show-huge-layer", lambda w, s: ["features", "show", w.db, HUGE_INT, "0"], f"in layer {HUGE_INT}"),
    cli(
        "show-feature-out-of-range",
        lambda w, s: ["features", "show", w.db, "0", "1000000"],
        "no feature 1000000",
    ),
    cli("show-negative-feature", lambda w, s: ["features", "show", w.db, "--", "0", "-1"], "no feature -1"),
    cli("show-layer-not-a-number", lambda w, s: ["features", "show", w.db, "zero", "0"], "invalid int value"),
    cli("search-missing-db", lambda w, s: ["features", "search", s / "absent.sqlite", "cat"], NO_DB),
    cli("search-corrupt-db", lambda w, s: ["features", "search", w / "corrupt.sqlite", "cat"], NOT_A_DB),
    cli("search-surrogate-text", lambda w, s: ["features", "search", w.db, SURROGATE], NOT_UNICODE),
    cli(
        "search-limit-zero",
        lambda w, s: ["features", "search", w.db, "cat", "--limit", "0"],
        "positive integer",
    ),
    cli("label-missing-db", lambda w, s: ["features", "label", s / "absent.sqlite", "0", "0", "x"], NO_DB),
    cli(
        "label-layer-out-of-range",
        lambda w, s: ["features", "label", _scratch_db(w, s), "99", "0", "x"],
        "no feature 0 in layer 99",
    ),
    cli(
        "label-feature-out-of-range",
        lambda w, s: ["features", "label", _scratch_db(w, s), "0", HUGE_INT, "x"],
        f"no feature {HUGE_INT}",
    ),
    cli(
        "label-surrogate-text",
        lambda w, s: ["features", "label", _scratch_db(w, s), "0", "0", SURROGATE],
        NOT_UNICODE,
    ),
    cli(
        "label-surrogate-author",
        lambda w, s: ["features", "label", _scratch_db(w, s), "0", "0", "x", "--author", SURROGATE],
        NOT_UNICODE,
    ),
    cli(
        "label-huge-text",
        lambda w, s: ["features", "label", _scratch_db(w, s), "0", "0", "x" * 20_000],
        "at most 500 characters",
    ),
    # features export: the database, the selection, the output.
    cli(
        "export-features-missing-db",
        lambda w, s: ["features", "export", s / "absent.sqlite", s / "out"],
        NO_DB,
    ),
    cli(
        "export-features-out-under-a-file",
        lambda w, s: ["features", "export", w.db, w.file / "sub" / "out", "--no-progress"],
        NOT_A_FOLDER,
    ),
    cli(
        "export-features-bad-feature",
        lambda w, s: ["features", "export", w.db, s / "out", "--feature", "zero"],
        "--feature takes LAYER/FEATURE",
    ),
    cli(
        "export-features-feature-out-of-range",
        lambda w, s: ["features", "export", w.db, s / "out", "--feature", "99/0"],
        "no feature 0 in layer 99",
    ),
    cli(
        "export-features-layer-out-of-range",
        lambda w, s: ["features", "export", w.db, s / "out", "--layer", "99"],
        "in layer 99",
    ),
    cli(
        "export-features-json-of-many",
        lambda w, s: ["features", "export", w.db, s / "out.json", "--layer", "0", "--no-progress"],
        "a .json file holds one feature",
    ),
    # features label-llm: the selection and the endpoint's settings, refused before any request.
    cli("label-llm-nothing-chosen", lambda w, s: _label_llm(w, s), "--all"),
    cli("label-llm-missing-db", lambda w, s: _label_llm(w, s, "--all", db=s / "absent.sqlite"), NO_DB),
    cli(
        "label-llm-feature-out-of-range",
        lambda w, s: _label_llm(w, s, "--feature", "0/1000000"),
        "no feature",
    ),
    cli(
        "label-llm-bad-base-url",
        lambda w, s: [*_label_llm(w, s, "--feature", "0/0"), "--base-url", "nowhere"],
        "URL",
    ),
    cli(
        "label-llm-zero-batch",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--batch-size", "0"),
        "positive",
    ),
    cli(
        "label-llm-timeout-zero",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--timeout", "0"),
        "timeout",
    ),
    cli(
        "label-llm-timeout-nan",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--timeout", "nan"),
        "timeout",
    ),
    cli(
        "label-llm-negative-retries",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--retries", "-1"),
        "retries",
    ),
    cli(
        "label-llm-temperature-nan",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--temperature", "nan"),
        "temperature",
    ),
    cli(
        "label-llm-temperature-negative",
        lambda w, s: _label_llm(w, s, "--feature", "0/0", "--temperature", "-1"),
        "temperature",
    ),
    # intervene: edits and their values, targets, supernodes, vectors, the graph, the JSON output.
    cli("intervene-no-edits", lambda w, s: _intervene(w, s), "no edits"),
    cli(
        "intervene-no-prompt",
        lambda w, s: ["intervene", *_mt(w), "--ablate", w.feature],
        "give --prompt or --graph",
    ),
    cli(
        "intervene-set-without-value",
        lambda w, s: _intervene(w, s, "--set", w.feature),
        "expected TARGET=VALUE",
    ),
    cli(
        "intervene-set-not-a-number",
        lambda w, s: _intervene(w, s, "--set", f"{w.feature}=lots"),
        "not a number",
    ),
    cli(
        "intervene-set-nan", lambda w, s: _intervene(w, s, "--set", f"{w.feature}=nan"), "not a finite number"
    ),
    cli(
        "intervene-set-inf", lambda w, s: _intervene(w, s, "--set", f"{w.feature}=inf"), "not a finite number"
    ),
    cli(
        "intervene-scale-nan",
        lambda w, s: _intervene(w, s, "--scale", f"{w.feature}=nan"),
        "not a finite number",
    ),
    cli(
        "intervene-add-minus-inf", lambda w, s: _intervene(w, s, "--add", f"{w.feature}=-inf"), "not a finite"
    ),
    cli(
        "intervene-set-huge",
        lambda w, s: _intervene(w, s, "--set", f"{w.feature}=1e308"),
        "beyond what float32 holds",
    ),
    cli(
        "intervene-scale-huge",
        lambda w, s: _intervene(w, s, "--scale", f"{w.feature}=1e308"),
        "beyond what float32 holds",
    ),
    cli(
        "intervene-add-huge",
        lambda w, s: _intervene(w, s, "--add", f"{w.feature}=1e308"),
        "beyond what float32 holds",
    ),
    cli(
        "intervene-scale-inactive",
        lambda w, s: _intervene(w, s, "--scale", f"{w.inactive}=2"),
        "is not active",
    ),
    cli(
        "intervene-unknown-supernode",
        lambda w, s: _intervene(w, s, "--ablate", "France"),
        "'France' is neither",
    ),
    cli("intervene-not-a-node-id", lambda w, s: _intervene(w, s, "--ablate", "0_x_1"), "'0_x_1' is neither"),
    cli(
        "intervene-layer-out-of-range",
        lambda w, s: _intervene(w, s, "--ablate", "9_1_1"),
        "layer 9 is out of range",
    ),
    cli("intervene-index-out-of-range", lambda w, s: _intervene(w, s, "--set", "0_999_1=1"), "index 999"),
    cli("intervene-position-out-of-range", lambda w, s: _intervene(w, s, "--set", "0_1_99=1"), "position 99"),
    cli(
        "intervene-supernode-without-members",
        lambda w, s: _intervene(w, s, "--supernode", "G=", "--ablate", "G"),
        "supernode 'G' is empty",
    ),
    cli(
        "intervene-supernode-without-equals",
        lambda w, s: _intervene(w, s, "--supernode", "G", "--ablate", "G"),
        "expected NAME=NODE_ID",
    ),
    cli(
        "intervene-supernode-unknown-member",
        lambda w, s: _intervene(w, s, "--supernode", "G=bogus", "--ablate", "G"),
        "'bogus' is not a feature node id",
    ),
    cli(
        "intervene-surrogate-supernode",
        lambda w, s: _intervene(w, s, "--supernode", f"{SURROGATE}={w.feature}", "--ablate", SURROGATE),
        NOT_UNICODE,
    ),
    cli(
        "intervene-empty-prompt",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--prompt", ""],
        "the prompt is empty",
    ),
    cli(
        "intervene-prompt-past-context",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--prompt", TOO_LONG],
        PAST_CONTEXT,
    ),
    cli(
        "intervene-vector-missing",
        lambda w, s: _intervene(w, s, "--vector", s / "absent", "--vector-layer", "0"),
        "vector file not found",
    ),
    cli(
        "intervene-vector-corrupt",
        lambda w, s: _vector(w, s, "corrupt.safetensors"),
        "not a readable safetensors",
    ),
    cli(
        "intervene-vector-wrong-width", lambda w, s: _vector(w, s, "narrow_vector.safetensors"), "16 entries"
    ),
    cli(
        "intervene-vector-nan",
        lambda w, s: _vector(w, s, "nan_vector.safetensors"),
        "NaN or infinite entries",
    ),
    cli(
        "intervene-vector-unknown-key",
        lambda w, s: _vector(w, s, "vector.safetensors:nope"),
        "no tensor 'nope'",
    ),
    cli(
        "intervene-vector-without-layer",
        lambda w, s: _intervene(w, s, "--vector", w / "vector.safetensors"),
        "--vector needs --vector-layer",
    ),
    cli(
        "intervene-vector-layer-out-of-range",
        lambda w, s: [*_vector(w, s, "vector.safetensors"), "--vector-layer", "99"],
        "layer 99 is out of range",
    ),
    cli(
        "intervene-vector-scale-nan",
        lambda w, s: _vector(w, s, "vector.safetensors", "--vector-scale", "nan"),
        "not a finite number",
    ),
    cli(
        "intervene-vector-scale-huge",
        lambda w, s: _vector(w, s, "vector.safetensors", "--vector-scale", "1e308"),
        "NaN or infinite entries",
    ),
    cli(
        "intervene-vector-bad-positions",
        lambda w, s: _vector(w, s, "vector.safetensors", "--vector-positions", "a,b"),
        "--vector-positions takes",
    ),
    cli(
        "intervene-vector-position-out-of-range",
        lambda w, s: _vector(w, s, "vector.safetensors", "--vector-positions", "99"),
        "position 99",
    ),
    cli(
        "intervene-generate-zero",
        lambda w, s: _intervene(w, s, "--ablate", w.feature, "--generate", "0"),
        "must be a positive integer",
    ),
    cli(
        "intervene-generate-past-context",
        lambda w, s: _intervene(w, s, "--ablate", w.feature, "--generate", "100000"),
        PAST_CONTEXT,
    ),
    cli(
        "intervene-temperature-nan",
        lambda w, s: _intervene(
            w, s, "--ablate", w.feature, "--generate", "3", "--sample", "--temperature", "nan"
        ),
        "temperature must be a finite number",
    ),
    cli(
        "intervene-huge-seed",
        lambda w, s: _intervene(
            w, s, "--ablate", w.feature, "--generate", "2", "--sample", "--seed", HUGE_INT
        ),
        "seed",
    ),
    cli(
        "intervene-multi-token-target",
        lambda w, s: _intervene(w, s, "--ablate", w.feature, "--target", " Paris"),
        "not a single token",
    ),
    cli(
        "intervene-unknown-mode",
        lambda w, s: _intervene(w, s, "--ablate", w.feature, "--mode", "closed"),
        "invalid choice: 'closed'",
    ),
    cli(
        "intervene-k-zero",
        lambda w, s: _intervene(w, s, "--ablate", w.feature, "-k", "0"),
        "positive integer",
    ),
    cli(
        "intervene-json-under-a-file",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--json", w.file / "sub" / "result.json"],
        NOT_A_FOLDER,
    ),
    cli(
        "intervene-json-in-read-only-folder",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--json", _read_only(s / "ro") / "r.json"],
        "permission denied",
        modes=True,
    ),
    cli(
        "intervene-json-beside-a-file",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--json", w.file / "result.json"],
        NOT_A_FOLDER,
    ),
    cli(
        "intervene-missing-transcoders",
        lambda w, s: [*_intervene(w, s, "--ablate", w.feature), "--transcoders", s],
        "no config.yaml",
    ),
    cli(
        "intervene-missing-graph",
        lambda w, s: ["intervene", *_mt(w), "--graph", s / "absent", "--ablate", w.feature],
        "no graph at",
    ),
    cli(
        "intervene-corrupt-graph",
        lambda w, s: ["intervene", *_mt(w), "--graph", w / "corrupt_full_graph", "--ablate", w.feature],
        "not a readable safetensors file",
    ),
    cli(
        "intervene-graph-with-corrupt-document",
        lambda w, s: ["intervene", *_mt(w), "--graph", w / "corrupt_document_graph", "--ablate", w.feature],
        NOT_A_DOCUMENT,
    ),
    cli(
        "intervene-graph-of-another-set",
        lambda w, s: ["intervene", *_mt(w, w.other_transcoders), "--graph", w.graph, "--ablate", w.feature],
        OTHER_SET,
    ),
    # check: the graph, its options, the outputs.
    cli("check-missing-graph", lambda w, s: _check(w, s, graph=s / "absent"), "no graph at"),
    cli(
        "check-document-only", lambda w, s: _check(w, s, graph=w / "corrupt_document"), "holds no full graph"
    ),
    cli("check-corrupt-graph", lambda w, s: _check(w, s, graph=w / "corrupt_full_graph"), "not a readable"),
    cli(
        "check-truncated-graph", lambda w, s: _check(w, s, graph=w / "truncated_full_graph"), "not a readable"
    ),
    cli(
        "check-corrupt-document",
        lambda w, s: _check(w, s, graph=w / "corrupt_document_graph"),
        NOT_A_DOCUMENT,
    ),
    cli("check-text-file", lambda w, s: _check(w, s, graph=w.file), "not a readable safetensors file"),
    cli(
        "check-missing-model", lambda w, s: [*_check(w, s), "--model", s / "absent"], "no such file or folder"
    ),
    cli(
        "check-wrong-width", lambda w, s: [*_check(w, s), "--transcoders", w.narrow_transcoders], WRONG_WIDTH
    ),
    cli("check-other-set", lambda w, s: [*_check(w, s), "--transcoders", w.other_transcoders], OTHER_SET),
    cli(
        "check-top-zero",
        lambda w, s: _check(w, s, "--top", "0", graph=w.graph / "graph.safetensors"),  # no saved supernodes
        "no features were asked for",
    ),
    cli("check-top-negative", lambda w, s: _check(w, s, "--top", "-3"), "n_features must be zero or more"),
    cli("check-bad-supernode", lambda w, s: _check(w, s, "--supernode", "G"), "expected NAME=NODE_ID"),
    cli(
        "check-unknown-supernode-member",
        lambda w, s: _check(w, s, "--supernode", "G=bogus"),
        "'bogus' is not",
    ),
    cli("check-unknown-target", lambda w, s: _check(w, s, "--target", "zz"), "target 'zz' is not one of"),
    cli(
        "check-plot-in-read-only-folder",
        lambda w, s: [*_check(w, s), "--plot", _read_only(s / "ro") / "c.png"],
        "permission denied",
        modes=True,
    ),
    cli(
        "check-plot-under-a-file",
        lambda w, s: [*_check(w, s), "--plot", w.file / "sub" / "c.png"],
        NOT_A_FOLDER,
    ),
    cli(
        "check-json-under-a-file",
        lambda w, s: [*_check(w, s), "--json", w.file / "sub" / "c.json"],
        NOT_A_FOLDER,
    ),
    # train: the run folder, the corpus, the settings.
    cli(
        "train-out-under-a-file", lambda w, s: [*_train(w, s), "--out", w.file / "sub" / "run"], NOT_A_FOLDER
    ),
    cli(
        "train-out-in-read-only-folder",
        lambda w, s: [*_train(w, s), "--out", _read_only(s / "ro") / "run"],
        "permission denied",
        modes=True,
    ),
    cli(
        "train-missing-corpus",
        lambda w, s: _train(w, s, corpus=s / "absent.txt"),
        "no such corpus file",
    ),
    cli(
        "train-empty-corpus",
        lambda w, s: _train(w, s, corpus=w / "empty.txt"),
        "too small",
    ),
    cli(
        "train-empty-folder-corpus",
        lambda w, s: _train(w, s, corpus=w / "empty_folder"),
        "no .txt or .jsonl",
    ),
    cli(
        "train-wrong-text-field",
        lambda w, s: _train(w, s, corpus=w / "wrong_field.jsonl"),
        "no string field 'text'",
    ),
    cli(
        "train-resume-nothing",
        lambda w, s: _train(w, s, "--resume"),
        "nothing to resume",
    ),
    cli(
        "train-zero-features", lambda w, s: _train(w, s, "--d-features", "0"), "d_features must be at least 1"
    ),
    cli("train-k-past-features", lambda w, s: _train(w, s, "--k", "64"), "k=64 cannot exceed d_features=16"),
    cli("train-zero-tokens", lambda w, s: _train(w, s, "--tokens", "0"), "n_tokens must be at least 1"),
    cli("train-zero-epochs", lambda w, s: _train(w, s, "--epochs", "0"), "epochs must be at least 1"),
    cli("train-zero-batch", lambda w, s: _train(w, s, "--batch-size", "0"), "batch_size must be at least 1"),
    cli("train-lr-nan", lambda w, s: _train(w, s, "--lr", "nan"), "lr must be a finite number"),
    cli("train-lr-inf", lambda w, s: _train(w, s, "--lr", "inf"), "lr must be a finite number"),
    cli("train-lr-zero", lambda w, s: _train(w, s, "--lr", "0"), "lr must be positive"),
    cli("train-lr-negative", lambda w, s: _train(w, s, "--lr", "-0.1"), "lr must be positive"),
    cli("train-aux-coef-inf", lambda w, s: _train(w, s, "--aux-coef", "inf"), "aux_coef must be a finite"),
    cli(
        "train-grad-norm-nan", lambda w, s: _train(w, s, "--max-grad-norm", "nan"), "max_grad_norm must be a"
    ),
    cli(
        "train-decay-above-1",
        lambda w, s: _train(w, s, "--decay-fraction", "1.5"),
        "decay_fraction must be in",
    ),
    cli(
        "train-context-of-two",
        lambda w, s: _train(w, s, "--context-length", "2"),
        "context_length must be at",
    ),
    cli("train-context-past-model", lambda w, s: _train(w, s, "--context-length", "1000"), PAST_CONTEXT),
    cli("train-groups-not-dividing", lambda w, s: _train(w, s, "--groups", "3"), "groups=3 must divide"),
    cli("train-huge-seed", lambda w, s: _train(w, s, "--seed", HUGE_INT), "seed"),
    cli("train-unknown-kind", lambda w, s: _train(w, s, "--kind", "mlp"), "invalid choice: 'mlp'"),
    cli(
        "train-negative-eval-tokens", lambda w, s: _train(w, s, "--eval-tokens", "-1"), "must be zero or more"
    ),
    cli(
        "train-checkpoint-negative",
        lambda w, s: _train(w, s, "--checkpoint-every", "-5"),
        "checkpoint",
    ),
    cli(
        "train-checkpoint-nan",
        lambda w, s: _train(w, s, "--checkpoint-every", "nan"),
        "checkpoint",
    ),
    # evaluate-transcoders: the corpus, the set, the token count.
    cli(
        "evaluate-missing-corpus",
        lambda w, s: _evaluate(w, s, corpus=s / "absent.txt"),
        "no such corpus file",
    ),
    cli("evaluate-empty-corpus", lambda w, s: _evaluate(w, s, corpus=w / "empty.txt"), "too small"),
    cli(
        "evaluate-wrong-text-field",
        lambda w, s: _evaluate(w, s, corpus=w / "wrong_field.jsonl"),
        "no string field",
    ),
    cli("evaluate-zero-tokens", lambda w, s: _evaluate(w, s, "--tokens", "0"), "must be a positive integer"),
    cli(
        "evaluate-missing-transcoders",
        lambda w, s: [*_evaluate(w, s), "--transcoders", s / "absent"],
        "not found",
    ),
    cli(
        "evaluate-wrong-width",
        lambda w, s: [*_evaluate(w, s), "--transcoders", w.narrow_transcoders],
        WRONG_WIDTH,
    ),
]


@pytest.mark.parametrize(("build", "expect"), CLI_CASES)
def test_command_line_refuses_bad_input(world, tmp_path, monkeypatch, capsys, build, expect):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(scratch)  # outputs written by default would land here
    argv = [str(arg) for arg in build(world, scratch)]
    before = _snapshot(world.root, scratch)
    capsys.readouterr()
    try:
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        err = capsys.readouterr().err
        after = _snapshot(world.root, scratch)
    finally:
        for path in [scratch, *scratch.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert "Traceback" not in err, err
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars redraw with \r
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line, last: {err!r}"
    if expect is not None:
        assert expect.lower() in errors[0].lower(), errors[0]
    assert not _changes(before, after), f"files created or changed: {_changes(before, after)}"


# ---------------------------------------------------------------------------------------------------------
# The explorer.


@pytest.fixture(scope="module")
def engine(world) -> Engine:
    model = circuitmap.load_model(str(world.model))
    transcoders = circuitmap.load_transcoders(world.transcoders)
    return Engine(model, transcoders, model_spec="m", transcoders_spec="t")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: object = None  # sent as JSON
    raw: str | bytes | None = None  # sent as it is, as application/json
    headers: dict | None = None
    bare: bool = False  # a server without a model, transcoders or feature database


def srv(case_id: str, request: Request, status: int, expect: str | None):
    """A server case: the request, the status it must get, a text its detail must contain."""
    return pytest.param(request, status, expect, id=case_id)


def get(path: str, **kwargs) -> Request:
    return Request("GET", path, **kwargs)


def put(path: str, body: object = None, **kwargs) -> Request:
    return Request("PUT", path, body, **kwargs)


def post(path: str, body: object = None, **kwargs) -> Request:
    return Request("POST", path, body, **kwargs)


def delete(path: str, **kwargs) -> Request:
    return Request("DELETE", path, **kwargs)


# Placeholders for node ids of the served graph, replaced in paths and bodies.
FEATURE, ERROR_NODE, TOKEN_NODE, LOGIT_NODE = "<feature>", "<error>", "<token>", "<logit>"
STATE = "/api/graphs/cat/state"
RENAME = "/api/graphs/cat/rename"
SCORES = "/api/graphs/cat/scores"
EDIT = "/api/graphs/cat/intervene"
LABEL = "/api/features/0/0/label"
NESTED = "[" * 100_000
NOT_JSON = "the request body is not valid JSON"
BAD_NAME = "invalid graph name"
NOT_FINITE = "the value must be a finite number"
NEW_TOKENS = "max_new_tokens must be"
NO_ENGINE = "started without --model and --transcoders"
NO_FEATURES = "this server has no feature database"


def _edit(**changes) -> dict:
    return {"edits": [{"nodes": [FEATURE], "operation": "scale", "value": 2, **changes}]}


def _raw_edit(value: str) -> str:
    """An edit whose value is written as it is into the JSON text (NaN, Infinity, 1e999)."""
    return json.dumps(_edit(value=0.125)).replace("0.125", value)


SERVER_CASES = [
    # Unknown or invalid names, indices, routes and methods.
    srv("unknown-graph", get("/api/graphs/nope"), 404, "no graph named 'nope'"),
    srv("hidden-graph-name", get("/api/graphs/.cat"), 400, BAD_NAME),
    srv("graph-name-too-long", get("/api/graphs/" + "a" * 101), 400, BAD_NAME),
    srv("graph-name-escaping", get("/api/graphs/..%2F..%2Fetc"), 404, None),
    srv("unknown-route", get("/api/nowhere"), 404, None),
    srv("method-not-allowed", Request("PATCH", "/api/graphs/cat", {}), 405, None),
    srv("unknown-asset", get("/static/nope.js"), 404, "no asset 'nope.js'"),
    srv("asset-escaping", get("/static/..%2F..%2Fapp.py"), 404, None),
    srv("unknown-job", get("/api/jobs/999"), 404, "no job '999'"),
    srv("cancel-unknown-job", delete("/api/jobs/999"), 404, "no job '999'"),
    srv("jobs-without-engine", get("/api/jobs", bare=True), 404, NO_ENGINE),
    srv("feature-layer-out-of-range", get("/api/features/99/0"), 400, "no feature 0 in layer 99"),
    srv("feature-index-out-of-range", get("/api/features/0/999999"), 400, "no feature 999999"),
    srv("feature-negative-layer", get("/api/features/-1/0"), 400, "must be a whole number"),
    srv("feature-layer-not-a-number", get("/api/features/zero/0"), 400, "must be a whole number"),
    srv("feature-index-huge", get("/api/features/0/99999999999"), 400, "must be a whole number"),
    srv("feature-without-database", get("/api/features/0/0", bare=True), 404, NO_FEATURES),
    srv("search-text-too-long", get("/api/features/search?q=" + "a" * 201), 400, "at most 200"),
    srv("search-limit-zero", get("/api/features/search?q=cat&limit=0"), 400, "limit must be"),
    srv("search-limit-huge", get("/api/features/search?q=cat&limit=100000"), 400, "limit must be"),
    srv("search-limit-not-a-number", get("/api/features/search?q=cat&limit=ten"), 400, "limit must be"),
    srv("search-without-database", get("/api/features/search?q=cat", bare=True), 404, NO_FEATURES),
    # What every request that changes something must be: JSON, same origin, this host, not too large.
    srv("not-json-content", put(STATE, headers={"content-type": "text/plain"}), 415, "application/json"),
    srv("cross-origin", put(STATE, {}, headers={"origin": "http://evil.example"}), 403, "cross-origin"),
    srv("foreign-host", put(STATE, {}, headers={"host": "evil.example"}), 421, "not evil.example"),
    srv("oversized-body", put(STATE, raw=b'{"labels": "' + b"x" * (3 * 2**20) + b'"}'), 413, "larger than"),
    srv("deeply-nested-body", put(STATE, raw=NESTED), 400, NOT_JSON),
    srv("malformed-body", put(STATE, raw='{"pinnedIds": ['), 400, NOT_JSON),
    srv("empty-body", put(STATE, raw=""), 400, NOT_JSON),
    srv("body-not-utf8", put(STATE, raw=b'{"labels": {"\xff\xfe": "x"}}'), 400, NOT_JSON),
    srv("body-not-an-object", put(STATE, []), 400, "must be a JSON object"),
    srv("body-infinite-number", put(STATE, raw="1e999"), 400, "must be a JSON object"),
    # Saving the state: every field's type, the node ids, labels and view values.
    srv("state-unknown-graph", put("/api/graphs/nope/state", {}), 404, "no graph named 'nope'"),
    srv("state-unknown-field", put(STATE, {"pins": []}), 400, "unknown state fields: pins"),
    srv("state-pins-not-a-list", put(STATE, {"pinnedIds": "x"}), 400, "pinnedIds must be a list"),
    srv("state-pins-not-strings", put(STATE, {"pinnedIds": [1, 2]}), 400, "pinnedIds must be a list"),
    srv("state-unknown-pin", put(STATE, {"pinnedIds": ["nope"]}), 400, "unknown node ids 'nope'"),
    srv("state-too-many-pins", put(STATE, {"pinnedIds": [f"n{i}" for i in range(20_001)]}), 400, "at most"),
    srv("state-supernodes-not-a-list", put(STATE, {"supernodes": "x"}), 400, "supernodes must be a list"),
    srv("state-empty-supernode", put(STATE, {"supernodes": [["g"]]}), 400, "at least one node id"),
    srv("state-supernode-label-not-text", put(STATE, {"supernodes": [[1, FEATURE]]}), 400, "[label, id, …]"),
    srv(
        "state-supernode-unknown-member", put(STATE, {"supernodes": [["g", "nope"]]}), 400, "unknown node ids"
    ),
    srv(
        "state-supernode-surrogate-label",
        put(STATE, raw='{"supernodes": [["bad \\udcff", "<feature>"]]}'),
        400,
        "not valid Unicode",
    ),
    srv(
        "state-supernode-huge-label",
        put(STATE, {"supernodes": [["x" * 10_000, FEATURE]]}),
        400,
        "at most 500",
    ),
    srv("state-clicked-not-text", put(STATE, {"clickedId": 5}), 400, "clickedId 5 is not a node"),
    srv("state-clicked-unknown", put(STATE, {"clickedId": "nope"}), 400, "clickedId 'nope' is not a node"),
    srv("state-labels-not-an-object", put(STATE, {"labels": []}), 400, "labels must be an object"),
    srv("state-label-unknown-node", put(STATE, {"labels": {"nope": "x"}}), 400, "unknown node ids 'nope'"),
    srv("state-label-not-text", put(STATE, {"labels": {FEATURE: 5}}), 400, "must be a string, got int"),
    srv("state-label-null", put(STATE, {"labels": {FEATURE: None}}), 400, "must be a string, got NoneType"),
    srv("state-label-huge", put(STATE, {"labels": {FEATURE: "x" * 10_000}}), 400, "at most 500"),
    srv(
        "state-label-surrogate",
        put(STATE, raw='{"labels": {"<feature>": "bad \\udcff"}}'),
        400,
        "not valid Unicode",
    ),
    srv("state-view-not-an-object", put(STATE, {"view": []}), 400, "view must be an object"),
    srv("state-view-unknown-field", put(STATE, {"view": {"zoom": 2}}), 400, "unknown view field 'zoom'"),
    srv("state-threshold-above-1", put(STATE, {"view": {"nodeThreshold": 2}}), 400, "nodeThreshold must be"),
    srv("state-threshold-huge", put(STATE, {"view": {"nodeThreshold": 1e308}}), 400, "nodeThreshold must be"),
    srv("state-threshold-nan", put(STATE, raw='{"view": {"nodeThreshold": NaN}}'), 400, "nodeThreshold must"),
    srv(
        "state-threshold-infinity",
        put(STATE, raw='{"view": {"edgeThreshold": -Infinity}}'),
        400,
        "edgeThreshold must",
    ),
    srv("state-threshold-text", put(STATE, {"view": {"edgeThreshold": "0.5"}}), 400, "edgeThreshold must be"),
    srv("state-toggle-not-bool", put(STATE, {"view": {"showErrors": "yes"}}), 400, "true or false"),
    srv("state-stale-revision", put(STATE, {"revision": "stale"}), 409, "saved elsewhere"),
    srv("state-revision-not-text", put(STATE, {"revision": 5}), 409, "saved elsewhere"),
    # Renaming and deleting.
    srv("rename-unknown-graph", post("/api/graphs/nope/rename", {"name": "x"}), 404, "no graph named 'nope'"),
    srv("rename-no-name", post(RENAME, {}), 400, BAD_NAME),
    srv("rename-name-not-text", post(RENAME, {"name": 5}), 400, BAD_NAME),
    srv("rename-empty-name", post(RENAME, {"name": ""}), 400, BAD_NAME),
    srv("rename-escaping-name", post(RENAME, {"name": "../x"}), 400, BAD_NAME),
    srv("rename-hidden-name", post(RENAME, {"name": ".x"}), 400, BAD_NAME),
    srv("rename-name-too-long", post(RENAME, {"name": "a" * 101}), 400, BAD_NAME),
    srv("rename-surrogate-name", post(RENAME, raw='{"name": "bad\\udcff"}'), 400, BAD_NAME),
    srv("rename-to-itself", post(RENAME, {"name": "cat"}), 409, "already exists"),
    srv("rename-deeply-nested", post(RENAME, raw=NESTED), 400, NOT_JSON),
    srv("rename-unknown-field", post(RENAME, {"name": "dog", "force": True}), 400, "force"),
    srv("delete-unknown-graph", delete("/api/graphs/nope"), 404, "no graph named 'nope'"),
    srv("delete-invalid-name", delete("/api/graphs/.cat"), 400, BAD_NAME),
    # Subgraph scores.
    srv("scores-unknown-graph", post("/api/graphs/nope/scores", {}), 404, "no graph named 'nope'"),
    srv("scores-pins-not-a-list", post(SCORES, {"pinnedIds": "x"}), 400, "pinnedIds must be a list"),
    srv("scores-pins-not-strings", post(SCORES, {"pinnedIds": [None]}), 400, "pinnedIds must be a list"),
    srv("scores-unknown-pin", post(SCORES, {"pinnedIds": ["nope"]}), 400, "unknown node id 'nope'"),
    srv("scores-pin-out-of-range", post(SCORES, {"pinnedIds": ["0_1_99999"]}), 400, "unknown node id"),
    srv("scores-supernodes-not-a-list", post(SCORES, {"supernodes": {"g": []}}), 400, "supernodes must be"),
    srv("scores-empty-supernode", post(SCORES, {"supernodes": [["g"]]}), 400, "at least one node id"),
    srv("scores-not-an-object", post(SCORES, raw="[1, 2]"), 400, "must be a JSON object"),
    srv("scores-unknown-field", post(SCORES, {"pinned": [FEATURE]}), 400, "pinned"),
    # Computing a graph.
    srv("job-no-prompt", post("/api/jobs", {}), 400, "the prompt must be a string"),
    srv("job-prompt-not-text", post("/api/jobs", {"prompt": 5}), 400, "the prompt must be a string"),
    srv("job-empty-prompt", post("/api/jobs", {"prompt": ""}), 400, "the prompt is empty"),
    srv("job-blank-prompt", post("/api/jobs", {"prompt": "   "}), 400, "the prompt is empty"),
    srv("job-huge-prompt", post("/api/jobs", {"prompt": "x" * 5000}), 400, "at most 4000"),
    srv("job-surrogate-prompt", post("/api/jobs", raw='{"prompt": "bad \\udcff"}'), 400, "not valid Unicode"),
    srv(
        "job-prompt-past-context",
        post("/api/jobs", {"prompt": TOO_LONG}),
        400,
        "context",
    ),
    srv("job-bad-name", post("/api/jobs", {"prompt": "The cat", "name": "../x"}), 400, BAD_NAME),
    srv("job-name-not-text", post("/api/jobs", {"prompt": "The cat", "name": 5}), 400, BAD_NAME),
    srv(
        "job-unknown-field",
        post("/api/jobs", {"prompt": "The cat", "priority": 1}),
        400,
        "priority",
    ),
    srv("job-without-engine", post("/api/jobs", {"prompt": "The cat"}, bare=True), 404, NO_ENGINE),
    # Interventions: every field of the body.
    srv("edit-unknown-graph", post("/api/graphs/nope/intervene", _edit()), 404, "no graph named 'nope'"),
    srv("edit-without-engine", post(EDIT, _edit(), bare=True), 404, NO_ENGINE),
    srv("edit-no-edits", post(EDIT, {}), 400, "edits must be a non-empty list"),
    srv("edit-empty-edits", post(EDIT, {"edits": []}), 400, "edits must be a non-empty list"),
    srv("edit-edits-not-a-list", post(EDIT, {"edits": "scale"}), 400, "edits must be a non-empty list"),
    srv("edit-edit-not-an-object", post(EDIT, {"edits": [5]}), 400, "edit 1 must be an object"),
    srv("edit-too-many-edits", post(EDIT, {"edits": _edit()["edits"] * 65}), 400, "at most 64"),
    srv("edit-unknown-field", post(EDIT, {**_edit(), "seed": 1}), 400, "unknown fields: seed"),
    srv("edit-unknown-edit-field", post(EDIT, _edit(layer=0)), 400, "unknown fields: layer"),
    srv("edit-nodes-not-a-list", post(EDIT, _edit(nodes=FEATURE)), 400, "nodes must be a list"),
    srv("edit-nodes-not-strings", post(EDIT, _edit(nodes=[0])), 400, "nodes must be a list"),
    srv("edit-no-nodes", post(EDIT, _edit(nodes=[])), 400, "has no nodes"),
    srv("edit-unknown-node", post(EDIT, _edit(nodes=["0_999_99"])), 400, "is not a node of this graph"),
    srv("edit-error-node", post(EDIT, _edit(nodes=[ERROR_NODE])), 400, "is an error node"),
    srv("edit-token-node", post(EDIT, _edit(nodes=[TOKEN_NODE])), 400, "is a token"),
    srv("edit-logit-node", post(EDIT, _edit(nodes=[LOGIT_NODE])), 400, "is an output (logit) node"),
    srv("edit-repeated-node", post(EDIT, _edit(nodes=[FEATURE, FEATURE])), 400, "listed twice"),
    srv(
        "edit-too-many-nodes", post(EDIT, _edit(nodes=[f"n{i}" for i in range(20_001)])), 400, "at most 20000"
    ),
    srv(
        "edit-unknown-operation", post(EDIT, _edit(operation="multiply")), 400, "unknown operation 'multiply'"
    ),
    srv("edit-operation-not-text", post(EDIT, _edit(operation=2)), 400, "unknown operation"),
    srv("edit-value-text", post(EDIT, _edit(value="2")), 400, NOT_FINITE),
    srv("edit-value-bool", post(EDIT, _edit(value=True)), 400, NOT_FINITE),
    srv("edit-value-null", post(EDIT, _edit(value=None)), 400, NOT_FINITE),
    srv("edit-value-nan", post(EDIT, raw=_raw_edit("NaN")), 400, NOT_FINITE),
    srv("edit-value-infinity", post(EDIT, raw=_raw_edit("Infinity")), 400, NOT_FINITE),
    srv("edit-value-overflow", post(EDIT, raw=_raw_edit("-1e999")), 400, NOT_FINITE),
    srv("edit-value-huge-int", post(EDIT, _edit(value=10**400)), 400, NOT_FINITE),
    srv("edit-scale-huge", post(EDIT, _edit(value=1e308)), 400, "beyond what float32 holds"),
    srv("edit-add-huge", post(EDIT, _edit(operation="add", value=1e308)), 400, "beyond what float32 holds"),
    srv(
        "edit-set-huge",
        post(EDIT, _edit(operation="set", value=1e308)),
        400,
        "beyond what float32 holds",
    ),
    srv("edit-empty-name", post(EDIT, _edit(name="  ")), 400, "the name is empty"),
    srv("edit-name-not-text", post(EDIT, _edit(name=5)), 400, "the name must be a string"),
    srv("edit-name-too-long", post(EDIT, _edit(name="x" * 501)), 400, "at most 500 are allowed"),
    srv(
        "edit-surrogate-name",
        post(EDIT, raw=json.dumps(_edit(name="NAME")).replace("NAME", "bad \\udcff")),
        400,
        "not valid Unicode",
    ),
    srv("edit-zero-new-tokens", post(EDIT, {**_edit(), "max_new_tokens": 0}), 400, NEW_TOKENS),
    srv("edit-negative-new-tokens", post(EDIT, {**_edit(), "max_new_tokens": -1}), 400, NEW_TOKENS),
    srv("edit-huge-new-tokens", post(EDIT, {**_edit(), "max_new_tokens": 10**6}), 400, NEW_TOKENS),
    srv("edit-new-tokens-text", post(EDIT, {**_edit(), "max_new_tokens": "5"}), 400, NEW_TOKENS),
    srv("edit-new-tokens-fraction", post(EDIT, {**_edit(), "max_new_tokens": 1.5}), 400, NEW_TOKENS),
    srv("edit-new-tokens-bool", post(EDIT, {**_edit(), "max_new_tokens": True}), 400, NEW_TOKENS),
    srv(
        "edit-unknown-mode", post(EDIT, {**_edit(), "mode": "closed_loop"}), 400, "unknown mode 'closed_loop'"
    ),
    srv("edit-mode-not-text", post(EDIT, {**_edit(), "mode": ["open_loop"]}), 400, "unknown mode"),
    srv("edit-deeply-nested", post(EDIT, raw=NESTED), 400, NOT_JSON),
    # Feature labels.
    srv("label-no-text", put(LABEL, {}), 400, "must be a string, got NoneType"),
    srv("label-text-not-text", put(LABEL, {"text": 5}), 400, "must be a string, got int"),
    srv("label-text-nan", put(LABEL, raw='{"text": NaN}'), 400, "must be a string, got float"),
    srv("label-surrogate-text", put(LABEL, raw='{"text": "bad \\udcff"}'), 400, "not valid Unicode"),
    srv("label-huge-text", put(LABEL, {"text": "x" * 100_000}), 400, "at most 500 characters"),
    srv(
        "label-author-not-text", put(LABEL, {"text": "cat", "author": 5}), 400, "the author must be a string"
    ),
    srv(
        "label-surrogate-author",
        put(LABEL, raw='{"text": "cat", "author": "\\udcff"}'),
        400,
        "not valid Unicode",
    ),
    srv("label-author-too-long", put(LABEL, {"text": "cat", "author": "a" * 200}), 400, "at most 100"),
    srv("label-unknown-field", put(LABEL, {"text": "cat", "source": "llm"}), 400, "source"),
    srv("label-layer-out-of-range", put("/api/features/99/0/label", {"text": "cat"}), 400, "in layer 99"),
    srv(
        "label-index-out-of-range",
        put("/api/features/0/999999/label", {"text": "cat"}),
        400,
        "no feature 999999",
    ),
    srv(
        "label-layer-not-a-number",
        put("/api/features/x/0/label", {"text": "cat"}),
        400,
        "must be a whole number",
    ),
    srv("label-deeply-nested", put(LABEL, raw=NESTED), 400, NOT_JSON),
    srv("label-without-database", put(LABEL, {"text": "cat"}, bare=True), 404, NO_FEATURES),
]


def _fill(value, ids: dict[str, str]):
    """``value`` with the node-id placeholders replaced by the served graph's ids."""
    if isinstance(value, str):
        for placeholder, node_id in ids.items():
            value = value.replace(placeholder, node_id)
        return value
    if isinstance(value, bytes):
        return _fill(value.decode("latin-1"), ids).encode("latin-1")
    if isinstance(value, list):
        return [_fill(item, ids) for item in value]
    if isinstance(value, dict):
        return {_fill(key, ids): _fill(item, ids) for key, item in value.items()}
    return value


@pytest.mark.parametrize(("request_", "status", "expect"), SERVER_CASES)
def test_explorer_refuses_bad_requests(world, engine, tmp_path, request_, status, expect):
    _copy(world.graph, tmp_path / "graphs" / "cat")
    db = _copy(world.db, tmp_path / "features.sqlite")
    ids = {FEATURE: world.feature, ERROR_NODE: world.error_node, TOKEN_NODE: world.token_node}
    ids[LOGIT_NODE] = world.logit_node
    headers = {"content-type": "application/json"} if request_.raw is not None else {}
    kwargs: dict = {"headers": {**headers, **(request_.headers or {})}}
    if request_.raw is not None:
        kwargs["content"] = _fill(request_.raw, ids)
    elif request_.body is not None:
        kwargs["json"] = _fill(request_.body, ids)
    with FeatureStore(db, engine.transcoders) as store:
        graphs = tmp_path / "graphs"
        app = create_app(graphs) if request_.bare else create_app(graphs, engine, features=store)
        before = _snapshot(tmp_path)
        with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
            response = client.request(request_.method, _fill(request_.path, ids), **kwargs)
        after = _snapshot(tmp_path)
    shown = f"{response.status_code} {response.text[:500]!r}"
    assert 400 <= response.status_code < 500, shown
    assert response.status_code == status, shown
    assert response.headers["content-type"].startswith("application/json"), shown
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"detail"}, shown
    detail = body["detail"]
    assert isinstance(detail, str) and detail.strip() and "\n" not in detail, shown
    if expect is not None:
        assert expect.lower() in detail.lower(), shown
    assert not _changes(before, after), f"files created or changed: {_changes(before, after)}"

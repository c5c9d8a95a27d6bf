"""``attribute-batch``: the graphs of single ``attribute`` calls, resuming, bad input, and two processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.distributed import one_thread, save_tiny_setup, torchrun

from circuitmap import batch as batch_module
from circuitmap import load_model, load_transcoders
from circuitmap.batch import BatchPrompt, attribute_batch, read_prompts
from circuitmap.cli import main
from circuitmap.errors import Interrupted
from circuitmap.graphs import Graph, GraphFolder, PruneConfig
from circuitmap.graphs.files import ARRAY_FIELDS

PROMPTS = [
    {"prompt": "The cat sat on"},
    {"prompt": "A dog ran past", "id": "dog", "targets": ["a", ["e", "o"]]},
    {"prompt": "Birds sang | loud songs"},
]
NAMES = ["001-the-cat-sat-on", "dog", "003-birds-sang-loud-songs"]


def write_prompts(path: Path, entries: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(entry) for entry in entries]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    save_tiny_setup(folder, "plt-topk-skip")
    write_prompts(folder / "prompts.jsonl", PROMPTS, blank_after=1)
    return folder


def batch_args(setup: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "attribute-batch",
        str(prompts),
        "--model",
        str(setup / "model"),
        "--transcoders",
        str(setup / "transcoders"),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--top",
        "3",
        *extra,
    ]


@pytest.fixture(scope="module")
def batch(setup):
    """The batch of ``PROMPTS`` in one process, and what it printed."""
    out = setup / "one-process"
    with one_thread():
        assert main(batch_args(setup, setup / "prompts.jsonl", out)) == 0
    return out


def assert_same_graph(first: Path, second: Path) -> None:
    """The two folders' graphs have equal arrays, and their documents are equal but for ``info``."""
    a, b = GraphFolder(first), GraphFolder(second)
    graph_a, graph_b = a.read_graph(), b.read_graph()
    for name in ARRAY_FIELDS:
        np.testing.assert_array_equal(getattr(graph_a, name), getattr(graph_b, name), err_msg=name)
    assert graph_a.target_names == graph_b.target_names and graph_a.prompt == graph_b.prompt
    documents = [a.read_document(), b.read_document()]
    for document in documents:
        document["metadata"].pop("info")
    assert documents[0] == documents[1]


def test_the_graphs_are_those_of_single_attribute_calls(setup, batch, tmp_path, capsys):
    single = tmp_path / "single"
    targets = [[], ["--target", "a", "--logit-diff", "e", "o"], []]
    with one_thread():
        for entry, name, extra in zip(PROMPTS, NAMES, targets, strict=True):
            argv = ["attribute", "--model", str(setup / "model"), "--transcoders", str(setup / "transcoders")]
            argv += ["--device", "cpu", "--prompt", entry["prompt"], "--out", str(single / name), *extra]
            assert main(argv) == 0
    for name in NAMES:
        assert_same_graph(batch / name, single / name)
    assert Graph.load(batch / "dog" / "graph.safetensors").target_names == ["a", "e − o"]
    summary = json.loads((batch / "summary.json").read_text())
    assert [row["name"] for row in summary["prompts"]] == NAMES
    assert summary["settings"]["pruning"]["node_threshold"] == 0.8
    for row, name in zip(summary["prompts"], NAMES, strict=True):
        document = GraphFolder(single / name).read_document()
        assert row["replacement"]["full"] == document["metadata"]["scores"]["full"]["replacement"]
        assert len(row["top_features"]) == 3
        top = row["top_features"][0]
        assert top["node_id"] == f"{top['layer']}_{top['feature']}_{top['position']}"
        shares = [feature["cumulative_influence"] for feature in row["top_features"]]
        assert shares == sorted(shares)
    table = (batch / "summary.md").read_text()
    assert table.count("\n") == 2 + len(NAMES) and "Birds sang \\| loud songs" in table


def test_finished_folders_are_skipped_and_a_stopped_batch_resumes(setup, tmp_path, monkeypatch):
    model = load_model(setup / "model", device="cpu")
    transcoders = load_transcoders(setup / "transcoders")
    prompts = setup / "prompts.jsonl"
    out = tmp_path / "out"
    computed: list[str] = []
    stop = threading.Event()
    original = batch_module.compute_graph

    def counted(model, transcoders, prompt, *args, **kwargs):
        computed.append(prompt)
        return original(model, transcoders, prompt, *args, **kwargs)

    def counted_then_stop(*args, **kwargs):
        result = counted(*args, **kwargs)
        stop.set()  # as Ctrl-C during the first graph: the batch stops before the next one
        return result

    monkeypatch.setattr(batch_module, "compute_graph", counted_then_stop)
    with pytest.raises(Interrupted, match="1 of 3 graphs finished"):
        attribute_batch(model, transcoders, prompts, out, progress=False, stop=stop)
    assert sorted(path.name for path in out.iterdir()) == [NAMES[0]]
    monkeypatch.setattr(batch_module, "compute_graph", counted)
    report = attribute_batch(model, transcoders, prompts, out, progress=False)
    assert report.skipped == [NAMES[0]] and report.computed == NAMES[1:] and len(computed) == 3
    computed.clear()
    mtimes = {name: (out / name / "graph.safetensors").stat().st_mtime_ns for name in NAMES}
    report = attribute_batch(model, transcoders, read_prompts(prompts), out, progress=False)
    assert computed == [] and report.skipped == NAMES
    assert mtimes == {name: (out / name / "graph.safetensors").stat().st_mtime_ns for name in NAMES}
    # a changed prompt or a folder without its graph is computed again; the others are kept
    changed = [BatchPrompt(NAMES[0], "The cat sat under"), *read_prompts(prompts)[1:]]
    GraphFolder(out / "dog").graph_file.unlink()
    report = attribute_batch(model, transcoders, changed, out, progress=False)
    assert computed == ["The cat sat under", "A dog ran past"] and report.skipped == NAMES[2:]
    assert GraphFolder(out / NAMES[0]).read_document()["metadata"]["prompt"] == "The cat sat under"
    # so is every graph when a setting changes
    computed.clear()
    report = attribute_batch(model, transcoders, changed, out, pruning=PruneConfig(node_threshold=0.5))
    assert len(computed) == 3 and report.rows[0]["nodes"]["pruned"] < report.rows[0]["nodes"]["full"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "no such prompts file"),
        (['{"prompt": "The cat"}', '{"prompt": "x",}'], "prompts.jsonl, line 2: not valid JSON"),
        (['{"prompt": "The cat"}', "", '{"prompt": "  "}'], "prompts.jsonl, line 3: the prompt is empty"),
        (['{"prompt": "The cat", "target": ["a"]}'], "line 1: unknown key 'target'"),
        (['{"prompt": "The cat"}', "[1, 2]"], "line 2: expected a JSON object"),
        (['{"id": "x"}'], 'line 1: no "prompt"'),
        (['{"prompt": "The cat", "targets": [["a"]]}'], "line 1: a target is a token"),
        (['{"prompt": "The cat", "id": "../x"}'], "line 1: '../x' is not a plain folder name"),
        (
            ['{"prompt": "The cat", "id": "x"}', '{"prompt": "A dog", "id": "x"}'],
            "line 2: the folder name 'x'",
        ),
        (["", " "], "no prompts"),
        (['{"prompt": "The cat"}', '{"prompt": "A dog", "targets": ["ab"]}'], "line 2: target 'ab' is not a"),
        (['{"prompt": "x"}'], "line 1: the prompt needs at least two tokens"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(setup, tmp_path, capsys, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    if lines is not None:
        prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(batch_args(setup, prompts, out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("circuitmap: error:") and message in errors[0], errors
    assert not out.exists()


def test_two_processes_compute_the_graphs_of_one(setup, batch, tmp_path):
    out = tmp_path / "two-processes"
    finished = torchrun(batch_args(setup, setup / "prompts.jsonl", out))
    printed = finished.stdout.decode()
    assert printed.count("| dog |") == 1 and "this process's share" in printed
    for name in NAMES:
        assert_same_graph(batch / name, out / name)
    assert json.loads((out / "summary.json").read_text()) == json.loads((batch / "summary.json").read_text())
    assert (out / "summary.md").read_text() == (batch / "summary.md").read_text()

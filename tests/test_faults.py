"""Crash safety: every command that writes files is killed (no clean-up runs) or runs out of disk space at the
calls that make its files appear, and afterwards the previous state is intact or the new one complete,
readers never find old and new mixed, and the same command succeeds when it is run again.

The faults are injected in a child process (``helpers.faults``): the process ends at the n-th call of
``os.replace``, ``os.rename``, the atomic folder exchange, ``shutil.rmtree`` or ``os.fsync``, exactly
where a SIGKILL or a power cut could land between two of them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.faults import KILLED, run
from helpers.models import char_tokenizer, tiny_hf_model
from helpers.transcoders import random_transcoders

from circuitmap import FeatureStore, GraphFolder, load_transcoders
from circuitmap.errors import CircuitmapError

PROMPTS = ("The cat sat", "A dog ran")
CORPUS = "\n\n".join(f"The cat number {i} sat on the mat and said hello {i * 7}." for i in range(200))


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    tiny_hf_model("llama").save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    random_transcoders("plt-topk-skip", 3, 32).save(folder / "transcoders")
    (folder / "corpus.txt").write_text(CORPUS)
    return {"model": folder / "model", "transcoders": folder / "transcoders", "corpus": folder / "corpus.txt"}


def _attribute(parts, prompt: str, out: Path) -> list[str]:
    return [
        "attribute",
        "--model",
        str(parts["model"]),
        "--transcoders",
        str(parts["transcoders"]),
        "--prompt",
        prompt,
        "--out",
        str(out),
    ]


def _hidden(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def _one_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("circuitmap: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return errors[0]


def test_a_graph_folder_is_old_or_new_whenever_attribute_is_killed(parts, tmp_path):
    out = tmp_path / "graphs" / "paris"
    assert run(_attribute(parts, PROMPTS[0], out), tmp_path).code == 0
    current = PROMPTS[0]
    calls = run(_attribute(parts, PROMPTS[1], out), tmp_path).calls
    current = PROMPTS[1]
    points = [n for n, name in enumerate(calls, start=1) if name != "fsync"] + [len(calls)]
    assert "_exchange" in calls and len(points) >= 4
    for point in points:
        wanted = PROMPTS[0] if current == PROMPTS[1] else PROMPTS[1]
        killed = run(_attribute(parts, wanted, out), tmp_path, kind="kill", at=point)
        assert killed.code == KILLED, killed.stderr[-2000:]
        graph = GraphFolder(out).read_graph()
        assert graph.prompt in PROMPTS, "the folder holds a whole graph, its document with it"
        assert GraphFolder(out).read_document()["metadata"]["prompt"] == graph.prompt
        current = graph.prompt
    again = run(_attribute(parts, PROMPTS[0], out), tmp_path)
    assert again.code == 0, again.stderr[-2000:]
    assert GraphFolder(out).read_graph().prompt == PROMPTS[0]
    assert _hidden(out.parent) == [], "the next write removes what killed runs left behind"


def test_a_full_disk_leaves_the_graph_folder_as_it_was(parts, tmp_path):
    out = tmp_path / "paris"
    assert run(_attribute(parts, PROMPTS[0], out), tmp_path).code == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    for point in (1, 2):
        full = run(_attribute(parts, PROMPTS[1], out), tmp_path, kind="full", at=point)
        assert full.code == 2 and "no space left on device" in _one_line(full.stderr)
        assert {path.name: path.read_bytes() for path in out.iterdir()} == before
        assert _hidden(tmp_path) == []
    assert run(_attribute(parts, PROMPTS[1], out), tmp_path).code == 0
    assert GraphFolder(out).read_graph().prompt == PROMPTS[1]


def test_a_mixed_folder_is_refused(parts, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run(_attribute(parts, PROMPTS[0], first), tmp_path).code == 0
    assert run(_attribute(parts, PROMPTS[1], second), tmp_path).code == 0
    shutil.copy(second / "graph.json", first / "graph.json")
    with pytest.raises(CircuitmapError, match="come from different graphs"):
        GraphFolder(first).read_graph()


def _train(parts, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(parts["model"]),
        "--corpus",
        str(parts["corpus"]),
        "--out",
        str(out),
        "--d-features",
        "16",
        "-k",
        "4",
        "--tokens",
        "640",
        "--batch-size",
        "64",
        "--context-length",
        "16",
        "--chunk-contexts",
        "16",
        "--eval-tokens",
        "0",
        "--checkpoint-every",
        "0",
        "--quiet",
        *extra,
    ]


def test_a_training_run_killed_anywhere_completes_with_resume(parts, tmp_path):
    calls = run(_train(parts, tmp_path / "observed"), tmp_path).calls
    exchange = max(n for n, name in enumerate(calls, start=1) if name == "_exchange")
    first_checkpoint = calls.index("replace") + 1
    points = [first_checkpoint, exchange, exchange + 1]
    for point in points:
        out = tmp_path / f"killed-{point}"
        killed = run(_train(parts, out), tmp_path, kind="kill", at=point)
        assert killed.code == KILLED, killed.stderr[-2000:]
        resumed = run(_train(parts, out, "--resume"), tmp_path)
        assert resumed.code == 0, resumed.stderr[-2000:]
        assert (out / "metrics.json").is_file() and load_transcoders(out).n_layers == 3
        assert _hidden(out) == [] and _hidden(tmp_path) == []


def _build(parts, db: Path) -> list[str]:
    return [
        "features",
        "build",
        "--model",
        str(parts["model"]),
        "--transcoders",
        str(parts["transcoders"]),
        "--corpus",
        str(parts["corpus"]),
        "--db",
        str(db),
        "--tokens",
        "2000",
        "--context-length",
        "32",
        "--batch-size",
        "8",
        "--window",
        "16",
        "--top",
        "8",
    ]


def test_a_feature_database_killed_anywhere_is_consistent_and_the_build_completes(parts, tmp_path):
    calls = run(_build(parts, tmp_path / "observed.sqlite"), tmp_path).calls
    points = [n for n, name in enumerate(calls, start=1) if name in ("replace", "_checkpoint", "_finish")]
    assert len(points) >= 3
    for point in points:
        db = tmp_path / f"killed-{point}.sqlite"
        killed = run(_build(parts, db), tmp_path, kind="kill", at=point)
        assert killed.code == KILLED, killed.stderr[-2000:]
        if db.exists():
            try:
                FeatureStore(db).close()
            except CircuitmapError as error:
                assert "the build is not finished" in str(error)
        again = run(_build(parts, db), tmp_path)
        assert again.code == 0, again.stderr[-2000:]
        with FeatureStore(db) as store:
            assert store.n_layers == 3 and store.get(0, 0).layer == 0


def test_pages_plots_and_reports_are_whole_or_absent(parts, tmp_path):
    graph = tmp_path / "graph"
    assert run(_attribute(parts, PROMPTS[0], graph), tmp_path).code == 0
    page = tmp_path / "page.html"
    page.write_text("old page")
    export = ["export-html", str(graph), "-o", str(page)]
    calls = run(export, tmp_path).calls
    page.write_text("old page")
    for point in [n for n, name in enumerate(calls, start=1) if name in ("fsync", "replace")]:
        run(export, tmp_path, kind="kill", at=point)
        text = page.read_text()
        assert text == "old page" or text.rstrip().endswith("</html>")
    check = ["check", str(graph), "--model", str(parts["model"]), "--transcoders", str(parts["transcoders"])]
    check += ["--top", "2", "--json", str(tmp_path / "check.json")]
    full = run(check, tmp_path, kind="full", at=1)
    assert full.code == 2 and "no space left on device" in _one_line(full.stderr)
    assert not (graph / "check.png").exists() and _hidden(graph) == []
    assert run(check, tmp_path).code == 0
    assert json.loads((tmp_path / "check.json").read_text())["rows"]
    assert (graph / "check.png").read_bytes().startswith(b"\x89PNG")


def test_labels_exports_and_reports_are_whole_or_absent(parts, tmp_path):
    import gzip

    from circuitmap import BuildConfig, build_features, load_model

    db = tmp_path / "features.sqlite"
    config = BuildConfig(tokens=2000, context_length=32, batch_size=8, top=8, samples=10, window=16, before=8)
    build_features(
        load_model(parts["model"]),
        load_transcoders(parts["transcoders"]),
        parts["corpus"],
        db,
        config,
        progress=False,
    )
    label = ["features", "label", str(db), "0", "1", "a new label"]
    killed = run(label, tmp_path, kind="kill", at=1)
    assert killed.code == KILLED
    with FeatureStore(db) as store:
        assert store.label(0, 1) is None or store.label(0, 1).source != "manual"
    assert run(label, tmp_path).code == 0
    with FeatureStore(db) as store:
        assert store.label(0, 1).text == "a new label"

    out = tmp_path / "export"
    export = ["features", "export", str(db), str(out), "--layer", "0", "--layer", "1", "--no-progress"]
    calls = run(export, tmp_path).calls
    shutil.rmtree(out)
    replaces = [n for n, name in enumerate(calls, start=1) if name == "replace"]
    killed = run(export, tmp_path, kind="kill", at=replaces[len(replaces) // 2])
    assert killed.code == KILLED
    for path in out.rglob("*.jsonl.gz"):
        gzip.decompress(path.read_bytes())
    assert run(export, tmp_path).code == 0
    assert len(list(out.rglob("*.jsonl.gz"))) == len(replaces) and _hidden(out) == []

    report = tmp_path / "reports" / "edit.json"
    intervene = ["intervene", "--model", str(parts["model"]), "--transcoders", str(parts["transcoders"])]
    intervene += ["--prompt", PROMPTS[0], "--scale", "0_1_*=0", "--json", str(report)]
    calls = run(intervene, tmp_path).calls
    report.unlink()
    killed = run(intervene, tmp_path, kind="kill", at=calls.index("replace") + 1)
    assert killed.code == KILLED and not report.exists()
    assert run(intervene, tmp_path).code == 0 and json.loads(report.read_text())["edits"]

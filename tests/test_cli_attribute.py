"""``circuitmap attribute``: files written, summary printed, estimates, refusals and bad input."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from helpers.models import char_tokenizer, tiny_hf_model
from helpers.transcoders import random_transcoders

from circuitmap import Graph, load_model
from circuitmap.attribution import attribute
from circuitmap.attribution.estimate import estimate_attribution
from circuitmap.attribution.heads import top_cross_position_edges
from circuitmap.cli import main
from circuitmap.graphs import GraphFolder
from circuitmap.graphs.export import json_schema


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-attribute")
    tiny_hf_model("llama").save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    random_transcoders("plt-topk-skip", 3, 32).save(folder / "transcoders")
    return folder


def _args(setup, *extra: str) -> list[str]:
    return [
        "attribute",
        "--model",
        str(setup / "model"),
        "--transcoders",
        str(setup / "transcoders"),
        "--prompt",
        "The cat sat on",
        *extra,
    ]


def test_writes_graph_and_viewer_json(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(setup, "--out", str(out), "--top", "3")) == 0
    printed = capsys.readouterr().out
    for expected in ("graph:", "pruned (0.8 / 0.98):", "replacement score:", "completeness:", "time:"):
        assert expected in printed
    assert printed.count(" feature ") >= 3
    graph = Graph.load(out / "graph.safetensors")
    assert graph.prompt == "The cat sat on" and graph.n_features > 0
    document = json.loads((out / "graph.json").read_text())
    jsonschema.validate(document, json_schema())
    assert document["metadata"]["prompt"] == "The cat sat on"


def test_explicit_targets(setup, tmp_path):
    out = tmp_path / "out"
    assert main(_args(setup, "--out", str(out), "--target", "a", "--logit-diff", "e", "o")) == 0
    assert Graph.load(out / "graph.safetensors").target_names == ["a", "e − o"]


def test_estimate_prints_and_writes_nothing(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(setup, "--out", str(out), "--estimate")) == 0
    assert "expected peak memory" in capsys.readouterr().out
    assert not out.exists()


def test_estimated_edges_are_exact_without_a_cap(setup):
    model = load_model(setup / "model", dtype="float64")
    transcoders = random_transcoders("plt-topk-skip", 3, 32)
    graph = attribute(model, transcoders, "The cat sat on", progress=False)
    estimate = estimate_attribution(model, transcoders, "The cat sat on", n_targets=len(graph.target_names))
    assert estimate.n_edges == graph.n_edges
    assert estimate.n_rows == graph.n_features + len(graph.target_names)
    assert estimate.seconds is not None and estimate.peak_bytes > 0


def test_refused_when_the_estimate_exceeds_memory_unless_forced(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("circuitmap.attribution.estimate.available_memory", lambda device: 1024)
    assert main(_args(setup, "--out", str(tmp_path / "refused"))) == 2
    error = capsys.readouterr().err
    assert "exceeds the available 0.0 GiB" in error and "--force" in error
    assert not (tmp_path / "refused").exists()
    assert main(_args(setup, "--out", str(tmp_path / "forced"), "--force")) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "ab"], "not a single token"),
        (["--direction", "nameonly"], "NAME=FILE"),
        (["--max-feature-nodes", "-1"], "zero or more"),
    ],
)
def test_bad_input(setup, tmp_path, capsys, extra, message):
    assert main(_args(setup, "--out", str(tmp_path / "out"), "--force", *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("circuitmap: error:") and message in errors[0]


def test_direction_target_from_a_file(setup, tmp_path):
    from safetensors.torch import save_file

    save_file({"direction": torch.randn(32)}, tmp_path / "direction.safetensors")
    out = tmp_path / "out"
    assert (
        main(_args(setup, "--out", str(out), "--direction", f"up={tmp_path / 'direction.safetensors'}")) == 0
    )
    graph = Graph.load(out / "graph.safetensors")
    assert graph.target_names == ["up"] and np.isnan(graph.target_probs[0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--node-threshold", "1.5"], "node_threshold must be in (0, 1]"),
        (["--device", "nonsense"], "unknown device"),
    ],
)
def test_bad_settings_are_rejected_before_any_work(setup, tmp_path, capsys, extra, message):
    assert main(_args(setup, "--out", str(tmp_path / "out"), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder(setup, tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    assert main(_args(setup, "--out", str(existing))) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_head_loadings_are_stored_beside_the_graph(setup, tmp_path, capsys):
    """``--head-loadings N`` splits the N most influential cross-position edges (into a logit difference
    too) over heads, exactly, and stores them in the graph folder."""
    out = tmp_path / "out"
    assert main(_args(setup, "--out", str(out), "--head-loadings", "4", "--logit-diff", "e", "o")) == 0
    printed = capsys.readouterr().out
    assert "head loadings: 4 cross-position edges split over 3 layers of 4 heads" in printed
    assert f"and {out / 'heads.safetensors'}" in printed
    folder = GraphFolder(out)
    graph, loadings = folder.read_graph(), folder.read_head_loadings()
    np.testing.assert_array_equal(loadings.edges, top_cross_position_edges(graph, 4, by="influence"))
    np.testing.assert_allclose(loadings.remainder, 0, atol=1e-5 * np.abs(loadings.weight).max())
    page = tmp_path / "page.html"
    assert main(["export-html", str(out), "-o", str(page)]) == 0
    assert 'id="circuitmap-heads"' in page.read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match="2"):
        main(_args(setup, "--out", str(tmp_path / "bad"), "--head-loadings", "-1"))
    assert "--head-loadings: must be zero or more" in capsys.readouterr().err

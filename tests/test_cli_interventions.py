"""``circuitmap intervene`` and ``circuitmap check`` on a tiny saved model: outputs, files and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import char_tokenizer, tiny_hf_model
from helpers.transcoders import random_transcoders
from safetensors.torch import save_file

from circuitmap import FeatureEdit, ResidualEdit, load_model, load_transcoders
from circuitmap.cli import main
from circuitmap.graphs import Graph, NodeKind
from circuitmap.interventions import intervene

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-interventions")
    tiny_hf_model("llama").save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    random_transcoders("plt-topk-skip", 3, 32).save(folder / "transcoders")
    code = main(
        ["attribute", "--model", str(folder / "model"), "--transcoders", str(folder / "transcoders")]
        + ["--prompt", PROMPT, "--out", str(folder / "graph"), "--force"]
    )
    assert code == 0
    document = json.loads((folder / "graph" / "graph.json").read_text())
    graph = Graph.load(folder / "graph" / "graph.safetensors")
    members = [graph.node_id(int(n)) for n in graph.nodes_of(NodeKind.FEATURE)[:2]]
    error = graph.node_id(int(graph.nodes_of(NodeKind.ERROR)[0]))
    document["qParams"]["supernodes"] = [["pair", *members, error], ["errors only", error]]
    (folder / "graph" / "graph.json").write_text(json.dumps(document))
    return folder, graph, members


def _common(folder) -> list[str]:
    return ["--model", str(folder / "model"), "--transcoders", str(folder / "transcoders")]


def test_intervene_with_a_graphs_supernode_prints_and_writes_what_the_api_gives(setup, tmp_path, capsys):
    folder, graph, members = setup
    out = tmp_path / "result.json"
    code = main(
        ["intervene", *_common(folder), "--graph", str(folder / "graph"), "--scale", "pair=-2"]
        + ["--generate", "6", "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    model, transcoders = load_model(folder / "model"), load_transcoders(folder / "transcoders")
    expected = intervene(model, transcoders, PROMPT, [FeatureEdit.scale(m, -2.0) for m in members])
    document = json.loads(out.read_text())
    assert document["top_after"] == [[t, pytest.approx(p)] for t, p in expected.top_after]
    assert document["continuation_before"] == model.generate(PROMPT, 6)
    assert "edited:" in printed and "top before" in printed


def test_intervene_with_every_position_and_a_vector(setup, tmp_path, capsys):
    folder, graph, _ = setup
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"direction": vector}, tmp_path / "vector.safetensors")
    code = main(
        [
            "intervene",
            *_common(folder),
            "--prompt",
            PROMPT,
            "--set",
            "1_5_*=2.5",
            "--json",
            str(tmp_path / "r"),
        ]
        + ["--vector", str(tmp_path / "vector.safetensors"), "--vector-layer", "1", "--vector-scale", "3"]
        + ["--vector-positions", "2,3", "--no-freeze-attention", "--target", "a"]
    )
    assert code == 0
    model, transcoders = load_model(folder / "model"), load_transcoders(folder / "transcoders")
    edits = [FeatureEdit.set((1, None, 5), 2.5), ResidualEdit(1, vector.double() * 3, positions=(2, 3))]
    expected = intervene(model, transcoders, PROMPT, edits, freeze_attention=False, targets=["a"])
    document = json.loads((tmp_path / "r").read_text())
    assert document["targets"][0]["logit_after"] == pytest.approx(expected.targets[0].logit_after, abs=1e-5)


def test_check_writes_a_table_and_a_plot(setup, tmp_path, capsys):
    folder, graph, members = setup
    target = str(int(graph.index[graph.nodes_of(NodeKind.TARGET)[1]]))
    code = main(
        ["check", str(folder / "graph"), *_common(folder), "--top", "3", "--plot", str(tmp_path / "c.png")]
        + ["--json", str(tmp_path / "c.json"), "--target", target]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "sign agreement" in captured.out and "pair" in captured.out
    assert "supernode 'pair': 1 members that are not feature nodes of the graph are left out" in captured.err
    report = json.loads((tmp_path / "c.json").read_text())
    assert [row["kind"] for row in report["rows"]] == ["feature"] * 3 + ["supernode"]
    assert report["rows"][-1]["members"] == members
    assert report["target"] == graph.target_names[1]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scale", "nothing=2"], "'nothing' is neither a feature"),
        (["--scale", "1_5_3=abc"], "'abc' is not a number"),
        (["--scale", "1_5_3=nan"], "'nan' is not a finite number"),
        (["--ablate", "1_5_99"], "position 99 is beyond"),
        (["--ablate", "1_999_3"], "index 999 is out of range"),
        (["--vector", "missing.safetensors"], "--vector needs --vector-layer"),
        (["--vector", "missing.safetensors", "--vector-layer", "1"], "vector file not found"),
        ([], "no edits"),
    ],
)
def test_intervene_bad_input_is_one_line(setup, capsys, extra, message):
    folder, _, _ = setup
    code = main(["intervene", *_common(folder), "--prompt", PROMPT, *extra])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in error[-1] and error[-1].startswith("circuitmap: error:")


def test_check_refuses_a_missing_graph(setup, tmp_path, capsys):
    folder, _, _ = setup
    assert main(["check", str(tmp_path / "none"), *_common(folder)]) == 2
    assert "no graph at" in capsys.readouterr().err

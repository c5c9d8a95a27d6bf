"""``check_graph``: the graph's linear prediction against a hand-built linear model; the report, its plot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError, FeatureEdit, Supernode, check_graph, intervene
from circuitmap.attribution import attribute
from circuitmap.graphs import NodeKind
from circuitmap.graphs.ids import index_by_id
from circuitmap.interventions.check import CheckReport, CheckRow, GraphEffects

PROMPT = "The cat sat on"


def linear_replacement_change(model, transcoders, graph, pinned: dict[int, float]) -> np.ndarray:
    """Row changes in the frozen replacement model where every active feature's activation moves with its
    pre-activation (slope 1), the ``pinned`` nodes move by the given amounts, and errors stay fixed."""
    ids = model.encode(PROMPT)
    n = model.n_layers
    fixed = {
        (int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])): delta
        for node, delta in pinned.items()
    }
    with model.freeze(ids):
        _, cache = model.run_with_cache(ids, points=["mlp_in", "mlp_out"])
        clean_in = [cache["mlp_in", layer][0] for layer in range(n)]
        clean_out = [cache["mlp_out", layer][0] for layer in range(n)]
        clean_pre = [transcoders.pre_activations(layer, clean_in[layer]) for layer in range(n)]
        active = [transcoders.encode(layer, clean_in[layer]) != 0 for layer in range(n)]
        clean_logits = model.logits(ids)[0, -1]
        inputs, changes = {}, {}

        def keep(layer):
            def hook(x):
                inputs[layer] = x[0]

            return hook

        def replace(layer):
            def hook(out):
                x = inputs[layer]
                delta = (transcoders.pre_activations(layer, x) - clean_pre[layer]) * active[layer]
                delta[0] = 0
                for (source, position, index), value in fixed.items():
                    if source == layer:
                        delta[position, index] = value
                changes[layer] = delta
                new = clean_out[layer] + transcoders.skip(layer, x) - transcoders.skip(layer, clean_in[layer])
                for source in range(layer + 1) if transcoders.kind == "clt" else [layer]:
                    new = new + changes[source] @ transcoders.decoder_vectors(source, slice(None), layer)
                return new.unsqueeze(0)

            return hook

        hooks = [("mlp_in", layer, keep(layer)) for layer in range(n)]
        hooks += [("mlp_out", layer, replace(layer)) for layer in range(n)]
        with model.hooks(*hooks):
            logits = model.logits(ids)[0, -1]
    row_change = np.zeros(graph.n_nodes)
    for node in graph.nodes_of(NodeKind.FEATURE):
        layer, position, index = int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])
        row_change[node] = float(transcoders.pre_activations(layer, inputs[layer])[position, index])
        row_change[node] -= float(clean_pre[layer][position, index])
    difference = (logits - clean_logits).double()
    for node in graph.nodes_of(NodeKind.TARGET):
        row_change[node] = float(difference[int(graph.index[node])] - difference.mean())
    return row_change


@pytest.mark.parametrize("kind", ["plt-jumprelu", "clt-jumprelu-skip", "plt-topk-skip"])
def test_graph_effects_equal_the_linearised_replacement_model(kind):
    model = tiny_model("llama", dtype=torch.float64)
    transcoders = random_transcoders(kind, model.n_layers, model.d_model).to(dtype=torch.float64)
    graph = attribute(model, transcoders, PROMPT, progress=False)
    features = graph.nodes_of(NodeKind.FEATURE)
    layer_zero = [int(n) for n in features if graph.layer[n] == 0][:3]
    pinned = {node: -float(graph.activation[node]) for node in layer_zero}
    predicted = GraphEffects(graph)(list(pinned), list(pinned.values()))
    observed = linear_replacement_change(model, transcoders, graph, pinned)
    rows = np.concatenate([features, graph.nodes_of(NodeKind.TARGET)])
    unpinned = np.setdiff1d(rows, layer_zero)
    assert np.abs(predicted[unpinned]).max() > 1e-3
    # graphs store activations in float32, which the prediction divides edges by: hence rtol 1e-6
    np.testing.assert_allclose(observed[unpinned], predicted[unpinned], rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    model = tiny_model("llama", dtype=torch.float64)
    transcoders = random_transcoders("clt-jumprelu-skip", model.n_layers, model.d_model).to(
        dtype=torch.float64
    )
    graph = attribute(model, transcoders, PROMPT, progress=False)
    members = [graph.node_id(int(n)) for n in graph.nodes_of(NodeKind.FEATURE)[:3]]
    report = check_graph(
        model, transcoders, graph, n_features=5, supernodes=[Supernode("first three", members)]
    )
    return model, transcoders, graph, report


def test_check_ablates_the_most_influential_features_and_supernodes(checked):
    model, transcoders, graph, report = checked
    assert [row.kind for row in report.rows] == ["feature"] * 5 + ["supernode"]
    influences = [row.influence for row in report.rows[:5]]
    assert influences == sorted(influences, reverse=True)
    assert report.rows[-1].members == [graph.node_id(int(n)) for n in graph.nodes_of(NodeKind.FEATURE)[:3]]
    assert (
        report.target
        == graph.target_names[int(np.argmax(graph.target_weight[graph.nodes_of(NodeKind.TARGET)]))]
    )
    assert 0 <= report.sign_agreement <= 1
    assert -1 <= report.rank_correlation <= 1
    assert "sign agreement" in report.table()
    assert report.as_json()["rows"][0]["name"] == report.rows[0].name


def test_check_observes_the_open_loop_ablation(checked):
    model, transcoders, graph, report = checked
    row = report.rows[0]
    result = intervene(model, transcoders, PROMPT, FeatureEdit.ablate(row.name))
    change = (result.logits_after - result.logits_before).double()
    token = model.tokenizer.convert_tokens_to_ids(report.target)
    assert row.observed == pytest.approx(float(change[token] - change.mean()), abs=1e-12)


def test_plot_is_a_png(checked, tmp_path):
    path = checked[3].save_plot(tmp_path / "plots" / "check.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_agreement_statistics():
    def report(pairs):
        rows = [CheckRow(str(i), "feature", [], 0.0, p, 0.0, o) for i, (p, o) in enumerate(pairs)]
        return CheckReport("p", "t", rows)

    assert report([(1, 2), (-1, -3), (2, 5), (3, -1)]).sign_agreement == 0.75
    assert report([(1, 10), (2, 20), (3, 30)]).rank_correlation == pytest.approx(1.0)
    assert report([(1, 3), (2, 2), (3, 1)]).rank_correlation == pytest.approx(-1.0)
    assert report([(1, 1), (2, 1), (3, 2), (4, 3)]).rank_correlation == pytest.approx(0.9486832980505138)
    assert np.isnan(report([(1, 1), (2, 2)]).rank_correlation)


def test_check_refuses_bad_input(checked):
    model, transcoders, graph, _ = checked
    with pytest.raises(CircuitmapError, match="is not one of the graph's logit targets"):
        check_graph(model, transcoders, graph, target="nonexistent")
    with pytest.raises(CircuitmapError, match="supernode 'empty' is empty"):
        check_graph(model, transcoders, graph, n_features=0, supernodes=[Supernode("empty", [])])
    error_node = graph.node_id(int(graph.nodes_of(NodeKind.ERROR)[0]))
    with pytest.raises(CircuitmapError, match=f"{error_node!r} is not a feature node"):
        check_graph(model, transcoders, graph, n_features=0, supernodes=[Supernode("bad", [error_node])])
    with pytest.raises(CircuitmapError, match="n_features must be zero or more"):
        check_graph(model, transcoders, graph, n_features=-1)


def test_rows_hold_the_graphs_direct_and_total_predictions(checked):
    model, transcoders, graph, report = checked
    row = report.rows[0]
    node = index_by_id(graph)[row.name]
    target = int(np.flatnonzero(np.array(graph.target_names) == report.target)[0]) + int(
        graph.nodes_of(NodeKind.TARGET)[0]
    )
    assert row.predicted == pytest.approx(
        GraphEffects(graph)([node], [-float(graph.activation[node])])[target]
    )
    # constrained: nothing downstream responds, so an ablation moves the target by its direct edge only
    result = intervene(model, transcoders, PROMPT, FeatureEdit.ablate(row.name), mode="constrained")
    change = model.unembedding.detach().double() @ (result.readout_after - result.readout_before)
    token = int(graph.index[target])
    assert row.direct == pytest.approx(float(change[token] - change.mean()), rel=1e-6, abs=1e-9)


def test_observed_effects_are_read_before_soft_capping():
    model = tiny_model("gemma2", dtype=torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model).to(dtype=torch.float64)
    graph = attribute(model, transcoders, PROMPT, progress=False)
    report = check_graph(model, transcoders, graph, n_features=2)
    cap = model.logit_softcap
    token = int(graph.index[graph.nodes_of(NodeKind.TARGET)[0]])
    for row in report.rows:
        result = intervene(model, transcoders, PROMPT, FeatureEdit.ablate(row.name))
        raw = cap * torch.atanh(result.logits_after / cap) - cap * torch.atanh(result.logits_before / cap)
        assert row.observed == pytest.approx(float(raw[token] - raw.mean()), abs=1e-9)


def test_a_graph_of_other_transcoders_is_refused(checked):
    model, _, graph, _ = checked
    other = random_transcoders("clt-jumprelu-skip", model.n_layers, model.d_model, seed=7).to(
        dtype=torch.float64
    )
    with pytest.raises(CircuitmapError, match="the graph was made with another transcoder set"):
        check_graph(model, other, graph, n_features=3)
    legacy = dataclasses.replace(
        graph, info={key: v for key, v in graph.info.items() if key != "transcoders_fingerprint"}
    )
    with pytest.raises(CircuitmapError, match="computed with another model or transcoder set"):
        check_graph(model, other, legacy, n_features=3)

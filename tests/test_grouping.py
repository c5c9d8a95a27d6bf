"""Automatic supernodes: effects against the check's linear model, the grouping's rules, names, the saved
document, refusals, and a grouping tested on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.graphs import random_graph
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError, Supernode, check_graph, group_features
from circuitmap.attribution import AttributionConfig, attribute
from circuitmap.graphs import NodeKind, PruneResult, graph_json, prune
from circuitmap.graphs import graph as graph_module
from circuitmap.graphs.grouping import _effects_node_by_node, feature_effects, group_name, with_groups
from circuitmap.graphs.ids import node_ids
from circuitmap.interventions.check import GraphEffects


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effects_are_the_checks_predicted_ablations(seed):
    graph = random_graph(seed, n_layers=4, n_positions=5)
    targets = graph.nodes_of(NodeKind.TARGET)
    target = int(targets[np.argmax(graph.target_weight[targets])])
    effects = feature_effects(graph)
    predict = GraphEffects(graph)
    for node in graph.nodes_of(NodeKind.FEATURE).tolist():
        ablated = predict([node], [-float(graph.activation[node])])[target]
        assert effects[node] == pytest.approx(-ablated, rel=1e-9, abs=1e-12)
    assert not effects[graph.kind != NodeKind.FEATURE].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effects_read_in_small_blocks_equal_the_node_by_node_pass(seed, monkeypatch):
    graph = random_graph(seed, n_layers=4, n_positions=5)
    targets = graph.nodes_of(NodeKind.TARGET)
    target = int(targets[np.argmin(graph.target_weight[targets])])
    monkeypatch.setattr(graph_module, "EDGE_BLOCK", 3)
    assert len(graph.row_blocks()) > graph.n_layers
    np.testing.assert_allclose(
        feature_effects(graph, target), _effects_node_by_node(graph, target), rtol=1e-12, atol=1e-15
    )


def test_groups_hold_one_position_one_sign_and_the_kept_features_once():
    graph = random_graph(3, n_layers=5, n_positions=6)
    kept = prune(graph, node_threshold=0.95)
    grouping = group_features(graph, kept, max_groups=100)
    ids = node_ids(graph)
    by_id = {identifier: node for node, identifier in enumerate(ids)}
    effects = feature_effects(graph)
    members = [by_id[m] for group in grouping.groups for m in group.members]
    kept_features = np.flatnonzero(kept.node_mask & (graph.kind == NodeKind.FEATURE))
    assert sorted(members) == sorted(kept_features.tolist()) and grouping.n_features == len(kept_features)
    assert grouping.coverage == pytest.approx(1.0)
    for group in grouping.groups:
        nodes = [by_id[m] for m in group.members]
        assert {int(graph.position[n]) for n in nodes} == {group.position}
        assert all(np.sign(effects[n]) in (group.sign, 0) for n in nodes)
        assert group.influence == pytest.approx(float(kept.influence[nodes].sum()))
        assert list(kept.influence[nodes]) == sorted(kept.influence[nodes], reverse=True)
        assert group.layers == (int(graph.layer[nodes].min()), int(graph.layer[nodes].max()))
    influences = [group.influence for group in grouping.groups]
    assert influences == sorted(influences, reverse=True)


def test_a_tighter_cut_and_fewer_groups_cover_less():
    graph = random_graph(4, n_layers=5, n_positions=6)
    kept = prune(graph, node_threshold=0.95)
    loose = group_features(graph, kept, max_groups=100, cut=2.0)
    tight = group_features(graph, kept, max_groups=100, cut=0.0)
    assert len(tight.groups) >= len(loose.groups)
    few = group_features(graph, kept, max_groups=2)
    assert len(few.groups) == 2 and few.coverage < 1.0
    assert [g.members for g in few.groups] == [g.members for g in group_features(graph, kept).groups[:2]]


def test_names_come_from_the_heaviest_labels():
    weights = np.array([0.5, 0.3, 0.2])
    assert group_name(["Paris", "Paris", "France"], weights) == "Paris"
    assert group_name(["Paris", "France", "Berlin"], np.array([0.4, 0.35, 0.25])) == "Paris / France"
    assert group_name(["", "  ", ""], weights) == ""
    graph = random_graph(5, n_layers=4, n_positions=5)
    grouping = group_features(graph, prune(graph), labels={}, max_groups=100)
    for group in grouping.groups:
        token = graph.token_strings[group.position]
        assert group.name.startswith("L") and f"“{token}”" in group.name


def test_groups_are_saved_as_supernodes_with_their_members_pinned():
    graph = random_graph(6, n_layers=4, n_positions=5)
    kept = prune(graph)
    document = graph_json(graph, kept=kept, pinned=[node_ids(graph)[-1]])
    grouping = group_features(graph, kept)
    with_groups(document, grouping)
    assert document["qParams"]["supernodes"] == [group.as_supernode() for group in grouping.groups]
    members = [m for group in grouping.groups for m in group.members]
    assert document["qParams"]["pinnedIds"] == [node_ids(graph)[-1], *members]
    document["nodes"] = [node for node in document["nodes"] if node["node_id"] != members[0]]
    with pytest.raises(CircuitmapError, match="is not a node of the document"):
        with_groups(document, grouping)


def test_bad_settings_are_refused():
    graph = random_graph(0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CircuitmapError, match="max_groups"):
            group_features(graph, max_groups=bad)
    with pytest.raises(CircuitmapError, match="cut"):
        group_features(graph, cut=float("nan"))
    other = random_graph(1, n_layers=5)
    mask = np.ones(other.n_nodes, dtype=bool)
    with pytest.raises(CircuitmapError, match="not of this graph"):
        group_features(graph, PruneResult(mask, np.ones(other.n_edges, bool), np.ones(other.n_nodes)))


def test_a_grouping_of_a_real_graph_can_be_checked_on_the_model():
    model = tiny_model("llama", dtype=torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, 32).to(dtype=torch.float64)
    graph = attribute(
        model, transcoders, "The cat sat on", AttributionConfig(max_feature_nodes=60), progress=False
    )
    grouping = group_features(graph)
    assert grouping.groups
    report = check_graph(
        model,
        transcoders,
        graph,
        n_features=0,
        supernodes=[Supernode(g.name, g.members) for g in grouping.groups],
    )
    assert len(report.rows) == len(grouping.groups)
    assert [row.members for row in report.rows] == [group.members for group in grouping.groups]

"""Node ids: every id a graph gives reads back as the node it names, and malformed ids are refused."""

from __future__ import annotations

import pytest
from helpers.graphs import random_graph

from circuitmap.errors import CircuitmapError
from circuitmap.graphs import NodeKind
from circuitmap.graphs.ids import (
    feature_id,
    index_by_id,
    is_feature_id,
    node_ids,
    parse_feature_id,
    parse_node_id,
)


@pytest.mark.parametrize("seed", range(3))
def test_every_node_id_parses_back_to_its_node(seed):
    graph = random_graph(seed)
    ids = node_ids(graph)
    assert len(set(ids)) == graph.n_nodes
    targets = graph.nodes_of(NodeKind.TARGET)
    for node, identifier in enumerate(ids):
        ref = parse_node_id(identifier, graph.n_layers)
        kind = NodeKind(int(graph.kind[node]))
        assert ref.kind == kind and ref.position == graph.position[node], identifier
        if kind in (NodeKind.FEATURE, NodeKind.ERROR):
            assert ref.layer == graph.layer[node]
        if kind in (NodeKind.FEATURE, NodeKind.TOKEN):
            assert ref.index == graph.index[node]
        if kind == NodeKind.TARGET:
            logit = graph.index[node] >= 0
            assert ref.index == (graph.index[node] if logit else node - targets[0])
            assert ref.layer == (graph.n_layers + 1 if logit else None)
    assert index_by_id(graph) == {identifier: node for node, identifier in enumerate(ids)}


def test_feature_ids_with_every_position():
    assert feature_id(3, 17, 4) == "3_17_4" and feature_id(3, 17, None) == "3_17_*"
    assert parse_feature_id("3_17_4") == (3, 17, 4)
    assert parse_feature_id(" 3_17_* ") == (3, 17, None)
    assert is_feature_id("3_17_*") and not is_feature_id("err_3_4") and not is_feature_id(7)
    ref = parse_node_id("31_200_5", n_layers=30)
    assert (ref.kind, ref.layer, ref.index, ref.position) == (NodeKind.TARGET, 31, 200, 5)
    assert parse_node_id("31_200_5").kind == NodeKind.FEATURE, "without n_layers a numeric id is a feature"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bad", "not a node id"),
        ("x_1_2", "not a node id"),
        ("1_2_3_4", "not a node id"),
        ("err_1", "not a node id"),
        ("", "not a node id"),
        ("E_1_*", "not a node id"),
        ("31_200_*", "only a feature id"),
    ],
)
def test_malformed_ids_are_refused(text, message):
    with pytest.raises(CircuitmapError, match=message):
        parse_node_id(text, n_layers=30)


def test_only_features_are_feature_ids():
    for text in ("err_1_2", "E_5_0", "T_0_3"):
        with pytest.raises(CircuitmapError, match="not a feature node id"):
            parse_feature_id(text)

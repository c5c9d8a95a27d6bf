"""Case-study building blocks: groups ranked by influence, transplanted edits with the donor's activations at
the right positions, logit-lens filters, probabilities and the graph drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError
from circuitmap.features.logit_lens import logit_lens
from circuitmap.graphs import NodeKind, prune
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.interventions import FeatureEdit, Supernode, intervene
from circuitmap.studies import Study, draw_graph, swap

PROMPT = "The cat sat on"
DONOR = "A dog ran to the"


@pytest.fixture(scope="module")
def study():
    model = tiny_model("llama", dtype=torch.float64)
    transcoders = random_transcoders("plt-topk", model.n_layers, model.d_model).to(dtype=torch.float64)
    return Study(model, transcoders, None, max_feature_nodes=64)


@pytest.fixture(scope="module")
def explained(study):
    return study.explain(PROMPT)


def test_top_features_are_the_most_influential_of_their_position(explained):
    graph = explained.graph
    chosen = explained.top_features(2, count=5)
    assert chosen and all(parse_feature_id(node)[2] == 2 for node in chosen)
    nodes = graph.nodes_of(NodeKind.FEATURE)
    here = nodes[graph.position[nodes] == 2]
    index_of = {graph.node_id(int(n)): int(n) for n in here}
    weakest_chosen = min(explained.influence[index_of[node]] for node in chosen)
    rest = [n for n in here if graph.node_id(int(n)) not in chosen]
    assert all(explained.influence[n] <= weakest_chosen for n in rest)
    assert explained.top_features(-1) == explained.top_features(len(graph.tokens) - 1)
    assert explained.influence_by_position().sum() == pytest.approx(
        explained.influence[np.isin(graph.kind, [NodeKind.FEATURE, NodeKind.ERROR])].sum()
    )
    assert explained.ranked_features(3) == explained.ranked_features(10)[:3]


def test_transplant_adds_the_donors_activations_where_asked(study):
    donor = study.explain(DONOR)
    position = 1
    acts = study.activations(DONOR, position)
    edits = study.transplant(donor, position, 2.0, at=3)
    assert len(edits) == len(donor.top_features(position))
    for edit, node in zip(edits, donor.top_features(position), strict=True):
        layer, index, _ = parse_feature_id(node)
        assert edit == FeatureEdit.add((layer, 3, index), 2.0 * acts[(layer, index)])
    n_donor = len(study.model.encode(DONOR)[0])
    relative = study.transplant_features(DONOR, donor.top_features(position)[:2], 1.0)
    assert all(edit.target[1] == position - n_donor for edit in relative)
    with pytest.raises(CircuitmapError, match="no position"):
        study.transplant_features(DONOR, ["0_1_*"], 1.0)


def test_swap_scales_the_group_by_minus_one_then_adds(study, explained):
    group = Supernode("g", explained.top_features(1, count=3))
    added = [FeatureEdit.add((0, 1, 0), 1.0)]
    edits = swap(group, added)
    assert edits[0] == FeatureEdit.scale(group, -1.0) and edits[1:] == added
    result = intervene(study.model, study.transcoders, PROMPT, edits, top_k=1)
    assert torch.isfinite(result.logits_after).all()


def test_probabilities_and_the_lens_filter(study):
    result = intervene(study.model, study.transcoders, PROMPT, [], top_k=1)
    tokens = ["a", "b"]
    probs = result.logits_before.double().softmax(-1)
    expected = sum(float(probs[study.token_id(token)]) for token in tokens)
    assert study.mass(result, tokens, after=False) == pytest.approx(expected)
    assert study.probability(result, "a", after=False) == pytest.approx(float(probs[study.token_id("a")]))
    with pytest.raises(CircuitmapError, match="not one"):
        study.token_id("ab")
    nodes = ["0_1_2", "1_5_0", "2_7_1"]
    lenses = logit_lens(study.model, study.transcoders, [parse_feature_id(n)[:2] for n in nodes], k=3)
    wanted = {lenses[1].top[0][0]}
    chosen = study.promotes(nodes, wanted, k=3)
    assert "1_5_0" in chosen
    assert all(
        wanted & {token for token, _ in lens.top}
        for n, lens in zip(nodes, lenses, strict=True)
        if n in chosen
    )


def test_draw_graph_writes_a_figure(explained, tmp_path):
    path = tmp_path / "graph.png"
    groups = {"last": explained.top_features(-1, count=3)}
    draw_graph(explained.graph, prune(explained.graph), groups, path, shown=10)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

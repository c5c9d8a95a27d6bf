"""Head loadings split cross-position edges exactly over the heads of their last position-changing step.

Checked on every family, against the frozen replacement model rebuilt with hooks (``helpers.attention``):
the loadings of an edge sum to its weight; and the loading of head ``(L, h)`` is what a brute-force count of
paths gives: the source's effect on the target when cross-position attention is cut (pattern reduced to its
diagonal) at every layer above ``L`` and at every other head of layer ``L``, minus its effect when it is cut
at layer ``L`` and above. The first keeps the paths whose last crossing is at a layer below ``L`` or at head
``h`` of layer ``L``, the second only the former.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from helpers.attention import FrozenReplacement, diagonal_pattern
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from circuitmap import CircuitmapError
from circuitmap.attribution import attribute
from circuitmap.attribution.heads import (
    edge_targets,
    head_loadings,
    n_attention_heads,
    top_cross_position_edges,
)
from circuitmap.graphs import NodeKind
from circuitmap.models.hooks import ATTENTION_IMPLEMENTATION, circuitmap_attention

PROMPT = "The cat sat on"
KIND = "clt-jumprelu-skip"


@cache
def computed(family: str):
    """A float64 tiny model of ``family``, cross-layer skip transcoders (writes to several layers, skip
    paths) and the graph of ``PROMPT``."""
    model = tiny_model(family, torch.float64)
    transcoders = random_transcoders(KIND, model.n_layers, model.d_model)
    return model, transcoders, attribute(model, transcoders, PROMPT, progress=False)


def test_loadings_sum_to_each_edge(family):
    model, transcoders, graph = computed(family)
    edges = top_cross_position_edges(graph, 8)
    targets, sources = edge_targets(graph, edges), graph.indices[edges]
    assert (graph.position[targets] != graph.position[sources]).all()
    assert np.all(np.diff(np.abs(graph.weights[edges])) <= 0)
    loadings = head_loadings(model, transcoders, graph, edges)
    scale = np.abs(loadings.weight).max()
    np.testing.assert_allclose(loadings.remainder, 0, rtol=0, atol=1e-12 * scale)
    source_of = dict(zip(edges.tolist(), sources.tolist(), strict=True))
    assert all(
        layer > graph.layer[source_of[edge]]
        for edge, layer in zip(loadings.edge.tolist(), loadings.layer.tolist(), strict=True)
    )
    split = head_loadings(model, transcoders, graph, edges, split_key_positions=True)
    np.testing.assert_allclose(split.remainder, 0, rtol=0, atol=1e-12 * scale)
    for edge in edges.tolist():
        np.testing.assert_allclose(split.matrix(edge), loadings.matrix(edge), rtol=0, atol=1e-12 * scale)
    entry_source = np.array([source_of[edge] for edge in split.edge.tolist()])
    entry_target = edge_targets(graph, split.edge)
    assert (split.key_position >= graph.position[entry_source]).all()
    assert (split.key_position < graph.position[entry_target]).all()


def _read(reading, model, transcoders, graph, node: int) -> float:
    """The quantity row ``node`` explains: a feature's pre-activation or a target's de-meaned logit."""
    layer, position, index = int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])
    if graph.kind[node] == NodeKind.FEATURE:
        return float(transcoders.pre_activations(layer, reading.mlp_in[layer][position])[index])
    unembedding = model.unembedding.detach()
    return float(reading.final_norm[-1] @ (unembedding[index] - unembedding.mean(0)))


@pytest.mark.parametrize("source_kind", [NodeKind.TOKEN, NodeKind.FEATURE], ids=["token", "feature"])
def test_each_loading_counts_the_paths_whose_last_crossing_is_its_head(family, source_kind):
    """The strongest edge from a token or a feature to a logit: a token's paths can cross at every layer,
    so paths that cross several times are counted too."""
    model, transcoders, graph = computed(family)
    edges = top_cross_position_edges(graph, graph.n_edges)
    into_logit = graph.kind[edge_targets(graph, edges)] == NodeKind.TARGET
    edge = int(edges[into_logit & (graph.kind[graph.indices[edges]] == source_kind)][0])
    target, source = int(edge_targets(graph, np.array([edge]))[0]), int(graph.indices[edge])
    loadings = head_loadings(model, transcoders, graph, [edge]).matrix(edge)
    oracle = FrozenReplacement(model, transcoders, model.encode(PROMPT))
    try:
        source_layer, position, index = (
            int(graph.layer[source]),
            int(graph.position[source]),
            int(graph.index[source]),
        )
        if source_kind == NodeKind.TOKEN:
            added = {"embed_delta": oracle.token_delta(position)}
        else:
            added = {"mlp_deltas": oracle.feature_deltas(source_layer, position, index)}

        def effect(cut) -> float:
            """The source's effect on the target with the heads ``cut(layer, head)`` names kept from
            moving anything between positions."""
            edit = diagonal_pattern(cut)
            changed = _read(oracle.run(**added, edit=edit), model, transcoders, graph, target)
            return changed - _read(oracle.run(edit=edit), model, transcoders, graph, target)

        expected = np.zeros_like(loadings)
        for layer in range(model.n_layers):
            below = effect(lambda at, _head, layer=layer: at >= layer)
            for head in range(n_attention_heads(model)):
                through = effect(
                    lambda at, other, layer=layer, head=head: at > layer or (at == layer and other != head)
                )
                expected[layer, head] = through - below
        assert effect(lambda _at, _head: False) == pytest.approx(float(graph.weights[edge]), abs=1e-12)
    finally:
        oracle.close()
    assert np.abs(loadings).max() > 1e-3
    np.testing.assert_allclose(loadings, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


def test_targets_other_than_single_logits_need_their_specs():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    targets = [("a", "e")]
    graph = attribute(model, transcoders, PROMPT, targets=targets, progress=False)
    target = int(graph.nodes_of(NodeKind.TARGET)[0])
    sources, _ = graph.row(target)
    edges = graph.indptr[target] + np.flatnonzero(graph.position[sources] != graph.position[target])[:4]
    with pytest.raises(CircuitmapError, match="is not a single-token logit: pass the targets"):
        head_loadings(model, transcoders, graph, edges)
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_IMPLEMENTATION] is circuitmap_attention
    loadings = head_loadings(model, transcoders, graph, edges, targets=targets)
    np.testing.assert_allclose(loadings.remainder, 0, rtol=0, atol=1e-12)


def test_bad_input():
    model, transcoders, graph = computed("gemma2")
    edges = np.arange(graph.n_edges)
    same = int(edges[graph.position[edge_targets(graph, edges)] == graph.position[graph.indices]][0])
    with pytest.raises(CircuitmapError, match="is not cross-position: both nodes sit at position"):
        head_loadings(model, transcoders, graph, [same])
    with pytest.raises(CircuitmapError, match=f"out of range: the graph has {graph.n_edges} edges"):
        head_loadings(model, transcoders, graph, [graph.n_edges])
    with pytest.raises(CircuitmapError, match="no edges given"):
        head_loadings(model, transcoders, graph, [])
    crossing = top_cross_position_edges(graph, 2)
    with pytest.raises(CircuitmapError, match=f"edge {crossing[0]} is given twice"):
        head_loadings(model, transcoders, graph, [crossing[0], crossing[1], crossing[0]])
    with pytest.raises(CircuitmapError, match=r"head \(1, 4\) is out of range: the model has 3 layers of 4"):
        head_loadings(model, transcoders, graph, crossing, heads=[(1, 4)])
    other = random_transcoders(KIND, model.n_layers, model.d_model, seed=1)
    with pytest.raises(CircuitmapError, match="made with another transcoder set"):
        head_loadings(model, other, graph, crossing)
    with pytest.raises(CircuitmapError, match="ordered by weight or influence, not 'size'"):
        top_cross_position_edges(graph, 3, by="size")
    with pytest.raises(CircuitmapError, match="is not among the split edges"):
        head_loadings(model, transcoders, graph, crossing[:1]).matrix(int(crossing[1]))

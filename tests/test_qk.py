"""QK attribution is exact: the pairs sum to the score, and each node's pairs predict what changing it does.

Checked on every family against the frozen replacement model rebuilt with hooks (``helpers.attention``):

- the pairs sum to ``scaling · query · key`` read from the queries and keys the model hands its attention
  function, in the frozen model (float64, to 1e-12) and in a plain run (to float32 rounding, which some
  families' norms apply);
- adding a node's output once more (a change ``ε = 1`` of its size), with every other node, the head outputs
  included, held at its clean value, changes the score by that node's row sum (query side) or column sum
  (key side) of ``pairs`` when the query and key positions differ: the other side is then untouched and the
  score is linear in this one; at a single position both sides move, and the change is the row sum plus the
  column sum plus the node's own pair (bilinear, still exact).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from helpers.attention import FrozenReplacement, fixed_outputs, model_scores
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from circuitmap import CircuitmapError
from circuitmap.attribution import attribute
from circuitmap.attribution.heads import n_attention_heads
from circuitmap.attribution.qk import qk_attribution, salient_heads
from circuitmap.graphs.ids import node_ids
from circuitmap.models.hooks import ATTENTION_IMPLEMENTATION, circuitmap_attention

PROMPT = "The cat sat on"
KIND = "clt-jumprelu-skip"


@cache
def computed(family: str):
    """A float64 tiny model of ``family``, cross-layer skip transcoders and the token ids of ``PROMPT``."""
    model = tiny_model(family, torch.float64)
    return model, random_transcoders(KIND, model.n_layers, model.d_model), model.encode(PROMPT)


def _sites(model, n_tokens: int) -> list[tuple[int, int, int, int]]:
    """(layer, head, query, key): the last layer's last head across positions (a shared key head under
    grouped-query attention), a middle head at one position, a first-layer head reading the previous token."""
    last = n_tokens - 1
    return [
        (model.n_layers - 1, n_attention_heads(model) - 1, last, last - 2),
        (1, 0, last - 1, last - 1),
        (0, 1, last, last - 1),
    ]


def test_pairs_sum_to_the_score_the_model_computes(family):
    model, transcoders, ids = computed(family)
    plain = model_scores(model, ids)
    for layer, head, query, key in _sites(model, ids.shape[1]):
        result = qk_attribution(model, transcoders, PROMPT, layer, head, query, key)
        oracle = FrozenReplacement(model, transcoders, ids, head_norm_layer=layer)
        try:
            frozen = oracle.clean.score(layer, head, query, key)
        finally:
            oracle.close()
        assert result.pairs.sum() == pytest.approx(frozen, rel=0, abs=1e-12 * max(1.0, abs(frozen)))
        assert result.score == pytest.approx(frozen, rel=0, abs=1e-12 * max(1.0, abs(frozen)))
        queries, keys, scaling = plain[layer]
        group = head // (queries.shape[1] // keys.shape[1])
        real = scaling * float(queries[0, head, query] @ keys[0, group, key])
        assert result.score == pytest.approx(real, rel=1e-5, abs=1e-9)
        assert result.query_nodes[-1] == f"bias_{query}" and result.key_nodes[-1] == f"bias_{key}"
        assert result.pairs.shape == (len(result.query_nodes), len(result.key_nodes))
        heads = [node for node in result.key_nodes if node.startswith("attn_")]
        assert len(heads) == layer * n_attention_heads(model)


def _change(oracle: FrozenReplacement, node: str, held: dict[int, torch.Tensor]) -> dict:
    """Run arguments that add node ``node``'s output once more, head outputs held at ``held``."""
    parts = node.split("_")
    if node.startswith("E_"):
        return {"embed_delta": oracle.token_delta(int(parts[2])), "edit": fixed_outputs(held)}
    if node.startswith("err_"):
        return {"mlp_deltas": oracle.error_deltas(int(parts[1]), int(parts[2])), "edit": fixed_outputs(held)}
    if node.startswith("attn_"):
        layer, head, position = (int(part) for part in parts[1:])
        outputs = held[layer].clone()
        outputs[0, position, head] *= 2
        return {"edit": fixed_outputs({**held, layer: outputs})}
    layer, index, position = (int(part) for part in parts)
    return {"mlp_deltas": oracle.feature_deltas(layer, position, index), "edit": fixed_outputs(held)}


def _strongest_of_each_kind(nodes: list[str], totals: np.ndarray) -> list[int]:
    """Index of the node with the largest |total| of each kind (token, feature, error, head)."""
    kinds: dict[str, int] = {}
    for i, node in enumerate(nodes[:-1]):
        kind = node.split("_")[0] if not node[0].isdigit() else "feature"
        if kind not in kinds or abs(totals[i]) > abs(totals[kinds[kind]]):
            kinds[kind] = i
    return sorted(kinds.values())


def test_changing_one_node_changes_the_score_by_its_pairs(family):
    model, transcoders, ids = computed(family)
    layer, head, query, key = _sites(model, ids.shape[1])[0]
    across = qk_attribution(model, transcoders, PROMPT, layer, head, query, key)
    same = qk_attribution(model, transcoders, PROMPT, layer, head, query, query)
    assert same.query_nodes == same.key_nodes
    oracle = FrozenReplacement(model, transcoders, ids, head_norm_layer=layer)
    try:
        held = {below: oracle.clean.outputs[below] for below in range(layer)}
        base = {k: oracle.run(edit=fixed_outputs(held)).score(layer, head, query, k) for k in (key, query)}
        assert base[key] == pytest.approx(across.score, rel=0, abs=1e-12)
        scale = 1e-11 * max(1.0, np.abs(across.pairs).max())
        checks = [(across.key_nodes, across.key_totals, key), (across.query_nodes, across.query_totals, key)]
        for nodes, totals, read_key in checks:
            chosen = _strongest_of_each_kind(nodes, totals)
            assert len(chosen) == 4
            for i in chosen:
                changed = oracle.run(**_change(oracle, nodes[i], held)).score(layer, head, query, read_key)
                assert changed - base[read_key] == pytest.approx(totals[i], rel=0, abs=scale), nodes[i]
        for i in _strongest_of_each_kind(same.query_nodes, same.query_totals):
            changed = oracle.run(**_change(oracle, same.query_nodes[i], held)).score(
                layer, head, query, query
            )
            expected = same.query_totals[i] + same.key_totals[i] + same.pairs[i, i]
            assert changed - base[query] == pytest.approx(expected, rel=0, abs=scale), same.query_nodes[i]
    finally:
        oracle.close()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_graph_nodes_and_salient_heads(family):
    """Given a graph, nodes carry the graph's ids, and features it left out fold into its error nodes; the
    sites that carry the most cross-position influence come ranked, and can be attributed."""
    model, transcoders, ids = computed(family)
    capped = attribute(model, transcoders, PROMPT, progress=False, max_feature_nodes=40)
    layer, head, query, key = _sites(model, ids.shape[1])[0]
    on_prompt = qk_attribution(model, transcoders, PROMPT, layer, head, query, key)
    on_graph = qk_attribution(model, transcoders, capped, layer, head, query, key)
    assert on_graph.score == pytest.approx(on_prompt.score, rel=0, abs=1e-12)
    graph_ids = set(node_ids(capped))
    for nodes in (on_graph.query_nodes, on_graph.key_nodes):
        assert all(node in graph_ids for node in nodes if not node.startswith(("attn_", "bias_")))
    prompt_totals = dict(zip(on_prompt.key_nodes, on_prompt.key_totals, strict=True))
    graph_totals = dict(zip(on_graph.key_nodes, on_graph.key_totals, strict=True))
    assert set(graph_totals) < set(prompt_totals)
    folded = dict(graph_totals)
    for node, total in prompt_totals.items():
        if node not in graph_totals:
            feature_layer, _, position = node.split("_")
            folded[f"err_{feature_layer}_{position}"] -= total
    for node, total in folded.items():
        assert total == pytest.approx(prompt_totals[node], rel=0, abs=1e-12), node

    sites = salient_heads(model, transcoders, capped, 4)
    assert len(sites) == 4
    shares = [site.share for site in sites]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-12
    last = ids.shape[1] - 1
    assert all(site.key_position < site.query_position <= last for site in sites)
    top = sites[0]
    result = qk_attribution(
        model, transcoders, capped, top.layer, top.head, top.query_position, top.key_position
    )
    assert result.pairs.sum() == pytest.approx(result.score, rel=0, abs=1e-12)
    assert len(result.top_pairs(3)) == 3
    assert abs(result.top_pairs(1)[0][2]) == np.abs(result.pairs).max()


def test_bad_input():
    model, transcoders, ids = computed("gemma2")
    last = ids.shape[1] - 1
    with pytest.raises(CircuitmapError, match="head 4 is out of range: layer 1 has 4 heads"):
        qk_attribution(model, transcoders, PROMPT, 1, 4, last, 0)
    with pytest.raises(CircuitmapError, match="layer 3 is out of range: the model has 3 layers"):
        qk_attribution(model, transcoders, PROMPT, 3, 0, last, 0)
    with pytest.raises(CircuitmapError, match="comes after query position 2: attention is causal"):
        qk_attribution(model, transcoders, PROMPT, 1, 0, 2, 3)
    with pytest.raises(CircuitmapError, match=f"query position {last + 1} is out of range"):
        qk_attribution(model, transcoders, PROMPT, 1, 0, last + 1, 0)
    with pytest.raises(CircuitmapError, match="does not see key position 0"):
        qk_attribution(model, transcoders, PROMPT, 0, 0, last, 0)
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_IMPLEMENTATION] is circuitmap_attention
    with pytest.raises(CircuitmapError, match="n_sites must be at least 1"):
        salient_heads(model, transcoders, attribute(model, transcoders, PROMPT, progress=False), 0)

"""Interventions: constrained runs reproduce the graph's edges; open-loop runs and generation match brute
force.

Brute force here means hooks written in the test: the model run with a hand-made change to an MLP output or
the residual stream, or a generation loop that recomputes the whole sequence at every step.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from helpers.models import FAMILIES, STORIES, needs_shared, tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError, load_model
from circuitmap.attribution import attribute
from circuitmap.graphs import NodeKind
from circuitmap.interventions import FeatureEdit, ResidualEdit, Supernode, generate_with, intervene
from circuitmap.models.generation import next_tokens

PROMPT = "The cat sat on"


def setup(family="llama", kind="plt-topk-skip", seed=0):
    model = tiny_model(family, dtype=torch.float64)
    transcoders = random_transcoders(kind, model.n_layers, model.d_model, seed=seed).to(dtype=torch.float64)
    return model, transcoders


def raw_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Undo the final soft-capping (Gemma 2), which the graph's target rows are read before."""
    cap = model.logit_softcap
    return logits if cap is None else cap * torch.atanh(logits / cap)


def predicted_change(graph, result, edited: list[int]) -> np.ndarray:
    """What the graph predicts for every row when the edited nodes' activations change as they did in
    ``result``: each node's adjacency column (activation × direct effect) times its relative change."""
    adjacency = graph.dense_adjacency()
    change = np.zeros(graph.n_nodes)
    for node in edited:
        before, after = result.activation(
            int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])
        )
        change += adjacency[:, node] * (after - before) / before
    return change


def observed_change(graph, model, result) -> np.ndarray:
    """The change of every feature node's pre-activation and every target's de-meaned logit."""
    change = np.zeros(graph.n_nodes)
    for node in graph.nodes_of(NodeKind.FEATURE):
        layer, position, index = (int(graph.layer[node]), int(graph.position[node]), int(graph.index[node]))
        before = result.pre_activations_before[layer][position, index]
        change[node] = float(result.pre_activations_after[layer][position, index] - before)
    logits = raw_logits(model, result.logits_after) - raw_logits(model, result.logits_before)
    for node in graph.nodes_of(NodeKind.TARGET):
        change[node] = float(logits[int(graph.index[node])] - logits.mean())
    return change


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["plt-topk-skip", "clt-jumprelu-skip", "plt-jumprelu", "clt-topk"])
def test_constrained_mode_matches_the_graph_exactly(family, kind):
    model, transcoders = setup(family, kind)
    graph = attribute(model, transcoders, PROMPT, progress=False)
    features = graph.nodes_of(NodeKind.FEATURE)
    rng = np.random.default_rng(1)
    chosen = [int(n) for n in rng.choice(features, size=5, replace=False)]
    ids = [graph.node_id(n) for n in chosen]
    acts = [float(graph.activation[n]) for n in chosen]
    edits = [
        FeatureEdit.ablate(ids[0]),
        FeatureEdit.scale(ids[1], 3.0),
        FeatureEdit.set(ids[2], 0.7),
        FeatureEdit.add(ids[3], -0.25),
        FeatureEdit.scale(Supernode("group", [ids[4]]), -1.0),
    ]
    result = intervene(model, transcoders, PROMPT, edits, mode="constrained")
    rows = np.concatenate([features, graph.nodes_of(NodeKind.TARGET)])
    expected = predicted_change(graph, result, chosen)[rows]
    observed = observed_change(graph, model, result)[rows]
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(observed, expected, rtol=0, atol=1e-9)
    new_values = [0.0, 3.0 * acts[1], 0.7, acts[3] - 0.25, -acts[4]]
    for node, value in zip(chosen, new_values, strict=True):
        layer, position, index = (int(graph.layer[node]), int(graph.position[node]), int(graph.index[node]))
        assert result.activation(layer, position, index)[1] == pytest.approx(value, rel=1e-6, abs=1e-6)


def test_constrained_mode_matches_a_capped_graph():
    model, transcoders = setup("llama", "clt-jumprelu-skip")
    graph = attribute(model, transcoders, PROMPT, progress=False, max_feature_nodes=20)
    chosen = [int(n) for n in graph.nodes_of(NodeKind.FEATURE)[::4]]
    edits = [FeatureEdit.scale(graph.node_id(n), 0.5) for n in chosen]
    result = intervene(model, transcoders, PROMPT, edits, mode="constrained")
    rows = np.concatenate([graph.nodes_of(NodeKind.FEATURE), graph.nodes_of(NodeKind.TARGET)])
    expected = predicted_change(graph, result, chosen)[rows]
    np.testing.assert_allclose(observed_change(graph, model, result)[rows], expected, rtol=0, atol=1e-9)


def brute_force_logits(model, transcoders, changes, freeze_attention):
    """Last logits with ``changes[(layer)] = [T, d]`` added to MLP outputs; attention optionally frozen."""
    hooks = [("mlp_out", layer, lambda out, d=delta: out + d) for layer, delta in changes.items()]
    with ExitStack() as stack:
        if freeze_attention:
            stack.enter_context(model.freeze(PROMPT, attention=True, norms=False))
        stack.enter_context(model.hooks(*hooks))
        return model.logits(PROMPT)[0, -1]


@pytest.mark.parametrize("kind", ["plt-topk-skip", "clt-jumprelu-skip"])
@pytest.mark.parametrize("freeze_attention", [False, True])
def test_open_loop_edit_adds_the_decoder_output_to_every_output_layer(kind, freeze_attention):
    model, transcoders = setup("llama", kind)
    clean = intervene(model, transcoders, PROMPT, [])
    layer, position = 1, 3
    index = int(clean.activations_before[layer][position].nonzero()[0])
    activation = float(clean.activations_before[layer][position, index])
    result = intervene(
        model,
        transcoders,
        PROMPT,
        FeatureEdit.set((layer, position, index), activation + 2.0),
        freeze_attention=freeze_attention,
    )
    outputs = range(layer, model.n_layers) if transcoders.kind == "clt" else [layer]
    changes = {}
    for out_layer in outputs:
        delta = torch.zeros(1, len(clean.token_strings), model.d_model, dtype=torch.float64)
        delta[0, position] = 2.0 * transcoders.decoder_vectors(layer, torch.tensor([index]), out_layer)[0]
        changes[out_layer] = delta
    expected = brute_force_logits(model, transcoders, changes, freeze_attention)
    torch.testing.assert_close(result.logits_after, expected, rtol=0, atol=1e-10)
    assert result.activation(layer, position, index) == pytest.approx((activation, activation + 2.0))
    assert not torch.equal(result.logits_after, result.logits_before)


def test_no_edits_change_nothing():
    model, transcoders = setup()
    for mode in ("open_loop", "constrained"):
        result = intervene(model, transcoders, PROMPT, [], mode=mode)
        torch.testing.assert_close(result.logits_after, result.logits_before, rtol=0, atol=1e-12)
        assert [token for token, _ in result.top_after] == [token for token, _ in result.top_before]
        assert result.feature_changes() == []


def test_open_loop_scale_acts_on_the_activation_of_the_edited_run():
    """A scale is relative to the feature's activation after upstream edits, so downstream edits compose."""
    model, transcoders = setup("llama", "plt-jumprelu")
    clean = intervene(model, transcoders, PROMPT, [])
    up = (0, 2, int(clean.activations_before[0][2].nonzero()[0]))
    upstream = intervene(model, transcoders, PROMPT, FeatureEdit.set(up, 5.0), freeze_attention=False)
    candidates = (upstream.activations_after[2][3] - clean.activations_before[2][3]).abs()
    changed = ((upstream.activations_after[2][3] > 0) & (candidates > 1e-6)).nonzero()
    index = int(changed[0])
    current = float(upstream.activations_after[2][3, index])
    both = intervene(
        model,
        transcoders,
        PROMPT,
        [FeatureEdit.set(up, 5.0), FeatureEdit.scale((2, 3, index), 2.0)],
        freeze_attention=False,
    )
    assert both.activation(2, 3, index)[1] == pytest.approx(2.0 * current, abs=1e-12)


def test_residual_edit_equals_adding_to_the_residual_stream():
    model, transcoders = setup()
    vector = torch.randn(model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = intervene(
        model, transcoders, PROMPT, ResidualEdit(1, vector, positions=(2, -1)), freeze_attention=False
    )
    with model.add_to_residual(1, vector, positions=[2, model.encode(PROMPT).shape[1] - 1]):
        expected = model.logits(PROMPT)[0, -1]
    torch.testing.assert_close(result.logits_after, expected, rtol=0, atol=1e-12)


def brute_force_generation(model, transcoders, edits, n, sample_seed=None, temperature=1.0):
    """Generation that recomputes the whole sequence, edits included, at every step."""
    ids = model.encode(PROMPT)
    generator = None if sample_seed is None else torch.Generator().manual_seed(sample_seed)
    new = []
    for _ in range(n):
        sequence = torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)
        logits = intervene(model, transcoders, sequence, edits, freeze_attention=False).logits_after.float()
        if generator is None:
            new.append(int(logits.argmax()))
        else:
            new.append(int(next_tokens(logits[None], False, temperature, generator)))
    return model.decode_after(ids, new)


def test_generation_without_edits_is_the_models_own():
    model, transcoders = setup()
    assert generate_with(model, transcoders, PROMPT, [], 12) == model.generate(PROMPT, 12)


@pytest.mark.parametrize(
    ("family", "kind"),
    [
        ("llama", "plt-topk-skip"),
        ("llama", "clt-jumprelu-skip"),
        ("gemma2", "plt-jumprelu"),
        ("gpt2", "clt-topk"),
    ],
)
def test_generation_keeps_edits_on_prompt_and_generated_positions(family, kind):
    model, transcoders = setup(family, kind)
    clean = intervene(model, transcoders, PROMPT, [])
    index = int(clean.activations_before[1][4].nonzero()[0])
    vector = torch.randn(model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    edits = [
        FeatureEdit.ablate((1, 4, index)),
        FeatureEdit.set((0, None, 7), 3.0),
        ResidualEdit(2, vector),
    ]
    edited = generate_with(model, transcoders, PROMPT, edits, 10)
    assert edited == brute_force_generation(model, transcoders, edits, 10)
    assert edited != model.generate(PROMPT, 10)


def test_sampled_generation_is_seeded_and_matches_brute_force():
    model, transcoders = setup()
    edits = [FeatureEdit.set((0, None, 7), 3.0)]
    first = generate_with(model, transcoders, PROMPT, edits, 8, greedy=False, temperature=1.5, seed=11)
    again = generate_with(model, transcoders, PROMPT, edits, 8, greedy=False, temperature=1.5, seed=11)
    assert first == again
    assert first == brute_force_generation(model, transcoders, edits, 8, sample_seed=11, temperature=1.5)


def test_bad_edits_give_clear_errors():
    model, transcoders = setup("llama", "plt-jumprelu")
    clean = intervene(model, transcoders, PROMPT, [])
    inactive = int((clean.activations_before[1][3] == 0).nonzero()[0])
    active = int(clean.activations_before[1][3].nonzero()[0])
    n_tokens = len(clean.token_strings)
    cases = [
        (FeatureEdit.ablate(f"1_{inactive}_3"), f"feature 1_{inactive}_3 is not active"),
        (FeatureEdit.scale((1, 3, inactive), 2.0), f"feature 1_{inactive}_3 is not active"),
        (FeatureEdit.ablate("9_0_1"), "layer 9 is out of range"),
        (FeatureEdit.ablate((1, 3, 48)), "index 48 is out of range"),
        (FeatureEdit.ablate((1, n_tokens, active)), f"position {n_tokens} is beyond the {n_tokens}-token"),
        (FeatureEdit.scale(Supernode("nothing", []), 0.0), "supernode 'nothing' is empty"),
        (FeatureEdit.scale((1, 3, active), math.nan), "must be a finite number"),
        (FeatureEdit.set((1, 3, active), math.inf), "must be a finite number"),
        (FeatureEdit("1_0_3", "multiply", 2.0), "unknown edit 'multiply'"),
        (FeatureEdit.ablate("1-0-3"), "not a feature node id"),
        (ResidualEdit(1, torch.zeros(5)), "the model's width is"),
        (ResidualEdit(1, torch.zeros(model.d_model), positions=(40,)), "position 40 is beyond"),
        (ResidualEdit(7, torch.zeros(model.d_model)), "layer 7 is out of range"),
        ("1_0_3", "edits are FeatureEdit or ResidualEdit"),
    ]
    for edit, message in cases:
        with pytest.raises(CircuitmapError, match=message):
            intervene(model, transcoders, PROMPT, edit)
    with pytest.raises(CircuitmapError, match="unknown mode"):
        intervene(model, transcoders, PROMPT, [], mode="closed")
    with pytest.raises(CircuitmapError, match="constrained mode always freezes attention"):
        intervene(model, transcoders, PROMPT, [], mode="constrained", freeze_attention=False)
    with pytest.raises(CircuitmapError, match="max_new_tokens"):
        generate_with(model, transcoders, PROMPT, [], 0)
    assert intervene(model, transcoders, PROMPT, FeatureEdit.set((1, 3, inactive), 1.0)).activation(
        1, 3, inactive
    ) == pytest.approx((0.0, 1.0))


def test_result_reports_targets_top_tokens_and_changed_features():
    model, transcoders = setup()
    clean = intervene(model, transcoders, PROMPT, [])
    index = int(clean.activations_before[2][4].nonzero()[0])
    result = intervene(model, transcoders, PROMPT, FeatureEdit.scale((2, 4, index), 6.0), targets=["a", "b"])
    assert [t.token for t in result.targets] == ["a", "b"]
    probs = result.logits_after.double().softmax(-1)
    assert result.targets[1].prob_after == pytest.approx(
        float(probs[model.tokenizer.convert_tokens_to_ids("b")])
    )
    assert result.top_after[0][1] == pytest.approx(float(probs.max()))
    assert result.feature_changes(1)[0][:3] == (2, 4, index)
    document = result.as_json()
    assert document["edits"] == [f"scale 2_{index}_4 6"]
    assert "top after" in result.summary()


@needs_shared(STORIES)
def test_constrained_mode_is_exact_on_stories260k():
    model = load_model(STORIES / "stories260K.bin", dtype="float64")
    transcoders = random_transcoders("clt-jumprelu-skip", model.n_layers, model.d_model, d_features=128)
    prompt = "Once upon a time, there was"
    graph = attribute(model, transcoders, prompt, progress=False, max_feature_nodes=100)
    chosen = [int(n) for n in graph.nodes_of(NodeKind.FEATURE)[::9]]
    edits = [FeatureEdit.scale(graph.node_id(n), -1.0) for n in chosen]
    result = intervene(model, transcoders, prompt, edits, mode="constrained")
    rows = np.concatenate([graph.nodes_of(NodeKind.FEATURE), graph.nodes_of(NodeKind.TARGET)])
    expected = predicted_change(graph, result, chosen)[rows]
    np.testing.assert_allclose(observed_change(graph, model, result)[rows], expected, rtol=0, atol=1e-8)


def test_constrained_mode_reports_only_the_edited_features_as_changed():
    model, transcoders = setup("llama", "plt-jumprelu")
    graph = attribute(model, transcoders, PROMPT, progress=False)
    node = int(graph.nodes_of(NodeKind.FEATURE)[0])
    result = intervene(
        model, transcoders, PROMPT, FeatureEdit.scale(graph.node_id(node), 5.0), mode="constrained"
    )
    changes = result.feature_changes(50)
    assert [change[:3] for change in changes] == [
        (int(graph.layer[node]), int(graph.position[node]), int(graph.index[node]))
    ]
    moved = [
        (after - before).abs().max()
        for before, after in zip(result.pre_activations_before, result.pre_activations_after, strict=True)
    ]
    assert max(moved[1:]) > 1e-3


def test_a_feature_named_twice_in_one_edit_is_refused():
    model, transcoders = setup()
    clean = intervene(model, transcoders, PROMPT, [])
    index = int(clean.activations_before[1][3].nonzero()[0])
    for members in ([f"1_{index}_3", (1, 3, index)], [(1, None, index), (1, -2, index)]):
        with pytest.raises(CircuitmapError, match=f"names feature 1_{index}_"):
            intervene(model, transcoders, PROMPT, FeatureEdit.scale(Supernode("twice", members), 2.0))


def test_unusual_but_valid_inputs_are_accepted():
    model, transcoders = setup()
    clean = intervene(model, transcoders, PROMPT, [])
    index = int(clean.activations_before[1][3].nonzero()[0])
    reference = intervene(model, transcoders, PROMPT, FeatureEdit.scale((1, 3, index), 2.0)).logits_after
    for value in (np.float32(2.0), torch.tensor(2.0), 2):
        edits = (edit for edit in [FeatureEdit.scale(f"1_{index}_3", value)])
        torch.testing.assert_close(intervene(model, transcoders, PROMPT, edits).logits_after, reference)
    vector = [0.5] * model.d_model
    as_list = intervene(model, transcoders, PROMPT, ResidualEdit(1, vector, positions=2)).logits_after
    as_tensor = intervene(model, transcoders, PROMPT, ResidualEdit(1, torch.tensor(vector), positions=[2]))
    torch.testing.assert_close(as_list, as_tensor.logits_after)
    every = intervene(model, transcoders, PROMPT, FeatureEdit.set(f"0_{index}_*", 1.0))
    assert (every.activations_after[0][:, index] == 1.0).all()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (FeatureEdit.set("1_0_3", "3"), "must be a finite number"),
        (FeatureEdit.set("1_0_3", None), "must be a finite number"),
        (FeatureEdit.set("1_0_3", True), "must be a finite number"),
        (FeatureEdit.ablate("4_7_3"), "4_7_3 is an output \\(logit\\) node id"),
        (ResidualEdit(1, "not a vector"), "must be a tensor or a list of numbers"),
        (ResidualEdit(1, torch.zeros(32), positions=["a"]), "positions are None"),
    ],
)
def test_malformed_edits_give_one_line_errors(edit, message):
    model, transcoders = setup()
    with pytest.raises(CircuitmapError, match=message):
        intervene(model, transcoders, PROMPT, edit)


def test_other_malformed_arguments():
    model, transcoders = setup()
    with pytest.raises(CircuitmapError, match="as a list, not one string"):
        Supernode("s", "1_2_3")
    with pytest.raises(CircuitmapError, match="top_k must be a positive whole number"):
        intervene(model, transcoders, PROMPT, [], top_k=-1)
    with pytest.raises(CircuitmapError, match="edits are FeatureEdit or ResidualEdit"):
        intervene(model, transcoders, PROMPT, 3)


def test_sampling_without_a_seed_leaves_the_global_generator_alone():
    model, transcoders = setup()
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        generate_with(model, transcoders, PROMPT, [], 3, greedy=False)
        draws.append(torch.rand(1))
    assert draws[0] == draws[1]

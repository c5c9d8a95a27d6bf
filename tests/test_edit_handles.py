"""Edits as handles: what ``patch_edits`` puts on a model acts on every pass until ``remove()``, exactly as
the edited run of ``intervene``; ``apply_edits`` is its context-manager twin; model hooks are handles too."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import FeatureEdit, ResidualEdit, apply_edits, intervene, patch_edits
from circuitmap.errors import CircuitmapError

PROMPT = "The cat sat on"


def _setup():
    model = tiny_model("llama", torch.float64)
    return model, random_transcoders("clt-jumprelu-skip", model.n_layers, model.d_model).to(
        dtype=torch.float64
    )


def _active(model, transcoders, layer: int, position: int) -> int:
    clean = intervene(model, transcoders, PROMPT, [])
    return int(clean.activations_before[layer][position].nonzero()[0])


def test_a_patched_model_runs_the_edited_pass_until_removed():
    model, transcoders = _setup()
    index = _active(model, transcoders, 0, 2)
    vector = torch.randn(model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    edits = [FeatureEdit.scale((0, 2, index), -2.0), ResidualEdit(1, vector, positions=(-1,))]
    clean = model.logits(PROMPT)[0, -1]
    expected = intervene(model, transcoders, PROMPT, edits, freeze_attention=False).logits_after
    handle = patch_edits(model, transcoders, edits, PROMPT)
    torch.testing.assert_close(model.logits(PROMPT)[0, -1], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.logits(PROMPT)[0, -1], expected, rtol=0, atol=1e-12)
    handle.remove()
    handle.remove()
    torch.testing.assert_close(model.logits(PROMPT)[0, -1], clean, rtol=0, atol=0)
    with apply_edits(model, transcoders, edits, PROMPT):
        torch.testing.assert_close(model.logits(PROMPT)[0, -1], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.logits(PROMPT)[0, -1], clean, rtol=0, atol=0)


def test_vectors_need_no_transcoders_and_act_on_generated_tokens():
    model, transcoders = _setup()
    vector = torch.randn(model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    steer = ResidualEdit(1, vector)
    with model.add_to_residual(1, vector):
        expected = model.generate(PROMPT, 8)
    with apply_edits(model, None, steer):
        assert model.generate(PROMPT, 8) == expected
    assert model.generate(PROMPT, 8) != expected
    with pytest.raises(CircuitmapError, match="feature edits need the transcoder set"):
        patch_edits(model, None, [steer, FeatureEdit.ablate((0, 2, 1))])


def test_positions_without_a_prompt_must_be_absolute():
    model, transcoders = _setup()
    with pytest.raises(CircuitmapError, match="counts from the end of a prompt"):
        patch_edits(model, transcoders, FeatureEdit.ablate((0, -1, 3)))
    with pytest.raises(CircuitmapError, match="counts from the end of a prompt"):
        patch_edits(model, None, ResidualEdit(1, torch.zeros(model.d_model), positions=(-1,)))
    with pytest.raises(CircuitmapError, match="is not active on this prompt"):
        index = int((intervene(model, transcoders, PROMPT, []).activations_before[0][2] == 0).nonzero()[0])
        patch_edits(model, transcoders, FeatureEdit.scale((0, 2, index), 2.0), PROMPT)
    patch_edits(model, transcoders, FeatureEdit.set((0, 2, 0), 1.0)).remove()


def test_model_hooks_are_handles_and_a_failed_install_leaves_none():
    model, _ = _setup()
    clean = model.logits(PROMPT)
    handle = model.patch_mlp_output(1, lambda output: output * 0)
    assert not torch.equal(model.logits(PROMPT), clean)
    handle.remove()
    assert torch.equal(model.logits(PROMPT), clean)
    with pytest.raises(CircuitmapError, match="unknown hook point"):
        model.add_hooks(("mlp_out", 0, lambda output: output * 0), ("nowhere", 0, lambda x: x))
    assert torch.equal(model.logits(PROMPT), clean), "the hooks installed before the bad one are removed"

"""Hook points capture what the modules compute, patches act exactly, and freezing makes the model linear."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers.models import char_tokenizer, tiny_hf_model, tiny_model

from circuitmap import CircuitmapError, Model
from circuitmap.models.adapters import get_module

PROMPT = "Hello, tiny world!"


def _block(model: Model, layer: int, path: str):
    return get_module(model.points.layers[layer], path)


def test_attention_function_matches_the_models_own(family):
    """circuitmap's registered attention gives the same logits as transformers' eager attention."""
    reference = tiny_hf_model(family, torch.float64)
    reference.set_attn_implementation("eager")
    ids = char_tokenizer()(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    model = tiny_model(family, torch.float64)
    torch.testing.assert_close(
        model.logits(ids), expected, rtol=0, atol=1e-5
    )  # some families softmax in fp32


def test_hook_points_capture_what_modules_compute(family):
    model = tiny_model(family, torch.float64)
    ids = model.encode(PROMPT)
    logits, cache = model.run_with_cache(ids)
    adapter = model.adapter
    config = model.hf_model.config
    parallel = getattr(config, "use_parallel_residual", False)
    with torch.no_grad():
        for layer in range(model.n_layers):
            pre, attn, mlp_in, mlp_out, post = (
                cache[point, layer] for point in ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
            )
            torch.testing.assert_close(post, pre + attn + mlp_out, rtol=0, atol=1e-12)
            if layer + 1 < model.n_layers:
                assert torch.equal(cache["resid_pre", layer + 1], post)
            norm = _block(
                model, layer, adapter.residual_norms[1 if family in ("gemma2", "gemma3_text") else -1]
            )
            if family in ("gemma2", "gemma3_text"):
                norm = _block(model, layer, "pre_feedforward_layernorm")
            torch.testing.assert_close(mlp_in, norm(pre if parallel else pre + attn), rtol=0, atol=1e-12)
            mlp = _block(model, layer, adapter.mlp)
            expected_out = mlp(mlp_in)
            if adapter.mlp_out != adapter.mlp:
                expected_out = _block(model, layer, adapter.mlp_out)(expected_out)
            torch.testing.assert_close(mlp_out, expected_out, rtol=0, atol=1e-12)
        assert torch.equal(cache["resid_final", None], cache["resid_post", model.n_layers - 1])
        final = get_module(model.hf_model, adapter.final_norm)(cache["resid_final", None])
        torch.testing.assert_close(cache["final_norm", None], final, rtol=0, atol=1e-12)
        expected_logits = final @ model.unembedding.T
        if model.unembedding_bias is not None:
            expected_logits = expected_logits + model.unembedding_bias
        if model.logit_softcap:
            expected_logits = torch.tanh(expected_logits / model.logit_softcap) * model.logit_softcap
        torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-10)


def test_identity_patches_leave_logits_unchanged(family):
    model = tiny_model(family)
    ids = model.encode(PROMPT)
    clean = model.logits(ids)
    hooks = [
        (p, layer, lambda t: t.clone())
        for p in ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
        for layer in range(model.n_layers)
    ]
    hooks += [("resid_final", None, lambda t: t.clone()), ("final_norm", None, lambda t: t.clone())]
    with model.hooks(*hooks):
        assert torch.equal(model.logits(ids), clean)
    assert torch.equal(model.logits(ids), clean), "hooks must be removed on exit"


def test_patching_mlp_output_and_adding_to_residual(family):
    model = tiny_model(family, torch.float64)
    ids = model.encode(PROMPT)
    _, cache = model.run_with_cache(ids)
    with model.patch_mlp_output(1, torch.zeros(model.d_model, dtype=torch.float64)):
        _, patched = model.run_with_cache(ids)
    assert torch.count_nonzero(patched["mlp_out", 1]) == 0
    torch.testing.assert_close(patched["resid_post", 1], cache["resid_pre", 1] + cache["attn_out", 1])
    vector = torch.randn(model.d_model, dtype=torch.float64)
    with model.add_to_residual(1, vector, positions=[5]):
        _, added = model.run_with_cache(ids)
    torch.testing.assert_close(added["resid_pre", 1][0, 5], cache["resid_pre", 1][0, 5] + vector)
    assert torch.equal(added["resid_final", None][0, :5], cache["resid_final", None][0, :5]), (
        "earlier positions change"
    )
    assert not torch.allclose(added["resid_final", None][0, 5:], cache["resid_final", None][0, 5:])
    with pytest.raises(CircuitmapError, match="beyond"), model.add_to_residual(1, vector, positions=[99]):
        model.logits(ids)


def test_freezing_keeps_the_clean_output(family):
    model = tiny_model(family, torch.float64)
    ids = model.encode(PROMPT)
    clean = model.logits(ids)
    with model.freeze(ids, mlps=True) as state:
        assert state.logits.dtype == torch.float64
        torch.testing.assert_close(model.logits(ids), state.logits, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.logits, clean, rtol=0, atol=1e-5)  # HF norms may round to fp32
    torch.testing.assert_close(model.logits(ids), clean, rtol=0, atol=0)


def _logits_after_adding(model: Model, ids: torch.Tensor, layer: int, delta: torch.Tensor) -> torch.Tensor:
    with model.hooks(("resid_pre", layer, lambda t: t + delta)):
        return model.logits(ids)


def _without_logit_softcap(model: Model) -> Model:
    """Soft-capping the logits is an elementwise nonlinearity after the residual stream; switch it off."""
    if model.logit_softcap:
        model.hf_model.config.final_logit_softcapping = None
    return model


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_model_is_linear_in_the_residual_stream(family, frozen):
    """Attention, norms and MLPs frozen: logits are affine in a residual perturbation; else they are not."""
    model = _without_logit_softcap(tiny_model(family, torch.float64))
    ids = model.encode(PROMPT)
    generator = torch.Generator().manual_seed(1)
    d1, d2 = (
        torch.randn(1, ids.shape[1], model.d_model, generator=generator, dtype=torch.float64) for _ in "ab"
    )
    a, b = 1.7, -0.6
    with model.freeze(ids, mlps=True) if frozen else torch.no_grad():
        base = _logits_after_adding(model, ids, 0, torch.zeros_like(d1))
        combined = _logits_after_adding(model, ids, 0, a * d1 + b * d2)
        first = _logits_after_adding(model, ids, 0, d1)
        second = _logits_after_adding(model, ids, 0, d2)
    gap = (combined - base - a * (first - base) - b * (second - base)).abs().max().item()
    if frozen:
        assert gap < 1e-8
    else:
        assert gap > 1e-3


def test_frozen_gradients_do_not_depend_on_the_input(family):
    """In the frozen model the Jacobian of a logit w.r.t. the residual is the same at every input."""
    model = _without_logit_softcap(tiny_model(family, torch.float64))
    ids = model.encode(PROMPT)
    grads = []
    with model.freeze(ids, mlps=True):
        for scale in (0.0, 3.0):
            delta = (
                scale * torch.randn(1, ids.shape[1], model.d_model, dtype=torch.float64)
            ).requires_grad_()
            with model.hooks(("resid_pre", 1, lambda t, d=delta: t + d)):
                model.forward(ids)[0, -1, 7].backward()
            grads.append(delta.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)
    assert grads[0].abs().sum() > 0


def test_frozen_attention_replays_the_recorded_pattern():
    model = tiny_model("llama")
    ids = model.encode(PROMPT)
    with model.freeze(ids), pytest.raises(CircuitmapError, match="freeze again"):
        model.logits(model.encode("short"))


def test_replaying_a_prefix_keeps_no_copy_of_the_pattern():
    """On a prefix the replayed pattern is a view of the recorded one: what the backward pass keeps of it
    shares the recorded storage (a copy per prefix graph was gigabytes at 1,000 tokens)."""
    model = tiny_model("llama")
    ids = model.encode(PROMPT)
    length = ids.shape[1] - 3
    heads = model.hf_model.config.num_attention_heads
    kept = []
    with model.freeze(ids) as frozen, frozen.prefix(length):
        recorded = {
            control.pattern.untyped_storage().data_ptr()
            for control in frozen.controls
            if getattr(control, "pattern", None) is not None
        }
        delta = torch.zeros(1, length, model.d_model, requires_grad=True)
        with (
            torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t),
            model.hooks(("resid_pre", 0, lambda t: t + delta)),
        ):
            model.forward(ids[:, :length])
    patterns = [t for t in kept if t.numel() == heads * length**2]
    assert len(patterns) == model.n_layers
    assert all(t.untyped_storage().data_ptr() in recorded for t in patterns)


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        is_decoder=True,
    )
    hf_model = transformers.BertLMHeadModel(config)
    with pytest.raises(CircuitmapError, match=r"unsupported architecture 'bert'; supported: .*llama"):
        Model(hf_model, char_tokenizer())


def test_activations_without_the_unembedding_match_run_with_cache(family):
    model = tiny_model(family)
    ids = model.encode(PROMPT)
    _, cache = model.run_with_cache(ids, points=["mlp_in", "mlp_out", "resid_final"])
    internals = model.activations(ids, points=["mlp_in", "mlp_out", "resid_final"])
    assert internals.keys() == cache.keys()
    for key, value in cache.items():
        assert torch.equal(internals[key], value), key


def test_a_model_cut_after_its_first_layers_ends_on_the_residual_entering_the_next(family):
    model = tiny_model(family, torch.float64)
    ids = model.encode(PROMPT)
    clean, full = model.run_with_cache(ids)
    cut = model.first_layers(model.n_layers - 1)
    assert (cut.n_layers, model.n_layers) == (model.n_layers - 1, len(model.points.layers))
    _, part = cut.run_with_cache(ids)
    torch.testing.assert_close(part["resid_final", None], full["resid_pre", cut.n_layers], rtol=0, atol=1e-12)
    for layer in range(cut.n_layers):
        torch.testing.assert_close(part["mlp_in", layer], full["mlp_in", layer], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.run_with_cache(ids)[0], clean, rtol=0, atol=0)
    for wrong in (0, model.n_layers + 1):
        with pytest.raises(CircuitmapError, match="can be cut after"):
            model.first_layers(wrong)

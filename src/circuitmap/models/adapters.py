"""Architecture adapters: where each family keeps the modules that circuitmap hooks.

An adapter is data, not code: dotted module paths relative to the Hugging Face model, plus the few facts
(norm flavour, logit soft-capping) that differ between families. Adding a family means adding one entry to
``ADAPTERS``. The hook points themselves are implemented once, in ``hooks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from circuitmap.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Adapter:
    """Module paths and norm facts for one model family.

    Per-layer paths are relative to one decoder layer. ``attn_out`` and ``mlp_out`` name the module whose
    output is what the block adds to the residual stream (after any post-norm). ``residual_norms`` are every
    normalisation on the residual path inside a layer (freezing them makes the layer linear in its input);
    ``mlp_norm`` is the one whose output the MLP reads.
    """

    family: str
    layers: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    attn_out: str
    mlp_out: str
    residual_norms: tuple[str, ...]
    mlp_norm: str
    rms_weight_offset: float = 0.0


def _llama_like(family: str) -> Adapter:
    return Adapter(
        family=family,
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        mlp="mlp",
        attn_out="self_attn",
        mlp_out="mlp",
        residual_norms=("input_layernorm", "post_attention_layernorm"),
        mlp_norm="post_attention_layernorm",
    )


def _gemma_like(family: str) -> Adapter:
    return Adapter(
        family=family,
        layers="model.layers",
        final_norm="model.norm",
        unembed="lm_head",
        attn="self_attn",
        mlp="mlp",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        residual_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        mlp_norm="pre_feedforward_layernorm",
        rms_weight_offset=1.0,
    )


ADAPTERS: dict[str, Adapter] = {
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "qwen3": _llama_like("qwen3"),
    "gemma2": _gemma_like("gemma2"),
    "gemma3_text": _gemma_like("gemma3_text"),
    "gpt2": Adapter(
        family="gpt2",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        mlp="mlp",
        attn_out="attn",
        mlp_out="mlp",
        residual_norms=("ln_1", "ln_2"),
        mlp_norm="ln_2",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        mlp="mlp",
        attn_out="attention",
        mlp_out="mlp",
        residual_norms=("input_layernorm", "post_attention_layernorm"),
        mlp_norm="post_attention_layernorm",
    ),
}


def supported_families() -> list[str]:
    """Model types (``config.model_type``) that have an adapter."""
    return sorted(ADAPTERS)


def adapter_for(hf_model: nn.Module) -> Adapter:
    """Pick the adapter for a Hugging Face causal LM by its ``config.model_type``."""
    model_type = getattr(hf_model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_families())}"
        )
    return ADAPTERS[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted path such as ``model.layers`` below ``root``."""
    return root.get_submodule(path)

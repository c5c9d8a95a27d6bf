"""Tiny random models of every supported family, a character tokenizer, and the shared data paths."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from circuitmap import Model

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
STORIES = SHARED_DATA / "models" / "stories260K"

VOCAB = 101
WIDTH = 32


def needs_shared(path: Path = SHARED_DATA):
    """Skip a test when the shared data folder beside the repository is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with <bos>/<eos>/<unk>: enough for tiny models."""
    specials = ["<unk>", "<bos>", "<eos>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def _common(**extra) -> dict:
    return dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)


TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ),
    "mistral": lambda: transformers.MistralConfig(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=None,
        )
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        )
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            max_position_embeddings=64,
            final_logit_softcapping=5.0,
            attn_logit_softcapping=3.0,
        )
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            max_position_embeddings=64,
        )
    ),
    "gpt2": lambda: transformers.GPT2Config(**_common(n_embd=WIDTH, n_layer=3, n_head=4, n_positions=64)),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_common(
            hidden_size=WIDTH,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.5,
        )
    ),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_hf_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised model of ``family``, weights scaled up so that nonlinearities matter."""
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family]())
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return hf_model.to(dtype).eval()


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Model:
    return Model(tiny_hf_model(family, dtype, seed), char_tokenizer(), name=f"tiny-{family}")

"""A tiny random chat model (a character tokenizer with a chat template) and a tiny trait file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from circuitmap import Model
from helpers.models import VOCAB, WIDTH, char_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'][0] | upper }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
"""Each turn as ``S: …``, ``U: …`` or ``A: …`` on its own line; the answer starts after ``A:``."""


def chat_text(question: str, system: str | None = None) -> str:
    """What ``CHAT_TEMPLATE`` makes of a question, written out by hand."""
    return (f"S: {system}\n" if system is not None else "") + f"U: {question}\nA:"


def chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_hf_model(width: int = WIDTH, n_layers: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random Llama with room for chat prompts (256 positions), weights scaled up as ``tiny_hf_model``'s."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return hf_model.to(dtype).eval()


def chat_model(width: int = WIDTH, n_layers: int = 4, dtype: torch.dtype = torch.float32) -> Model:
    return Model(chat_hf_model(width, n_layers, dtype=dtype), chat_tokenizer(), name=f"tiny-chat-{width}")


TINY_TRAIT = {
    "instruction": [{"pos": "Be glad.", "neg": "Be sad."}, {"pos": "Smile!", "neg": "Frown."}],
    "questions": ["Hi?", "Rain?", "Cats?"],
    "eval_prompt": "Score {question} / {answer} from 0 to 100.",
    "assistant_names": {"pos": "glad", "neg": "sad"},
}


def write_trait(folder: Path, name: str = "glad", **fields) -> Path:
    """``TINY_TRAIT`` with ``fields`` changed (None removes one), as ``folder/name.json``."""
    data = {**TINY_TRAIT, **fields}
    path = folder / f"{name}.json"
    path.write_text(json.dumps({key: value for key, value in data.items() if value is not None}))
    return path

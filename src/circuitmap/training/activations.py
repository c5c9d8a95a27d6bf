"""From documents to MLP activation pairs: pack tokens into contexts, run the model, shuffle the pairs.

``pack_contexts`` joins tokenised documents (separated by the end-of-text token) and cuts the stream into
contexts of a fixed length, each starting with the beginning-of-text token when the tokenizer has one.
``collect_pairs`` runs batches of contexts once and returns every layer's (MLP input, MLP output) at every
position but the first, which mostly acts as an attention sink and has outsized activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model


def pack_contexts(documents: Iterable[str], tokenizer, context_length: int) -> Iterator[torch.Tensor]:
    """Fixed-length contexts of token ids ``[context_length]`` from a stream of documents."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [] if bos is None else [bos]
    body = context_length - len(prefix)
    if body < 1:
        raise CircuitmapError(f"context_length must be at least {len(prefix) + 1}, got {context_length}")
    buffer: list[int] = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False).input_ids
        buffer.extend(ids)
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= body:
            yield torch.tensor(prefix + buffer[:body], dtype=torch.long)
            del buffer[:body]


def collect_pairs(model: Model, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs ``[n_layers, batch·(T−1), d_model]`` of a batch of contexts ``[batch, T]``."""
    cache = model.activations(contexts.to(model.device), points=["mlp_in", "mlp_out"])
    layers = range(model.n_layers)
    inputs = torch.stack([cache["mlp_in", layer][:, 1:].reshape(-1, model.d_model) for layer in layers])
    outputs = torch.stack([cache["mlp_out", layer][:, 1:].reshape(-1, model.d_model) for layer in layers])
    return inputs, outputs

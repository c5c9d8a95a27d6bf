"""From documents to MLP activation pairs: pack tokens into contexts, run the model, shuffle the pairs.

``pack_contexts`` joins tokenised documents (separated by the end-of-text token) and cuts the stream into
contexts of a fixed length, each starting with the beginning-of-text token when the tokenizer has one.
``collect_pairs`` runs batches of contexts once and returns every layer's (MLP input, MLP output) at every
position but the first, which mostly acts as an attention sink and has outsized activations.
``ShuffleBuffer`` mixes pairs from many contexts before they reach a trainer.
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


def iter_pairs(
    model: Model, contexts: Iterable[torch.Tensor], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``collect_pairs`` over batches of ``batch_size`` contexts (a last, smaller batch included)."""
    batch: list[torch.Tensor] = []
    for context in contexts:
        batch.append(context)
        if len(batch) == batch_size:
            yield collect_pairs(model, torch.stack(batch))
            batch = []
    if batch:
        yield collect_pairs(model, torch.stack(batch))


class ShuffleBuffer:
    """Holds about ``capacity`` pairs and hands them out in random order, in batches.

    Pairs are stored as rows of ``[n_layers, 2, d_model]`` (input and output of every layer for one token),
    so that all layers of a token stay together. Taking a batch moves rows from the end into the holes it
    leaves, so each take costs the batch, not the buffer. The order is reproducible for a given ``seed``.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise CircuitmapError("the shuffle buffer needs a capacity of at least 1")
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.storage: torch.Tensor | None = None
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add pairs given as ``[n_layers, n, d_model]`` inputs and outputs."""
        rows = torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3).cpu()
        needed = self.count + len(rows)
        if self.storage is None or needed > len(self.storage):
            grown = torch.empty(max(needed, self.capacity + len(rows)), *rows.shape[1:], dtype=rows.dtype)
            if self.storage is not None:
                grown[: self.count] = self.storage[: self.count]
            self.storage = grown
        self.storage[self.count : needed] = rows
        self.count = needed

    def full(self) -> bool:
        return self.count >= self.capacity

    def take(self, batch_size: int) -> torch.Tensor:
        """Remove and return ``batch_size`` random rows ``[batch, n_layers, 2, d_model]`` (fewer if short)."""
        if self.count == 0:
            raise CircuitmapError("the shuffle buffer is empty")
        n = min(batch_size, self.count)
        taken = torch.randperm(self.count, generator=self.generator)[:n]
        batch = self.storage[taken].clone()
        tail_start = self.count - n
        tail = torch.arange(tail_start, self.count)
        movers = tail[~torch.isin(tail, taken)]
        holes = taken[taken < tail_start]
        self.storage[holes] = self.storage[movers]
        self.count = tail_start
        return batch


def shuffled_batches(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int, capacity: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Batches ``[batch, n_layers, 2, d_model]`` drawn at random from a buffer kept filled from ``pairs``."""
    buffer = ShuffleBuffer(capacity, seed)
    for inputs, outputs in pairs:
        buffer.add(inputs, outputs)
        while buffer.full():
            yield buffer.take(batch_size)
    while len(buffer):
        yield buffer.take(batch_size)

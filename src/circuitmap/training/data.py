"""Training data as numbered chunks of MLP activation pairs: reproducible, resumable and shardable.

Chunk ``c`` holds ``chunk_contexts`` contexts: contexts ``c·C … (c+1)·C − 1`` of the packed corpus, or
contexts the model samples with seeds derived from ``(seed, c, group)``. Its contexts are dealt round-robin
into ``groups``; each group's token pairs are shuffled with their own seeded permutation, and every batch
takes an equal slice from every group. A process of a distributed run collects and trains on its own groups
only, so N processes see exactly the batches of one, and a resumed run rebuilds just the chunk it stopped
in. Pairs are held (and cached) in bfloat16: ``[tokens, L, 2, d]`` with the MLP input at 0 and output at 1.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.models.generation import (
    bfloat16_unembedding,
    generate_ids,
    preallocated_cache,
    sampling_generator,
)
from circuitmap.training.activations import collect_pairs, pack_contexts
from circuitmap.training.corpus import iter_documents

PAIR_DTYPE = torch.bfloat16
Progress = Callable[[int], None]
CACHE_FORMAT = 2
SAMPLER_VERSION = 2
"""Bumped whenever the sampler writes other text for the same seed (it is part of the source's identity)."""


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (so chunks and groups draw independent streams)."""
    digest = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class CorpusContexts:
    """Contexts of a packed document stream, addressed by chunk; reading on from where it last was."""

    def __init__(
        self, documents: Callable[[], Iterable[str]], tokenizer, context_length: int, description: str
    ):
        self._documents = documents
        self._tokenizer = tokenizer
        self._context_length = context_length
        self.description = description
        self._stream: Iterator[torch.Tensor] | None = None
        self._position = 0
        self._last: tuple[int, int, torch.Tensor | None] | None = None

    @classmethod
    def from_sources(
        cls, tokenizer, sources: list[str], context_length: int, text_field: str = "text"
    ) -> CorpusContexts:
        """Contexts of the documents of corpus ``sources`` (files, folders, globs, ``hf:`` datasets)."""
        description = "corpus:" + "|".join(sources) + f":{text_field}"
        return cls(lambda: iter_documents(sources, text_field), tokenizer, context_length, description)

    def _restart(self) -> None:
        self._stream = pack_contexts(self._documents(), self._tokenizer, self._context_length)
        self._position = 0

    def chunk(self, index: int, size: int) -> torch.Tensor | None:
        """Contexts ``[≤ size, T]`` of chunk ``index``; None once the corpus has run out before it."""
        if self._last is not None and self._last[:2] == (index, size):
            return self._last[2]
        if self._stream is None or self._position > index * size:
            self._restart()
        while self._position < index * size:
            if next(self._stream, None) is None:
                self._last = (index, size, None)
                return None
            self._position += 1
        contexts = []
        for context in self._stream:
            contexts.append(context)
            self._position += 1
            if len(contexts) == size:
                break
        result = torch.stack(contexts) if contexts else None
        self._last = (index, size, result)
        return result

    def group(self, index: int, size: int, group: int, groups: int) -> torch.Tensor | None:
        contexts = self.chunk(index, size)
        if contexts is None or len(contexts) <= group:
            return None
        return contexts[group::groups]

    def heldout(self, first_chunk: int, chunk_contexts: int, count: int) -> Iterator[torch.Tensor]:
        """Up to ``count`` contexts from chunk ``first_chunk`` on: text the training run never saw."""
        index = first_chunk
        while count > 0:
            contexts = self.chunk(index, chunk_contexts)
            if contexts is None:
                return
            yield from contexts[:count]
            count -= len(contexts)
            index += 1


class SampledContexts:
    """Contexts the model writes itself from its beginning-of-text token: the default with no corpus."""

    def __init__(
        self, model: Model, context_length: int, seed: int, batch_size: int = 256, temperature: float = 1.0
    ):
        self.model = model
        self.context_length = context_length
        self.seed = seed
        self.batch_size = batch_size
        self.temperature = temperature
        self.description = f"sampled:v{SAMPLER_VERSION}:seed={seed}:temperature={temperature}"

    def _sample(self, index: int, size: int, group: int, groups: int, with_pairs: bool, progress=None):
        seed = derived_seed(self.seed, index, group)
        length, batch, temperature = self.context_length, self.batch_size, self.temperature
        return sample_contexts(
            self.model, size // groups, length, seed, batch, temperature, with_pairs, progress=progress
        )

    def group(self, index: int, size: int, group: int, groups: int) -> torch.Tensor:
        return self._sample(index, size, group, groups, with_pairs=False)

    def group_pairs(
        self, index: int, size: int, group: int, groups: int, progress: Progress | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The contexts of a group and their pairs, captured while sampling them (the contexts are those
        ``group`` gives)."""
        return self._sample(index, size, group, groups, with_pairs=True, progress=progress)

    def heldout(self, first_chunk: int, chunk_contexts: int, count: int) -> Iterator[torch.Tensor]:
        """``count`` contexts sampled with a seed no training chunk uses."""
        seed = derived_seed(self.seed, first_chunk, -1)
        length, batch, temperature = self.context_length, self.batch_size, self.temperature
        yield from sample_contexts(self.model, count, length, seed, batch, temperature)


@torch.no_grad()
def sample_contexts(
    model: Model,
    count: int,
    length: int,
    seed: int,
    batch_size: int = 64,
    temperature: float = 1.0,
    with_pairs: bool = False,
    *,
    progress: Progress | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``count`` contexts ``[count, length]``: BOS (or EOS) then tokens sampled one at a time with a KV cache,
    ``batch_size`` contexts side by side (wide batches keep the matrix products efficient; the logits are
    computed with ``bfloat16_unembedding``). ``progress(n)`` is told of every ``n`` tokens written.

    With ``with_pairs`` the MLP pairs of every position but the first are captured while sampling (the
    forward passes that choose the tokens are the ones that read them), saving a second pass over the text;
    they come back as ``[count·(length − 1), L, 2, d]``. The sampler has its own generator: the same seed
    gives the same contexts whatever else draws random numbers, and the caller's random state is untouched.
    """
    start = model.tokenizer.bos_token_id
    if start is None:
        start = model.tokenizer.eos_token_id
    if start is None:
        raise CircuitmapError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    generator = sampling_generator(model.device, seed)
    n_layers, d_model = model.n_layers, model.d_model
    contexts = torch.empty(count, length, dtype=torch.long)
    pairs = torch.empty(count if with_pairs else 0, length - 1, n_layers, 2, d_model, dtype=PAIR_DTYPE)
    for first in range(0, count, batch_size):
        rows = slice(first, min(first + batch_size, count))
        starts = torch.full((rows.stop - first, 1), start, dtype=torch.long, device=model.device)
        contexts[rows] = _sample_batch(model, starts, length, temperature, generator, pairs[rows], progress)
    return (contexts, pairs.flatten(0, 1)) if with_pairs else contexts


def _sample_batch(
    model: Model,
    starts: torch.Tensor,
    length: int,
    temperature: float,
    generator: torch.Generator,
    pairs: torch.Tensor,
    progress: Progress | None,
) -> torch.Tensor:
    """Contexts ``[n, length]`` continuing ``starts`` ``[n, 1]``. When ``pairs`` ``[n, length − 1, L, 2, d]``
    is not empty it is filled with the MLP pairs of every position but the first, read from the forward
    passes that choose the tokens."""
    with_pairs = len(pairs) > 0

    def after_forward(position: int) -> None:
        if with_pairs and position > 0:
            for layer in range(model.n_layers):
                pairs[:, position - 1, layer, 0] = cache["mlp_in", layer][:, -1]
                pairs[:, position - 1, layer, 1] = cache["mlp_out", layer][:, -1]
        if progress is not None and position < length - 1:
            progress(len(starts))

    with (
        model.capturing(["mlp_in", "mlp_out"] if with_pairs else []) as cache,
        bfloat16_unembedding(model.hf_model),
    ):
        new = generate_ids(
            model.hf_model,
            starts,
            length - 1,
            greedy=False,
            temperature=temperature,
            generator=generator,
            feed_last=with_pairs,
            after_forward=after_forward,
            cache=preallocated_cache(model.hf_model, length),
        )
    return torch.cat([starts, new], dim=1).cpu()


class ActivationCache:
    """Shards of pairs on disk, one ``.npy`` file per (chunk, group), read back memory-mapped, each beside the
    token ids of its contexts (written first, so that a shard's pairs never exist without them).

    A shard is written to a temporary name and renamed into place, so an interrupted or failed write (a full
    disk) never leaves a file that looks complete. The folder is keyed by everything that decides the
    pairs, so runs of the same model and corpus share it and different ones never mix.
    """

    def __init__(self, root: str | Path, identity: dict):
        key = hashlib.sha256(
            json.dumps({**identity, "format": CACHE_FORMAT}, sort_keys=True).encode()
        ).hexdigest()
        self.folder = Path(root).expanduser() / key[:16]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            info = self.folder / "identity.json"
            if not info.exists():
                info.write_text(json.dumps(identity, indent=2, sort_keys=True))
        except OSError as error:
            raise CircuitmapError(
                f"cannot create the activation cache {self.folder}: {error.strerror}"
            ) from None

    def _path(self, chunk: int, group: int, role: str = "pairs") -> Path:
        suffix = "" if role == "pairs" else f"_{role}"
        return self.folder / f"chunk{chunk:06d}_group{group:04d}{suffix}.npy"

    def load(self, chunk: int, group: int) -> torch.Tensor | None:
        """Pairs ``[tokens, L, 2, d]`` of a shard, or None when it is not cached."""
        path = self._path(chunk, group)
        if not path.exists():
            return None
        array = np.load(path, mmap_mode="r")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array).view(PAIR_DTYPE)

    def load_contexts(self, chunk: int, group: int) -> torch.Tensor | None:
        """Token ids ``[contexts, T]`` of a cached shard, or None when it is not cached."""
        if not self._path(chunk, group).exists():
            return None
        return torch.from_numpy(np.load(self._path(chunk, group, "contexts")).astype(np.int64))

    def store(self, chunk: int, group: int, contexts: torch.Tensor, pairs: torch.Tensor) -> None:
        """Keep a shard: the token ids of its contexts, then their pairs."""
        self._write(self._path(chunk, group, "contexts"), contexts.numpy().astype(np.int32))
        self._write(self._path(chunk, group), pairs.view(torch.int16).numpy())

    def _write(self, path: Path, array: np.ndarray) -> None:
        def write(temporary: Path) -> None:
            with temporary.open("wb") as handle:
                np.save(handle, array, allow_pickle=False)

        try:
            atomic_write(path, write)
        except OSError as error:
            reason = error.strerror or str(error)
            raise CircuitmapError(f"cannot write the activation cache in {self.folder}: {reason}") from None


def model_identity(model: Model) -> dict:
    """What distinguishes one model's activations from another's: name, shape and a digest of its weights."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.hf_model.named_parameters())[:8]:
        digest.update(name.encode())
        digest.update(parameter.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return {
        "model": model.name,
        "layers": model.n_layers,
        "d_model": model.d_model,
        "weights": digest.hexdigest(),
    }


class PairChunks:
    """The pairs of each chunk for this process's groups, collected from the model or read from a cache."""

    def __init__(
        self,
        model: Model,
        contexts: CorpusContexts | SampledContexts,
        *,
        chunk_contexts: int,
        groups: int,
        local_groups: list[int],
        model_batch_size: int,
        cache: ActivationCache | None = None,
        progress: Progress | None = None,
    ):
        self.model = model
        self.contexts = contexts
        self.chunk_contexts = chunk_contexts
        self.groups = groups
        self.local_groups = local_groups
        self.model_batch_size = model_batch_size
        self.cache = cache
        self.progress = progress
        """Told of every ``n`` tokens the model reads or writes while collecting."""

    def _collect(self, contexts: torch.Tensor) -> torch.Tensor:
        parts = []
        for first in range(0, len(contexts), self.model_batch_size):
            batch = contexts[first : first + self.model_batch_size]
            inputs, outputs = collect_pairs(self.model, batch)
            parts.append(torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3).to(PAIR_DTYPE).cpu())
            if self.progress is not None:
                self.progress(batch[:, 1:].numel())
        return torch.cat(parts)

    def group_pairs(self, chunk: int, group: int) -> torch.Tensor | None:
        """Pairs ``[tokens, L, 2, d]`` of one group of a chunk; None when the source has run out."""
        if self.cache is not None:
            cached = self.cache.load(chunk, group)
            if cached is not None:
                return cached
        if isinstance(self.contexts, SampledContexts):
            contexts, pairs = self.contexts.group_pairs(
                chunk, self.chunk_contexts, group, self.groups, self.progress
            )
        else:
            contexts = self.contexts.group(chunk, self.chunk_contexts, group, self.groups)
            if contexts is None:
                return None
            pairs = self._collect(contexts)
        if self.cache is not None:
            self.cache.store(chunk, group, contexts, pairs)
        return pairs

    def chunk(self, index: int) -> list[torch.Tensor] | None:
        """Pairs of this process's groups of chunk ``index``; None when any of them has run out."""
        pairs = [self.group_pairs(index, group) for group in self.local_groups]
        return None if any(p is None for p in pairs) else pairs


def group_batches(
    pairs: list[torch.Tensor],
    per_group: int,
    steps: int,
    chunk: int,
    seed: int,
    local_groups: list[int],
    start: int = 0,
) -> Iterator[torch.Tensor]:
    """Local batches ``start … steps − 1`` of a chunk: a slice of every local group's seeded permutation."""
    orders = [
        torch.randperm(len(p), generator=torch.Generator().manual_seed(derived_seed(seed, chunk, group)))
        for p, group in zip(pairs, local_groups, strict=True)
    ]
    for step in range(start, steps):
        window = slice(step * per_group, (step + 1) * per_group)
        yield torch.cat([p[order[window]] for p, order in zip(pairs, orders, strict=True)])

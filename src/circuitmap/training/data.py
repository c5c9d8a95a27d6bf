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
from circuitmap.models.generation import generate_ids, sampling_generator
from circuitmap.training.activations import collect_pairs, pack_contexts
from circuitmap.training.corpus import iter_documents

PAIR_DTYPE = torch.bfloat16
CACHE_FORMAT = 1


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
        self, model: Model, context_length: int, seed: int, batch_size: int = 64, temperature: float = 1.0
    ):
        self.model = model
        self.context_length = context_length
        self.seed = seed
        self.batch_size = batch_size
        self.temperature = temperature
        self.description = f"sampled:seed={seed}:temperature={temperature}"

    def _sample(self, index: int, size: int, group: int, groups: int, with_pairs: bool):
        seed = derived_seed(self.seed, index, group)
        length, batch, temperature = self.context_length, self.batch_size, self.temperature
        return sample_contexts(self.model, size // groups, length, seed, batch, temperature, with_pairs)

    def group(self, index: int, size: int, group: int, groups: int) -> torch.Tensor:
        return self._sample(index, size, group, groups, with_pairs=False)

    def group_pairs(self, index: int, size: int, group: int, groups: int) -> torch.Tensor:
        """The pairs of a group, captured while sampling it (the same contexts as ``group`` gives)."""
        return self._sample(index, size, group, groups, with_pairs=True)[1]

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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``count`` contexts ``[count, length]``: BOS (or EOS) then tokens sampled one at a time with a KV cache.

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
    all_ids, all_pairs = [], []
    for first in range(0, count, batch_size):
        starts = torch.full((min(batch_size, count - first), 1), start, dtype=torch.long, device=model.device)
        ids, pairs = _sample_batch(model, starts, length, temperature, generator, with_pairs)
        all_ids.append(ids)
        all_pairs.append(pairs)
    contexts = torch.cat(all_ids)
    return (contexts, torch.cat(all_pairs)) if with_pairs else contexts


def _sample_batch(
    model: Model,
    starts: torch.Tensor,
    length: int,
    temperature: float,
    generator: torch.Generator,
    with_pairs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Contexts ``[n, length]`` continuing ``starts`` ``[n, 1]``, and with ``with_pairs`` the MLP pairs of
    every position but the first, read from the forward passes that choose the tokens."""
    pairs = []

    def keep_pairs(position: int) -> None:
        if position > 0:
            step = [torch.cat([cache["mlp_in", i], cache["mlp_out", i]], 1) for i in range(model.n_layers)]
            pairs.append(torch.stack(step, dim=1).to(PAIR_DTYPE).cpu())

    with model.capturing(["mlp_in", "mlp_out"] if with_pairs else []) as cache:
        new = generate_ids(
            model.hf_model,
            starts,
            length - 1,
            greedy=False,
            temperature=temperature,
            generator=generator,
            feed_last=with_pairs,
            after_forward=keep_pairs if with_pairs else None,
        )
    ids = torch.cat([starts, new], dim=1).cpu()
    return ids, torch.stack(pairs, dim=1).flatten(0, 1) if with_pairs else None


class ActivationCache:
    """Shards of pairs on disk, one ``.npy`` file per (chunk, group), read back memory-mapped.

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

    def _path(self, chunk: int, group: int) -> Path:
        return self.folder / f"chunk{chunk:06d}_group{group:04d}.npy"

    def load(self, chunk: int, group: int) -> torch.Tensor | None:
        path = self._path(chunk, group)
        if not path.exists():
            return None
        array = np.load(path, mmap_mode="r")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array).view(PAIR_DTYPE)

    def store(self, chunk: int, group: int, pairs: torch.Tensor) -> None:
        array = pairs.view(torch.int16).numpy()

        def write(temporary: Path) -> None:
            with temporary.open("wb") as handle:
                np.save(handle, array, allow_pickle=False)

        try:
            atomic_write(self._path(chunk, group), write)
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
    ):
        self.model = model
        self.contexts = contexts
        self.chunk_contexts = chunk_contexts
        self.groups = groups
        self.local_groups = local_groups
        self.model_batch_size = model_batch_size
        self.cache = cache

    def _collect(self, contexts: torch.Tensor) -> torch.Tensor:
        parts = []
        for first in range(0, len(contexts), self.model_batch_size):
            inputs, outputs = collect_pairs(self.model, contexts[first : first + self.model_batch_size])
            parts.append(torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3).to(PAIR_DTYPE).cpu())
        return torch.cat(parts)

    def group_pairs(self, chunk: int, group: int) -> torch.Tensor | None:
        """Pairs ``[tokens, L, 2, d]`` of one group of a chunk; None when the source has run out."""
        if self.cache is not None:
            cached = self.cache.load(chunk, group)
            if cached is not None:
                return cached
        if isinstance(self.contexts, SampledContexts):
            pairs = self.contexts.group_pairs(chunk, self.chunk_contexts, group, self.groups)
        else:
            contexts = self.contexts.group(chunk, self.chunk_contexts, group, self.groups)
            if contexts is None:
                return None
            pairs = self._collect(contexts)
        if self.cache is not None:
            self.cache.store(chunk, group, pairs)
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

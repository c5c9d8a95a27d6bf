"""The one generation loop: every row of a batch continued token by token through the model's KV cache.

``Model.generate`` uses it as it is; ``generate_with`` runs it with an intervention's edits in place; the
training sampler runs it on a batch of beginning-of-text tokens and reads the MLPs while it writes. Each
forward pass feeds what the cache does not hold yet (the prompt first, then one new token per row), and
``before_forward(start)`` / ``after_forward(start)`` are called around it with the position of its first
token, for hooks that act at absolute positions or read what the pass computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticCache

from circuitmap.errors import CircuitmapError
from circuitmap.hardware import native_bfloat16
from circuitmap.validation import check_number, check_seed

PositionCallback = Callable[[int], None]


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A private random generator for sampling: seeded when ``seed`` is given, else from system entropy. The
    caller's global random state is never touched."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(check_seed("the seed", seed))
    return generator


def stop_ids(hf_model, tokenizer) -> frozenset[int]:
    """Token ids that end a continuation, as the model's generation config (else its tokenizer) names them."""
    config = getattr(hf_model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


NOT_FINITE = "the model's output became NaN or infinite: an edit or steering vector too large?"


def next_tokens(
    logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of every row ``[B, 1]`` from last-position logits ``[B, vocab]``; a one-line error when
    they are not finite (an edit or steering vector too large)."""
    if greedy:
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise CircuitmapError(NOT_FINITE)
        return logits.argmax(-1, keepdim=True)
    masses = logits.to(torch.float32, copy=True)  # worked on in place: one vocabulary-sized buffer a step
    if temperature != 1:
        masses.div_(temperature)
    return draw(masses.sub_(masses.amax(-1, keepdim=True)).exp_(), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None, block: int = 256) -> torch.Tensor:
    """One token per row ``[B, 1]`` of probabilities ``[B, vocab]`` (or masses proportional to them), by
    inverting the cumulative distribution at one uniform number per row: first among blocks of ``block``
    tokens (block sums in float64), then within the chosen block. It costs a pass over the vocabulary instead
    of a random number per token, which is most of the cost of sampling wide batches on a CPU. Tokens of
    mass zero are never drawn; masses that are not finite (from NaN or infinite logits) raise the one-line
    error."""
    rows, vocab = probs.shape
    blocks = (nn.functional.pad(probs, (0, -vocab % block)) if vocab % block else probs).view(rows, -1, block)
    block_masses = blocks.sum(-1).double()
    cumulative = block_masses.cumsum(-1)
    totals = cumulative[:, -1:]
    if not bool(torch.isfinite(totals).all()):
        raise CircuitmapError(NOT_FINITE)
    target = torch.rand(totals.shape, generator=generator, device=probs.device, dtype=torch.float64) * totals
    chosen = torch.minimum(torch.searchsorted(cumulative, target, right=True), _last_positive(block_masses))
    within = blocks.gather(1, chosen[..., None].expand(-1, -1, block))[:, 0]
    remainder = target - (cumulative.gather(1, chosen) - block_masses.gather(1, chosen))
    offset = torch.searchsorted(within.double().cumsum(-1), remainder, right=True)
    return chosen * block + torch.minimum(offset, _last_positive(within))


def _last_positive(values: torch.Tensor) -> torch.Tensor:
    """Index ``[B, 1]`` of the last positive entry of each row (where its running count of them peaks)."""
    return (values > 0).long().cumsum(-1).argmax(-1, keepdim=True)


def preallocated_cache(hf_model, length: int) -> Cache | None:
    """An empty KV cache of ``length`` positions allocated once (appending to a growing cache copies it at
    every step, which dominates sampling wide batches on a CPU); None where the model's layers have no static
    cache."""
    try:
        return StaticCache(config=hf_model.config, max_cache_len=length)
    except (ValueError, TypeError, NotImplementedError, KeyError):
        return None


@contextmanager
def bfloat16_unembedding(hf_model) -> Iterator[None]:
    """Context: a float32 model computes its logits with a bfloat16 copy of the unembedding (results in
    float32), where the hardware multiplies bfloat16 natively. Only the choice of sampled tokens sees the
    change (logits differ by about 1e-2); the layers, and so the activations read while sampling, are
    untouched; the logits come out in bfloat16. Elsewhere, or for other dtypes, nothing changes."""
    unembedding = hf_model.get_output_embeddings()
    weight = getattr(unembedding, "weight", None)
    if not (
        isinstance(unembedding, nn.Linear)
        and weight is not None
        and weight.dtype == torch.float32
        and native_bfloat16(weight.device)
    ):
        yield
        return
    hf_model.set_output_embeddings(_BFloat16Linear(unembedding))
    try:
        yield
    finally:
        hf_model.set_output_embeddings(unembedding)


class _BFloat16Linear(nn.Module):
    """A linear map applied in bfloat16 (its outputs stay in bfloat16: sampling reads them in float32)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden.to(torch.bfloat16), self.weight, self.bias)


@torch.no_grad()
def generate_ids(
    hf_model,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    stop: frozenset[int] = frozenset(),
    feed_last: bool = False,
    before_forward: PositionCallback | None = None,
    after_forward: PositionCallback | None = None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """New token ids ``[B, n]`` continuing each row of ``ids`` ``[B, T]``, ``n ≤ max_new_tokens``.

    Greedy by default, else sampled at ``temperature`` with ``generator``. It ends early once every row has
    produced a token of ``stop`` (rows that stopped go on, and their caller trims them). With ``feed_last``
    the last new token is fed too, so that ``after_forward`` sees every position. ``cache`` is an empty KV
    cache to fill (e.g. ``preallocated_cache``); by default the model grows one as it goes.
    """
    if max_new_tokens < 1:
        raise CircuitmapError("max_new_tokens must be at least 1")
    if not greedy:
        check_number("the temperature", temperature, low=0, low_open=True)

    def forward(tokens: torch.Tensor, start: int):
        nonlocal cache
        if before_forward is not None:
            before_forward(start)
        output = hf_model(input_ids=tokens, cache=cache, use_cache=True)
        if after_forward is not None:
            after_forward(start)
        cache = output.cache
        return output.logits[:, -1]

    logits = forward(ids, 0)
    position = ids.shape[1]
    stops = torch.tensor(sorted(stop), dtype=ids.dtype, device=ids.device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    new = []
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, greedy, temperature, generator)
        new.append(tokens)
        done |= torch.isin(tokens[:, 0], stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            if feed_last:
                forward(tokens, position)
            break
        logits = forward(tokens, position)
        position += 1
    return torch.cat(new, dim=1)

"""The one generation loop: every row of a batch continued token by token through the model's KV cache.

``Model.generate`` uses it as it is; ``generate_with`` runs it with an intervention's edits in place; the
training sampler runs it on a batch of beginning-of-text tokens and reads the MLPs while it writes. Each
forward pass feeds what the cache does not hold yet (the prompt first, then one new token per row), and
``before_forward(start)`` / ``after_forward(start)`` are called around it with the position of its first
token, for hooks that act at absolute positions or read what the pass computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from circuitmap.errors import CircuitmapError
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


def next_tokens(
    logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of every row ``[B, 1]`` from last-position logits ``[B, vocab]``; a one-line error when
    they are not finite (an edit or steering vector too large)."""
    logits = logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise CircuitmapError("the model's output became NaN or infinite: an edit or vector too large?")
    if greedy:
        return logits.argmax(-1, keepdim=True)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)


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
) -> torch.Tensor:
    """New token ids ``[B, n]`` continuing each row of ``ids`` ``[B, T]``, ``n ≤ max_new_tokens``.

    Greedy by default, else sampled at ``temperature`` with ``generator``. It ends early once every row has
    produced a token of ``stop`` (rows that stopped go on, and their caller trims them). With ``feed_last``
    the last new token is fed too, so that ``after_forward`` sees every position.
    """
    if max_new_tokens < 1:
        raise CircuitmapError("max_new_tokens must be at least 1")
    if not greedy:
        check_number("the temperature", temperature, low=0, low_open=True)
    cache = None

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

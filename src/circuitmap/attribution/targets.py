"""What an attribution graph explains: its targets, each a read-out vector at the last position.

- salient logits (the default): the most likely next tokens, at most ``max_n_logits``, until their cumulative
  probability reaches ``desired_logit_prob``, weighted by their probabilities (renormalised to sum to 1);
- explicit tokens: ``"Paris"`` or a token id; the de-meaned logit ``logit_t − mean_v logit_v``;
- a logit difference: ``("Paris", "London")`` means ``logit(Paris) − logit(London)``;
- a named residual-stream direction: ``Direction("formality", vector)``, read from the residual stream
  entering the final norm.
Logit targets read the final norm's output through the unembedding (before any logit soft-capping).
Explicit targets are weighted equally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitmap.attribution.config import AttributionConfig
from circuitmap.errors import CircuitmapError
from circuitmap.models import Model


@dataclass(frozen=True)
class Direction:
    """A named direction in the residual stream, used as an attribution target."""

    name: str
    vector: torch.Tensor


TargetSpec = str | int | tuple[str | int, str | int] | Direction


@dataclass
class Target:
    """A resolved target: ``vector · x + offset`` with ``x`` read at ``point`` (``final_norm`` or
    ``resid_final``) at the last position; ``offset`` is the unembedding bias's share, if any."""

    name: str
    vector: torch.Tensor
    point: str
    weight: float
    prob: float
    token_id: int = -1
    offset: float = 0.0


def token_id(model: Model, token: str | int) -> int:
    """The id of a single token given as text or id; a clear error when the text is several tokens."""
    if isinstance(token, int):
        if not 0 <= token < model.d_vocab:
            raise CircuitmapError(
                f"target token id {token} is outside the vocabulary (0..{model.d_vocab - 1})"
            )
        return token
    ids = model.tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = model.token_strings(torch.tensor(ids))
        raise CircuitmapError(f"target {token!r} is not a single token: it tokenises as {pieces}")
    return int(ids[0])


def _demeaned_row(unembedding: torch.Tensor, index: int) -> torch.Tensor:
    return unembedding[index] - unembedding.mean(0)


def _bias_offset(model: Model, plus: int, minus: int | None = None) -> float:
    """The unembedding bias's part of a de-meaned logit (``minus=None``) or of a logit difference."""
    bias = model.unembedding_bias
    if bias is None:
        return 0.0
    bias = bias.detach().double()
    return float(bias[plus] - (bias.mean() if minus is None else bias[minus]))


def salient_logits(
    model: Model, logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float
) -> list[Target]:
    """The most likely next tokens until their cumulative probability reaches ``desired_logit_prob``."""
    probs = logits.double().softmax(-1)
    top_probs, top_ids = probs.topk(min(max_n_logits, probs.numel()))
    cumulative = top_probs.cumsum(0)
    count = int((cumulative < desired_logit_prob).sum()) + 1
    top_probs, top_ids = top_probs[:count], top_ids[:count]
    total = float(top_probs.sum())
    unembedding = model.unembedding.detach()
    return [
        Target(
            name=model.token_text(int(i)),
            vector=_demeaned_row(unembedding, int(i)),
            point="final_norm",
            weight=float(p) / total,
            prob=float(p),
            token_id=int(i),
            offset=_bias_offset(model, int(i)),
        )
        for p, i in zip(top_probs, top_ids, strict=True)
    ]


def resolve_targets(
    model: Model,
    logits: torch.Tensor,
    targets: Sequence[TargetSpec] | None,
    config: AttributionConfig | None = None,
) -> list[Target]:
    """Turn the user's target specs (None: the salient logits ``config`` asks for) into read-out vectors.

    ``logits`` are the last position's logits (before any soft-capping), used for probabilities.
    """
    if targets is None:
        config = config or AttributionConfig()
        return salient_logits(model, logits, config.max_n_logits, config.desired_logit_prob)
    if isinstance(targets, (str, int, tuple, Direction)):
        targets = [targets]
    if not targets:
        raise CircuitmapError("no targets given")
    probs = logits.double().softmax(-1)
    unembedding = model.unembedding.detach()
    weight = 1.0 / len(targets)
    resolved = []
    for spec in targets:
        if isinstance(spec, Direction):
            vector = spec.vector.detach().to(device=unembedding.device, dtype=unembedding.dtype).reshape(-1)
            if vector.numel() != model.d_model:
                raise CircuitmapError(
                    f"direction {spec.name!r} has {vector.numel()} entries; "
                    f"the model's width is {model.d_model}"
                )
            if not bool(torch.isfinite(vector).all()):
                raise CircuitmapError(f"direction {spec.name!r} has NaN or infinite entries")
            resolved.append(Target(spec.name, vector, "resid_final", weight, float("nan")))
        elif isinstance(spec, tuple):
            if len(spec) != 2:
                raise CircuitmapError(f"a logit difference is a pair of tokens, got {spec!r}")
            first, second = (token_id(model, t) for t in spec)
            name = f"{model.token_text(first)} − {model.token_text(second)}"
            vector = unembedding[first] - unembedding[second]
            offset = _bias_offset(model, first, second)
            resolved.append(Target(name, vector, "final_norm", weight, float("nan"), offset=offset))
        elif isinstance(spec, (str, int)):
            index = token_id(model, spec)
            resolved.append(
                Target(
                    model.token_text(index),
                    _demeaned_row(unembedding, index),
                    "final_norm",
                    weight,
                    float(probs[index]),
                    token_id=index,
                    offset=_bias_offset(model, index),
                )
            )
        else:
            raise CircuitmapError(
                f"cannot use {spec!r} as a target: give a token, a pair of tokens or a Direction"
            )
    return resolved

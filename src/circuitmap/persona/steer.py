"""Steering along a persona vector, projections on it, and flagging data that would move a model along it.

**Steering** adds ``coefficient × vector`` to the residual stream entering ``layer`` (``resid_pre``), the
edit ``Model.add_to_residual`` and a ``ResidualEdit`` make. With ``relative=True`` the coefficient is a
multiple of the layer's typical residual norm instead: the vector is scaled to unit length and then to
``coefficient ×`` the median norm of the residual entering ``layer`` over the prompt's tokens, measured on
the unsteered model. ``positions="all"`` steers every position; ``positions="response"`` steers the prompt's
last token and every token after it (the positions whose outputs are the answer), as the reference's
response steering does. ``steer`` returns a handle that keeps the edit until ``remove()`` (``steering`` is
its context-manager twin); generation through the KV cache must tell it where each forward pass starts
(``model.generate(..., before_forward=handle.at_position)``), as for ``patch_edits``.

**Projection** of a response on a vector: the residual entering ``layer`` at each response token, dotted
with the unit vector; their mean is the response's projection (the projection of its mean activation).

**Projection difference** of a (prompt, response) sample, as the paper flags training data: the projection
of the given response minus the projection of the model's own answer to the same prompt. A large positive
difference means the sample pulls the model along the vector, more than what it says by itself. The cheap
approximation (``approximate=True``) replaces the model's own answer by the projection at the prompt's last
token, where the model is about to answer, and needs no generation. ``rank_samples`` sorts samples by
difference, the most trait-inducing first.

**Fine-tuning shift** of a model along a vector, as the paper measures what training did: the mean over
prompts of the tuned model's residual minus the base model's, at the prompt's last token (or averaged over
a given response's tokens), dotted with the unit vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.persona.runs import chat_ids, generate_answers, read_residuals, response_ids
from circuitmap.persona.vectors import PersonaVector
from circuitmap.validation import check_number

POSITIONS = ("all", "response")


def layer_direction(model: Model, vector: PersonaVector | torch.Tensor, layer: int) -> torch.Tensor:
    """The direction of ``layer`` as a float64 tensor ``[d_model]``, checked against the model."""
    if not 0 <= layer < model.n_layers:
        raise CircuitmapError(f"layer {layer} is out of range (0..{model.n_layers - 1})")
    if isinstance(vector, PersonaVector):
        vector.check_model(model)
        direction = vector.layer(layer)
    else:
        direction = torch.as_tensor(vector).detach().reshape(-1)
        if direction.numel() != model.d_model:
            raise CircuitmapError(
                f"the vector has {direction.numel()} entries; the model's width is {model.d_model}"
            )
    direction = direction.to("cpu", torch.float64)
    if not bool(torch.isfinite(direction).all()):
        raise CircuitmapError("the vector has NaN or infinite entries")
    return direction


def unit_direction(model: Model, vector: PersonaVector | torch.Tensor, layer: int) -> torch.Tensor:
    """``layer_direction`` scaled to unit length; a one-line error for a zero vector."""
    direction = layer_direction(model, vector, layer)
    norm = float(direction.norm())
    if norm == 0:
        raise CircuitmapError(f"the vector of layer {layer} is zero: it has no direction")
    return direction / norm


def prompt_ids(model: Model, prompt: str | torch.Tensor, system: str | None = None) -> torch.Tensor:
    """A prompt's ids ``[T]``: a string is the user's turn in the chat template, ids are taken as they are."""
    if isinstance(prompt, str):
        return chat_ids(model, prompt, system)
    ids = torch.as_tensor(prompt).reshape(-1).to("cpu", torch.long)
    if len(ids) == 0:
        raise CircuitmapError("the prompt is empty")
    return ids


def typical_norm(model: Model, layer: int, prompt: str | torch.Tensor) -> float:
    """The median norm of the residual entering ``layer`` over the tokens of ``prompt`` (text or ids, as
    ``Model.encode`` reads them), on the unsteered model."""
    residual = model.activations(prompt, ["resid_pre"])["resid_pre", layer][0]
    return float(residual.double().norm(dim=-1).median())


class SteeringHandle:
    """A steering edit on a model until ``remove()``; also a context manager that removes it on exit.

    ``at_position(start)`` tells it where the next forward pass starts, for passes that feed only new tokens
    through a KV cache. ``delta`` is what is added to each steered position, ``start`` the first one."""

    def __init__(self, model: Model, layer: int, delta: torch.Tensor, start: int):
        self.layer = layer
        self.delta = delta
        self.start = start
        self.offset = 0
        self._hooks = model.add_hooks(("resid_pre", layer, self._add))

    def _add(self, resid: torch.Tensor) -> torch.Tensor | None:
        first = max(self.start - self.offset, 0)
        if first >= resid.shape[1]:
            return None
        delta = self.delta.to(device=resid.device, dtype=resid.dtype)
        if first == 0:
            return resid + delta
        resid = resid.clone()
        resid[:, first:] += delta
        return resid

    def at_position(self, start: int) -> None:
        self.offset = start

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def steer(
    model: Model,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    coefficient: float,
    positions: str = "all",
    relative: bool = False,
    prompt: str | torch.Tensor | None = None,
) -> SteeringHandle:
    """Add ``coefficient × vector`` (with ``relative``, ``coefficient ×`` the typical residual norm along the
    unit vector) to the residual entering ``layer`` at ``positions`` until the handle is removed.
    ``prompt`` (text or ids, as ``Model.encode`` and ``Model.generate`` read them: use ``chat_ids`` for a chat
    turn) is needed for ``relative`` and for ``positions="response"``."""
    check_number("the steering coefficient", coefficient)
    if positions not in POSITIONS:
        raise CircuitmapError(f"steering positions are {' or '.join(POSITIONS)}, not {positions!r}")
    if prompt is None and (relative or positions == "response"):
        raise CircuitmapError("relative steering and response positions need the prompt the model will read")
    if relative:
        unit = unit_direction(model, vector, layer)
        delta = coefficient * typical_norm(model, layer, prompt) * unit
    else:
        delta = coefficient * layer_direction(model, vector, layer)
    start = 0 if positions == "all" else model.encode(prompt).shape[1] - 1
    return SteeringHandle(model, layer, delta, start)


@contextmanager
def steering(
    model: Model,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    coefficient: float,
    positions: str = "all",
    relative: bool = False,
    prompt: str | torch.Tensor | None = None,
) -> Iterator[SteeringHandle]:
    """Context: ``steer`` on entry, the edit removed on exit."""
    with steer(model, vector, layer, coefficient, positions, relative, prompt) as handle:
        yield handle


@dataclass(frozen=True)
class Projection:
    """A response's projections on a unit vector: ``per_token`` ``[n]`` (float64), the tokens, and the
    projection at the prompt's last token."""

    per_token: torch.Tensor
    tokens: list[str]
    last_prompt: float

    @property
    def mean(self) -> float:
        """The response's projection: the mean over its tokens."""
        return float(self.per_token.mean())


def _projections(
    model: Model,
    unit: torch.Tensor,
    layer: int,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    progress: bool,
) -> list[torch.Tensor]:
    """For each (prompt, response) pair, the projections ``[1 + n]`` at the prompt's last token and the
    response's tokens."""
    found: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for index, residual in read_residuals(model, pairs, batch_size=batch_size, progress=progress):
        found[index] = residual[layer].double() @ unit
    return found


def project(
    model: Model,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    prompt: str | torch.Tensor,
    response: str | torch.Tensor,
    *,
    system: str | None = None,
) -> Projection:
    """The projections of ``response`` after ``prompt`` (a user turn in the chat template, with ``system``;
    or ids) on the unit vector of ``layer``."""
    unit = unit_direction(model, vector, layer)
    ids = prompt_ids(model, prompt, system)
    answer = (
        response_ids(model, response) if isinstance(response, str) else torch.as_tensor(response).reshape(-1)
    )
    if len(answer) == 0:
        raise CircuitmapError("the response is empty")
    model.check_length(len(ids) + len(answer), "the prompt with its response")
    values = _projections(model, unit, layer, [(ids, answer.long())], 1, False)[0]
    tokens = model.token_strings(torch.cat([ids, answer.long()]))[len(ids) :]
    return Projection(values[1:], tokens, float(values[0]))


@dataclass(frozen=True)
class SampleProjection:
    """One sample's projection difference: its response's projection, the model's own (its answer's, or
    the last prompt token's when approximated), their difference, and the model's answer when generated."""

    index: int
    prompt: str
    response: str
    projection: float
    baseline: float
    difference: float
    own_answer: str | None


def projection_difference(
    model: Model,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    dataset: Sequence[tuple[str, str]],
    *,
    system: str | None = None,
    approximate: bool = False,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int | None = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[SampleProjection]:
    """Each (prompt, response) sample's projection difference on the unit vector of ``layer``, in order;
    the model's own answers are generated (greedy by default) unless ``approximate``. A sample whose own
    answer is empty has a NaN difference."""
    unit = unit_direction(model, vector, layer)
    if not dataset:
        raise CircuitmapError("the dataset is empty")
    prompts = [chat_ids(model, prompt, system) for prompt, _ in dataset]
    given = [response_ids(model, response) for _, response in dataset]
    for index, (prompt, answer) in enumerate(zip(prompts, given, strict=True)):
        if len(answer) == 0:
            raise CircuitmapError(f"sample {index}: the response is empty")
        model.check_length(len(prompt) + len(answer), f"sample {index}'s prompt with its response")
    read = _projections(model, unit, layer, list(zip(prompts, given, strict=True)), batch_size, progress)
    projections = [float(values[1:].mean()) for values in read]
    own_texts: list[str | None] = [None] * len(dataset)
    if approximate:
        baselines = [float(values[0]) for values in read]
    else:
        own = generate_answers(
            model,
            prompts,
            max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        own_texts = [model.decode_after(prompt, answer) for prompt, answer in zip(prompts, own, strict=True)]
        answered = [index for index, answer in enumerate(own) if len(answer)]
        own_read = _projections(
            model, unit, layer, [(prompts[i], own[i]) for i in answered], batch_size, progress
        )
        baselines = [math.nan] * len(dataset)
        for index, values in zip(answered, own_read, strict=True):
            baselines[index] = float(values[1:].mean())
    return [
        SampleProjection(index, prompt, response, projection, baseline, projection - baseline, own_text)
        for index, ((prompt, response), projection, baseline, own_text) in enumerate(
            zip(dataset, projections, baselines, own_texts, strict=True)
        )
    ]


def rank_samples(samples: Sequence[SampleProjection], top: int | None = None) -> list[SampleProjection]:
    """``samples`` by projection difference, largest first (NaN last): the ones most likely to push a model
    fine-tuned on them along the vector. ``top`` keeps the first few."""
    ranked = sorted(samples, key=lambda sample: (math.isnan(sample.difference), -sample.difference))
    return ranked if top is None else ranked[:top]


def finetune_shift(
    base: Model,
    tuned: Model,
    vector: PersonaVector | torch.Tensor,
    layer: int,
    prompts: Sequence[str],
    *,
    responses: Sequence[str] | None = None,
    system: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> float:
    """How far ``tuned`` moved from ``base`` along the unit vector of ``layer``: the mean over ``prompts``
    (user turns in the chat template, after ``system``) of the difference of their residuals entering
    ``layer`` at the last prompt token, or averaged over each of ``responses``' tokens when given."""
    if (tuned.d_model, tuned.n_layers) != (base.d_model, base.n_layers):
        raise CircuitmapError(
            f"the tuned model ({tuned.name}: width {tuned.d_model}, {tuned.n_layers} layers) is not shaped "
            f"as the base model ({base.name}: width {base.d_model}, {base.n_layers} layers)"
        )
    if not prompts:
        raise CircuitmapError("the fine-tuning shift needs at least one prompt")
    if responses is not None and len(responses) != len(prompts):
        raise CircuitmapError(f"{len(prompts)} prompts but {len(responses)} responses")
    unit = unit_direction(base, vector, layer)
    ids = [chat_ids(base, prompt, system) for prompt in prompts]
    answers = (
        [torch.empty(0, dtype=torch.long)] * len(ids)
        if responses is None
        else [response_ids(base, response) for response in responses]
    )
    pairs = list(zip(ids, answers, strict=True))
    means = []
    for model in (base, tuned):
        read = _projections(model, unit, layer, pairs, batch_size, progress)
        means.append(torch.stack([values[0] if responses is None else values[1:].mean() for values in read]))
    return float((means[1] - means[0]).mean())

"""A steering sweep: how much a persona vector moves the trait, layer by layer and coefficient by coefficient.

1. **Questions.** The trait file's held-out ``eval_questions`` (its ``questions`` when it has none), asked
   with no system prompt, through the chat template.
2. **Baseline.** The model's own answers (greedy by default), their mean trait score (the scorer of the
   extraction) and their coherence: the mean negative log-likelihood per token that the unsteered model
   gives them (``runs.answer_nll``).
3. **Grid.** For every layer and coefficient, the answers generated while ``steer`` adds the vector, scored
   and measured the same way. With ``relative`` (the default) a coefficient is a multiple of the layer's
   typical residual norm (the median norm of the residual entering the layer over the questions' tokens)
   along the unit vector, so coefficients compare across layers.
4. **Choice.** A point is coherent while its answers' negative log-likelihood exceeds the baseline's by at
   most ``max_nll_increase`` nats per token. The best point is the coherent one that moves the score
   furthest in the coefficient's direction (a positive coefficient should raise the score); its layer is
   the layer the vector is used at.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.persona.runs import answer_nll, chat_ids, generate_answers
from circuitmap.persona.scorers import Scorer, score_in_range
from circuitmap.persona.steer import POSITIONS, SteeringHandle, layer_direction, unit_direction
from circuitmap.persona.traits import Trait
from circuitmap.persona.vectors import PersonaVector
from circuitmap.validation import check_number

MAX_NLL_INCREASE = 1.0
"""Nats per token a steered answer may lose under the unsteered model and still count as coherent."""


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the sweep (``layer`` None: unsteered) and what its answers show: their mean trait
    score, their mean negative log-likelihood per token under the unsteered model, and the answers."""

    layer: int | None
    coefficient: float
    score: float
    nll: float
    answers: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    """A sweep's baseline and points, and the rule that picks the best point."""

    trait: str
    baseline: SweepPoint
    points: tuple[SweepPoint, ...]
    relative: bool
    positions: str
    max_nll_increase: float = MAX_NLL_INCREASE

    def coherent(self, point: SweepPoint) -> bool:
        """Whether ``point``'s answers lost at most ``max_nll_increase`` nats per token."""
        return point.nll - self.baseline.nll <= self.max_nll_increase

    def gain(self, point: SweepPoint) -> float:
        """How far ``point`` moved the mean score in its coefficient's direction (points of 0-100)."""
        return math.copysign(1.0, point.coefficient) * (point.score - self.baseline.score)

    @property
    def best(self) -> SweepPoint | None:
        """The coherent point with the largest gain (the smaller coefficient on ties); None when no point
        gained while coherent."""
        candidates = [
            point
            for point in self.points
            if self.coherent(point) and not math.isnan(point.score) and self.gain(point) > 0
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda point: (self.gain(point), -abs(point.coefficient)))

    def curve(self, layer: int) -> list[SweepPoint]:
        """The points of ``layer``, by coefficient, with the baseline as coefficient 0."""
        points = [point for point in self.points if point.layer == layer]
        return sorted([*points, replace(self.baseline, layer=layer)], key=lambda point: point.coefficient)

    def as_json(self) -> dict:
        """The sweep's figures (answers left out) for a vector file's metadata."""
        best = self.best
        return {
            "trait": self.trait,
            "relative": self.relative,
            "positions": self.positions,
            "max_nll_increase": self.max_nll_increase,
            "baseline": {"score": _finite(self.baseline.score), "nll": _finite(self.baseline.nll)},
            "points": [
                {
                    "layer": point.layer,
                    "coefficient": point.coefficient,
                    "score": _finite(point.score),
                    "nll": _finite(point.nll),
                }
                for point in self.points
            ],
            "best": None if best is None else {"layer": best.layer, "coefficient": best.coefficient},
        }

    def table(self) -> str:
        """The sweep as a text table: score, gain and coherence of every point."""
        scale = "× typical norm" if self.relative else "× vector"
        lines = [
            f"unsteered: score {self.baseline.score:.1f}, {self.baseline.nll:.2f} nats/token",
            f"layer  coefficient ({scale})  score   gain  nats/token  coherent",
        ]
        for point in sorted(self.points, key=lambda p: (p.layer, p.coefficient)):
            lines.append(
                f"{point.layer:>5} {point.coefficient:>24g} {point.score:>6.1f} {self.gain(point):>+6.1f} "
                f"{point.nll:>11.2f}  {'yes' if self.coherent(point) else 'no'}"
            )
        best = self.best
        lines.append(
            "best: none (no coherent point moved the score)"
            if best is None
            else f"best: layer {best.layer}, coefficient {best.coefficient:g} (gain {self.gain(best):+.1f})"
        )
        return "\n".join(lines)

    def dict_points(self) -> list[dict]:
        """Every point with its answers (the baseline first, layer None), for strict JSON output."""
        return [
            {**asdict(point), "score": _finite(point.score), "nll": _finite(point.nll)}
            for point in (self.baseline, *self.points)
        ]


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def typical_norms(model: Model, prompts: Sequence[torch.Tensor], layers: Sequence[int]) -> dict[int, float]:
    """Per layer, the median norm of the residual entering it over every token of ``prompts``."""
    norms: dict[int, list[torch.Tensor]] = defaultdict(list)
    for prompt in prompts:
        cache = model.activations(prompt[None], ["resid_pre"])
        for layer in layers:
            norms[layer].append(cache["resid_pre", layer][0].double().norm(dim=-1).cpu())
    return {layer: float(torch.cat(values).median()) for layer, values in norms.items()}


def sweep_steering(
    model: Model,
    vector: PersonaVector | dict[int, torch.Tensor],
    trait: Trait,
    scorer: Scorer,
    layers: Sequence[int],
    coefficients: Sequence[float],
    *,
    relative: bool = True,
    positions: str = "all",
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    max_nll_increase: float = MAX_NLL_INCREASE,
    progress: bool = True,
) -> Sweep:
    """Steer ``model`` with ``vector`` (a persona vector, or directions by layer) at every layer and
    coefficient and measure the trait and the answers' coherence, as the module describes."""
    if not layers or not coefficients:
        raise CircuitmapError("a sweep needs at least one layer and one coefficient")
    for coefficient in coefficients:
        check_number("a sweep coefficient", coefficient)
    if positions not in POSITIONS:
        raise CircuitmapError(f"steering positions are {' or '.join(POSITIONS)}, not {positions!r}")
    check_number("max_nll_increase", max_nll_increase, low=0)
    asked = list(questions) if questions is not None else list(trait.eval_questions or trait.questions)
    if not asked:
        raise CircuitmapError("a sweep needs at least one question")
    prompts = [chat_ids(model, question) for question in asked]
    directions = {
        layer: (unit_direction if relative else layer_direction)(
            model, vector if isinstance(vector, PersonaVector) else _layer_of(vector, layer), layer
        )
        for layer in layers
    }
    scales = typical_norms(model, prompts, layers) if relative else dict.fromkeys(layers, 1.0)
    scorer_name = getattr(scorer, "__name__", type(scorer).__name__)

    def measured(layer: int | None, coefficient: float) -> SweepPoint:
        delta = None if layer is None else coefficient * scales[layer] * directions[layer]
        answers = _answers(model, prompts, delta, layer, positions, max_new_tokens, batch_size)
        texts = [model.decode_after(p, a) for p, a in zip(prompts, answers, strict=True)]
        scores = [
            score_in_range(scorer_name, scorer(question, text))
            for question, text in zip(asked, texts, strict=True)
        ]
        nlls = answer_nll(model, list(zip(prompts, answers, strict=True)), batch_size=max(1, batch_size // 2))
        return SweepPoint(layer, float(coefficient), _nanmean(scores), _nanmean(nlls), tuple(texts))

    grid = [(layer, float(coefficient)) for layer in layers for coefficient in coefficients]
    baseline = measured(None, 0.0)
    points = tuple(
        measured(layer, coefficient)
        for layer, coefficient in tqdm(grid, desc="sweep", unit="setting", disable=not progress)
    )
    return Sweep(trait.name, baseline, points, relative, positions, max_nll_increase)


def _layer_of(vectors: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
    if layer not in vectors:
        raise CircuitmapError(f"no direction given for layer {layer}")
    return vectors[layer]


def _answers(
    model: Model,
    prompts: list[torch.Tensor],
    delta: torch.Tensor | None,
    layer: int | None,
    positions: str,
    max_new_tokens: int,
    batch_size: int,
) -> list[torch.Tensor]:
    """Greedy answers to ``prompts``, with ``delta`` added to the residual entering ``layer`` when given
    (from the last prompt token on with ``positions="response"``: prompts of one length at a time)."""
    if delta is None:
        return generate_answers(
            model, prompts, max_new_tokens, greedy=True, batch_size=batch_size, progress=False
        )
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    answers: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(prompts)
    for length, indices in by_length.items():
        start = 0 if positions == "all" else length - 1
        with SteeringHandle(model, layer, delta, start) as handle:
            found = generate_answers(
                model,
                [prompts[i] for i in indices],
                max_new_tokens,
                greedy=True,
                batch_size=batch_size,
                before_forward=handle.at_position,
                progress=False,
            )
        for index, answer in zip(indices, found, strict=True):
            answers[index] = answer
    return answers


def _nanmean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan

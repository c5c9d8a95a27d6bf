"""Extracting a persona vector from a trait file.

1. **Prompts.** Every question of the trait file (or its first ``questions``) is asked under every
   instruction pair's (or the first ``instruction_pairs``') two system prompts (``Trait.system_prompt``: the
   trait-eliciting ``pos`` one and the opposite ``neg`` one), through the model's chat template.
2. **Answers.** ``samples_per_prompt`` answers per prompt, sampled at ``temperature`` (or greedy) with one
   seeded generator, prompts of equal length batched through the KV cache (``runs.generate_answers``).
3. **Scores.** The scorer (the trait file's, or ``scorer``) gives every answer a score from 0 to 100.
4. **Filter.** A positive answer is kept when it scores at least ``positive_threshold``, a negative one when
   it scores at most ``negative_threshold``; answers without a token, or that the scorer could not judge
   (NaN), never are. With ``paired`` (the reference's rule) the two answers to the same question, instruction
   pair and sample are kept together or not at all. An empty side is a one-line error.
5. **Activations.** One forward pass per batch of kept (prompt, answer) sequences reads the residual entering
   every layer (``runs.read_residuals``). Each answer contributes the mean over its response tokens (the
   ``response`` vector) and the residual at its prompt's last token (the ``prompt_last`` vector).
6. **Vectors.** Per layer, the mean over kept positive answers minus the mean over kept negative answers:
   every answer weighs the same, whatever its length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.persona.runs import chat_ids, generate_answers, read_residuals
from circuitmap.persona.scorers import Scorer, get_scorer, score_in_range
from circuitmap.persona.traits import POLARITIES, Trait, load_trait
from circuitmap.persona.vectors import PersonaVector, model_fingerprint
from circuitmap.validation import check_number, check_seed

VARIANTS = ("response", "prompt_last")
"""What each answer contributes: the mean over its response tokens, or its prompt's last token."""


@dataclass(frozen=True)
class ExtractConfig(Settings):
    """How a persona vector is extracted: answers, scores and the filter."""

    questions: int | None = None
    """Ask only the trait file's first N questions (default: all)."""
    instruction_pairs: int | None = None
    """Use only the trait file's first N instruction pairs (default: all)."""
    samples_per_prompt: int = 1
    """Answers per question and system prompt (the reference samples 10)."""
    max_new_tokens: int = 64
    """Most tokens of an answer."""
    temperature: float = 1.0
    """Sampling temperature of the answers."""
    greedy: bool = False
    """Answer greedily instead of sampling (one answer per prompt is then enough)."""
    seed: int = 0
    """Seed of the sampling: one generator serves the run, so the same settings give the same answers."""
    batch_size: int = 16
    """Sequences per generation batch and per forward pass."""
    positive_threshold: float = 50.0
    """A positive answer (trait-eliciting system prompt) is kept when it scores at least this (0-100)."""
    negative_threshold: float = 50.0
    """A negative answer (opposite system prompt) is kept when it scores at most this (0-100)."""
    paired: bool = True
    """Keep the two answers of a question, instruction pair and sample together or not at all (reference)."""
    scorer: str | None = None
    """The registered scorer that judges answers (default: the one the trait file names)."""

    def check(self) -> None:
        """A clear error for settings that cannot work."""
        for name in ("questions", "instruction_pairs", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=1, whole=True)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_seed("seed", self.seed)
        for name in ("positive_threshold", "negative_threshold"):
            check_number(name, getattr(self, name), low=0, high=100)


@dataclass(frozen=True)
class ScoredAnswer:
    """One answer: to which question (index), instruction pair, side and sample; its text and token ids
    (end-of-text excluded), its score and whether the filter kept it."""

    question: int
    pair: int
    polarity: str
    sample: int
    text: str
    token_ids: tuple[int, ...]
    score: float
    kept: bool


@dataclass(frozen=True)
class PersonaExtraction:
    """The two persona vectors of a run (``response`` and ``prompt_last``) and every scored answer."""

    response: PersonaVector
    prompt_last: PersonaVector
    answers: list[ScoredAnswer]

    def summary(self) -> str:
        """Counts of answers kept, mean scores and the norm of the response vector at every layer."""
        info = self.response.info
        kept, generated = info["counts"]["kept"], info["counts"]["generated"]
        lines = [
            f"trait {info['trait']} (scorer {info['scorer']}): kept {kept['pos']} of {generated['pos']} "
            f"positive and {kept['neg']} of {generated['neg']} negative answers",
            "mean scores: "
            + ", ".join(f"{side} {_shown(score)}" for side, score in info["mean_scores"].items()),
            "layer  norm (response)  norm (prompt last)",
        ]
        for layer in range(self.response.n_layers):
            lines.append(
                f"{layer:>5} {float(self.response.directions[layer].norm()):>15.3f} "
                f"{float(self.prompt_last.directions[layer].norm()):>19.3f}"
            )
        return "\n".join(lines)


def _shown(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.1f}"


class AnswerSlot(NamedTuple):
    """Where an answer belongs: question (index), instruction pair, side (``pos``/``neg``) and sample."""

    question: int
    pair: int
    polarity: str
    sample: int


def extract_persona_vectors(
    model: Model,
    trait: Trait | str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    scorer: Scorer | None = None,
    progress: bool = True,
) -> PersonaExtraction:
    """Extract ``trait``'s persona vectors from ``model`` as the module describes. ``scorer`` replaces the
    registered scorer ``config.scorer`` (or the trait file's) with any function, e.g. an ``EndpointJudge``."""
    config.check()
    trait = trait if isinstance(trait, Trait) else load_trait(trait)
    scorer_name, scorer = chosen_scorer(trait, config, scorer)
    n_questions = min(config.questions or len(trait.questions), len(trait.questions))
    n_pairs = min(config.instruction_pairs or len(trait.instructions), len(trait.instructions))
    slots = [
        AnswerSlot(question, pair, polarity, sample)
        for question in range(n_questions)
        for pair in range(n_pairs)
        for polarity in POLARITIES
        for sample in range(config.samples_per_prompt)
    ]
    prompt_ids = {
        (slot.question, slot.pair, slot.polarity): chat_ids(
            model, trait.questions[slot.question], trait.system_prompt(slot.polarity, slot.pair)
        )
        for slot in slots
    }
    prompts = [prompt_ids[slot.question, slot.pair, slot.polarity] for slot in slots]
    responses = generate_answers(
        model,
        prompts,
        config.max_new_tokens,
        greedy=config.greedy,
        temperature=config.temperature,
        seed=config.seed,
        batch_size=config.batch_size,
        progress=progress,
    )
    texts = [
        model.decode_after(prompt, response) for prompt, response in zip(prompts, responses, strict=True)
    ]
    scores = [
        score_in_range(scorer_name, scorer(trait.questions[slot.question], text))
        for slot, text in tqdm(
            list(zip(slots, texts, strict=True)), desc="scores", unit="answer", disable=not progress
        )
    ]
    kept = _filter(slots, responses, scores, config)
    answers = [
        ScoredAnswer(*slot, text, tuple(response.tolist()), score, keep)
        for slot, text, response, score, keep in zip(slots, texts, responses, scores, kept, strict=True)
    ]
    _check_kept(answers, config, scorer_name)
    chosen = [index for index, keep in enumerate(kept) if keep]
    pairs = [(prompts[index], responses[index]) for index in chosen]
    means = _mean_residuals(model, pairs, [slots[index].polarity for index in chosen], config, progress)
    info = _provenance(model, trait, config, scorer_name, answers)
    vectors = {
        variant: PersonaVector(
            (means["pos"][variant] - means["neg"][variant]).float(), {**info, "positions": variant}
        )
        for variant in VARIANTS
    }
    return PersonaExtraction(vectors["response"], vectors["prompt_last"], answers)


def chosen_scorer(trait: Trait, config: ExtractConfig, scorer: Scorer | None = None) -> tuple[str, Scorer]:
    """The scorer's name and function: the one given, else the one the settings or the trait file name."""
    if scorer is not None:
        return getattr(scorer, "__name__", type(scorer).__name__), scorer
    name = config.scorer or trait.scorer
    if name is None:
        raise CircuitmapError(f"{trait.path}: the trait file names no scorer; choose one (scorer=…)")
    return name, get_scorer(name)


def _filter(
    slots: list[AnswerSlot], responses: list[torch.Tensor], scores: list[float], config: ExtractConfig
) -> list[bool]:
    """Which answers the filter keeps (see the module's step 4)."""
    passes = [
        len(response) > 0
        and (
            score >= config.positive_threshold
            if slot.polarity == "pos"
            else score <= config.negative_threshold
        )
        for slot, response, score in zip(slots, responses, scores, strict=True)
    ]
    if not config.paired:
        return passes
    pair_passes: dict[tuple[int, int, int], bool] = {}
    for slot, passed in zip(slots, passes, strict=True):
        key = (slot.question, slot.pair, slot.sample)
        pair_passes[key] = pair_passes.get(key, True) and passed
    return [pair_passes[slot.question, slot.pair, slot.sample] for slot in slots]


def _provenance(
    model: Model, trait: Trait, config: ExtractConfig, scorer_name: str, answers: list[ScoredAnswer]
) -> dict:
    """What a vector file records of its run: model, trait, scorer, filter, counts and generation."""
    return {
        **model_fingerprint(model),
        "point": "resid_pre",
        "trait": trait.name,
        "trait_sha256": trait.sha256,
        "scorer": scorer_name,
        "thresholds": {
            "positive": config.positive_threshold,
            "negative": config.negative_threshold,
            "paired": config.paired,
        },
        "counts": {
            "questions": len({answer.question for answer in answers}),
            "instruction_pairs": len({answer.pair for answer in answers}),
            "generated": {side: sum(a.polarity == side for a in answers) for side in POLARITIES},
            "kept": {side: sum(a.kept and a.polarity == side for a in answers) for side in POLARITIES},
        },
        "mean_scores": {side: _mean_score(answers, side) for side in POLARITIES},
        "generation": {
            "samples_per_prompt": config.samples_per_prompt,
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "greedy": config.greedy,
            "seed": config.seed,
            "batch_size": config.batch_size,
        },
    }


def _check_kept(answers: list[ScoredAnswer], config: ExtractConfig, scorer_name: str) -> None:
    """A one-line error when the filter left no positive or no negative answer."""
    if all(any(a.kept and a.polarity == side for a in answers) for side in POLARITIES):
        return
    positive = [a for a in answers if a.polarity == "pos"]
    negative = [a for a in answers if a.polarity == "neg"]
    high = sum(a.score >= config.positive_threshold for a in positive)
    low = sum(a.score <= config.negative_threshold for a in negative)
    advice = "lower the thresholds, sample more answers" + (" or filter unpaired" if config.paired else "")
    raise CircuitmapError(
        f"no {'pair of ' if config.paired else ''}answers passed the filter: {high} of {len(positive)} "
        f"positive answers scored at least {config.positive_threshold:g} and {low} of {len(negative)} "
        f"negative answers at most {config.negative_threshold:g} (scorer {scorer_name}); {advice}"
    )


def _mean_score(answers: list[ScoredAnswer], side: str) -> float | None:
    """The mean score of one side's answers (those the scorer judged), None when there are none."""
    scores = [a.score for a in answers if a.polarity == side and not math.isnan(a.score)]
    return sum(scores) / len(scores) if scores else None


def _mean_residuals(
    model: Model,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    polarities: list[str],
    config: ExtractConfig,
    progress: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per side and variant, the mean over answers of their contribution ``[n_layers, d_model]`` (float64)."""
    sums = {
        side: {
            variant: torch.zeros(model.n_layers, model.d_model, dtype=torch.float64) for variant in VARIANTS
        }
        for side in POLARITIES
    }
    for index, residual in read_residuals(model, pairs, batch_size=config.batch_size, progress=progress):
        side = sums[polarities[index]]
        side["response"] += residual[:, 1:].double().mean(dim=1)
        side["prompt_last"] += residual[:, 0].double()
    counts = {side: polarities.count(side) for side in POLARITIES}
    return {
        side: {variant: total / counts[side] for variant, total in totals.items()}
        for side, totals in sums.items()
    }

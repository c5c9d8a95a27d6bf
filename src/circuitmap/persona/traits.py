"""Trait files: the prompts a persona vector is extracted from.

A trait file is JSON in the layout of the Persona Vectors reference code, which it reads unchanged:

- ``instruction``: a list of ``{"pos": ..., "neg": ...}`` pairs of system-prompt instructions, one that
  elicits the trait and one that elicits its opposite;
- ``questions``: the questions both kinds of answers respond to (the extraction set);
- ``eval_prompt``: a judge prompt with ``{question}`` and ``{answer}`` placeholders asking for a score from
  0 (trait absent) to 100 (trait strongly present).

circuitmap adds optional fields:

- ``scorer``: the name of the offline scorer that judges answers (``circuitmap.persona.scorers``);
- ``eval_questions``: held-out questions for steering and evaluation, never used for extraction;
- ``assistant_names``: ``{"pos": ..., "neg": ...}``, the assistant named in each system prompt;
- ``reference_answers``: a list of ``{"question": ..., "pos": ..., "neg": ...}``, hand-written answers that
  show the trait and its opposite, to check that a scorer tells them apart.

The system prompt of an answer is ``"You are a(n) {name} assistant. {instruction}"``, as in the reference:
the name is ``assistant_names[polarity]``, by default the trait's name (the file's stem) for ``pos`` and
``helpful`` for ``neg``. Any other field, a missing or empty required one, or a value of the wrong type is
refused with one line naming the file. ``sha256`` hashes the file's bytes, for provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from circuitmap.errors import CircuitmapError

TRAITS_FOLDER = Path(__file__).with_name("traits")
"""The trait files shipped with circuitmap, loadable by name (``load_trait("optimistic")``)."""
POLARITIES = ("pos", "neg")
REQUIRED_FIELDS = ("instruction", "questions", "eval_prompt")
OPTIONAL_FIELDS = ("scorer", "eval_questions", "assistant_names", "reference_answers")


@dataclass(frozen=True)
class InstructionPair:
    """Two system-prompt instructions: one that elicits the trait (``pos``), one its opposite (``neg``)."""

    pos: str
    neg: str


@dataclass(frozen=True)
class ReferenceAnswer:
    """A question with a hand-written answer showing the trait (``pos``) and one that does not (``neg``)."""

    question: str
    pos: str
    neg: str


@dataclass(frozen=True)
class Trait:
    """A trait file, checked."""

    name: str
    path: Path
    instructions: tuple[InstructionPair, ...]
    questions: tuple[str, ...]
    eval_prompt: str
    sha256: str
    scorer: str | None
    eval_questions: tuple[str, ...]
    assistant_names: tuple[str, str]
    reference_answers: tuple[ReferenceAnswer, ...]

    def system_prompt(self, polarity: str, pair: int) -> str:
        """The system prompt of instruction pair ``pair`` on the ``pos`` or ``neg`` side."""
        if polarity not in POLARITIES:
            raise CircuitmapError(f"the polarity is 'pos' or 'neg', not {polarity!r}")
        name = self.assistant_names[POLARITIES.index(polarity)]
        instruction = getattr(self.instructions[pair], polarity)
        article = "an" if name[:1].lower() in "aeiou" else "a"
        return f"You are {article} {name} assistant. {instruction}"


def shipped_traits() -> list[str]:
    """The names of the trait files shipped with circuitmap."""
    return sorted(path.stem for path in TRAITS_FOLDER.glob("*.json"))


def load_trait(source: str | Path) -> Trait:
    """The trait in a JSON file, or the shipped trait of that name; a one-line error naming the file and
    the problem when it cannot be used."""
    path = Path(source)
    if not path.suffix and not path.exists() and str(source) in shipped_traits():
        path = TRAITS_FOLDER / f"{source}.json"
    if not path.is_file():
        shipped = ", ".join(shipped_traits())
        raise CircuitmapError(f"{path}: trait file not found (shipped traits: {shipped})")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CircuitmapError(f"{path}: not a JSON trait file ({error})") from None
    return _checked(path, data, hashlib.sha256(raw).hexdigest())


def _checked(path: Path, data: object, sha256: str) -> Trait:
    """The ``Trait`` that ``data`` describes, every field checked."""

    def fail(problem: str) -> CircuitmapError:
        return CircuitmapError(f"{path}: {problem}")

    if not isinstance(data, dict):
        raise fail("a trait file holds one JSON object")
    unknown = sorted(set(data) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise fail(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
        )
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")

    def text(value: object, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{where} must be a non-empty string")
        return value

    def texts(value: object, where: str, *, empty: bool = False) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not empty):
            raise fail(f"{where} must be a {'' if empty else 'non-empty '}list of strings")
        return tuple(text(item, f"{where}[{index}]") for index, item in enumerate(value))

    def record(value: object, where: str, keys: tuple[str, ...]) -> dict[str, str]:
        if not isinstance(value, dict) or sorted(value) != sorted(keys):
            raise fail(f"{where} must be an object with exactly the keys {', '.join(keys)}")
        return {key: text(value[key], f"{where}.{key}") for key in keys}

    instructions = data["instruction"]
    if not isinstance(instructions, list) or not instructions:
        raise fail("instruction must be a non-empty list of {pos, neg} objects")
    pairs = tuple(
        InstructionPair(**record(item, f"instruction[{index}]", POLARITIES))
        for index, item in enumerate(instructions)
    )
    eval_prompt = text(data["eval_prompt"], "eval_prompt")
    absent = [name for name in ("{question}", "{answer}") if name not in eval_prompt]
    if absent:
        raise fail(f"eval_prompt lacks the placeholder(s) {', '.join(absent)}")
    scorer = data.get("scorer")
    if scorer is not None:
        text(scorer, "scorer")
    names = record(
        data.get("assistant_names", {"pos": path.stem, "neg": "helpful"}), "assistant_names", POLARITIES
    )
    references = data.get("reference_answers", [])
    if not isinstance(references, list):
        raise fail("reference_answers must be a list of {question, pos, neg} objects")
    return Trait(
        name=path.stem,
        path=path,
        instructions=pairs,
        questions=texts(data["questions"], "questions"),
        eval_prompt=eval_prompt,
        sha256=sha256,
        scorer=scorer,
        eval_questions=texts(data.get("eval_questions", []), "eval_questions", empty=True),
        assistant_names=(names["pos"], names["neg"]),
        reference_answers=tuple(
            ReferenceAnswer(**record(item, f"reference_answers[{index}]", ("question", *POLARITIES)))
            for index, item in enumerate(references)
        ),
    )

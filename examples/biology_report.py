"""The biology of SmolLM2-135M: writes docs/biology.md and its figures from scratch.

Six case studies after "On the Biology of a Large Language Model", each tested on SmolLM2-135M-Instruct with
the model's quick transcoder set: planning in rhymes, multi-step recall, shared multilingual features,
addition, known and unknown entities, and a chain of thought. Each case first measures whether the model
shows the behaviour at all, then states a hypothesis about the mechanism, explains a prompt by its graph,
and tests the hypothesis by editing features on the real model. Verdicts follow from rules stated before the
measurements: a case is *absent* when the model does not show the behaviour, else *held* when every test of
its hypothesis passes, *partly* when some do and *failed* when none does. Groups of features (supernodes) are
chosen by stated rules, never by hand. ``make biology-report`` (or ``python examples/biology_report.py``).
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from circuitmap import (  # noqa: E402
    FeatureEdit,
    InterventionResult,
    Supernode,
    check_graph,
    generate_with,
    intervene,
    load_model,
    load_transcoders,
)
from circuitmap.cache import ensure_quick_transcoders  # noqa: E402
from circuitmap.features import FeatureStore  # noqa: E402
from circuitmap.graphs import NodeKind, graph_scores, prune  # noqa: E402
from circuitmap.graphs.ids import parse_feature_id  # noqa: E402
from circuitmap.studies import (  # noqa: E402
    GROUP_SIZE,
    Explained,
    Study,
    describe_transcoders,
    draw_graph,
    quote,
    swap,
)

MODEL = "smollm2-135m"
MAX_FEATURE_NODES = 4096
CONTINUATION_TOKENS = 20
FIGURES = "biology"
CHAT = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
"""The model's chat format for one user turn, without the default system message."""


@dataclass
class Trial:
    """A named list of edits and what the hypothesis expects of it, judged on the edited run."""

    name: str
    edits: list
    expects: str
    held: Callable[[InterventionResult], bool]


@dataclass
class Verdict:
    """One case's line in the summary table."""

    case: str
    hypothesis: str
    measured: str
    verdict: str


@dataclass
class Report(Study):
    """A study of the model and the report being written about it."""

    figures: Path = field(kw_only=True)
    lines: list[str] = field(default_factory=list, kw_only=True)
    verdicts: list[Verdict] = field(default_factory=list, kw_only=True)
    limits: list[str] = field(default_factory=list, kw_only=True)
    """One row per graph for the table of limits: what the graph leaves unexplained."""
    notes: list[str] = field(default_factory=list, kw_only=True)
    """What a case could not show, in words, for the last section."""

    def top(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        return self.model.top_next_tokens(prompt, k=k)

    def greedy(self, prompt: str, tokens: int = CONTINUATION_TOKENS) -> str:
        return self.model.generate(self.model.encode(prompt), tokens, True, 1.0, None)

    def behaviour(self, rows: Sequence[tuple[str, str]], tokens: int = CONTINUATION_TOKENS) -> None:
        """A table of prompts with the model's five most likely next tokens and its greedy continuation;
        each row is (prompt, what a model with the behaviour would say)."""
        self.lines += [
            "| prompt | expected | top next tokens | greedy continuation |",
            "|---|---|---|---|",
        ]
        for prompt, expected in rows:
            top = ", ".join(f"`{token!r}` {p:.2f}" for token, p in self.top(prompt))
            self.lines.append(
                f"| {quote(prompt)} | {expected} | {top} | {quote(self.greedy(prompt, tokens))} |"
            )
        self.lines.append("")

    def graph(self, explained: Explained, slug: str, rule: str) -> None:
        """The graph's size, scores and supernodes with labels, and a drawing of its core."""
        graph = explained.graph
        scores = graph_scores(graph)
        targets = ", ".join(
            f"`{name!r}` ({p:.2f})"
            for name, p in zip(graph.target_names[:5], graph.target_probs[:5], strict=True)
        )
        self.lines += [
            f"Graph of {quote(explained.prompt)}: {len(graph.tokens)} tokens, {graph.n_features:,} active "
            f"features kept, {graph.n_edges:,} edges; targets {targets}; replacement score "
            f"{scores.replacement:.2f}, completeness {scores.completeness:.2f}.",
            "",
            f"Supernodes: {rule}",
            "",
            "| supernode | features (layer_index_position: label) |",
            "|---|---|",
        ]
        for name, members in explained.groups.items():
            shown = ", ".join(f"`{m}`" + (f" {self.label(m)}" if self.label(m) else "") for m in members[:6])
            more = f" … and {len(members) - 6} more" if len(members) > 6 else ""
            self.lines.append(f"| {name} | {shown or 'none'}{more} |")
        self.lines += ["", f"![graph]({FIGURES}/{slug}-graph.png)", ""]
        draw_graph(graph, prune(graph), explained.groups, self.figures / f"{slug}-graph.png")
        influence = explained.influence
        inner = np.isin(graph.kind, [NodeKind.FEATURE, NodeKind.ERROR])
        errors = influence[graph.kind == NodeKind.ERROR].sum() / influence[inner].sum()
        earlier = influence[inner & (graph.position < len(graph.tokens) - 1)].sum() / influence[inner].sum()
        members = [m for group in explained.groups.values() for m in group]
        unlabelled = sum(not self.label(m) for m in members)
        self.limits.append(
            f"| {slug} | {len(graph.tokens)} | {scores.replacement:.2f} | {errors:.2f} | {earlier:.2f} | "
            f"{unlabelled} of {len(members)} |"
        )

    def trials(self, prompt: str, trials: Sequence[Trial], watch: Sequence[str]) -> list[bool]:
        """Run each trial; a table of the watched tokens' probabilities, the top token and the greedy
        continuation beside the unedited run. Returns whether each trial held."""
        header = " | ".join(f"P({token.strip() or repr(token)})" for token in watch)
        self.lines += [
            f"| intervention | the hypothesis expects | {header} | top next token | greedy continuation "
            "| held |",
            "|---|---|" + "---:|" * len(watch) + "---|---|---|",
        ]
        clean = intervene(self.model, self.transcoders, prompt, [], top_k=1)
        cells = " | ".join(f"{self.probability(clean, token, after=False):.3f}" for token in watch)
        top, p = clean.top_before[0]
        self.lines.append(f"| none | | {cells} | `{top!r}` ({p:.2f}) | {quote(self.greedy(prompt, 12))} | |")
        outcomes = []
        for trial in trials:
            result = intervene(self.model, self.transcoders, prompt, trial.edits, top_k=1)
            continuation = generate_with(self.model, self.transcoders, prompt, trial.edits, 12)
            cells = " | ".join(f"{self.probability(result, token):.3f}" for token in watch)
            top, p = result.top_after[0]
            held = trial.held(result)
            outcomes.append(held)
            self.lines.append(
                f"| {trial.name} | {trial.expects} | {cells} | `{top!r}` ({p:.2f}) | {quote(continuation)} | "
                f"{'yes' if held else '**no**'} |"
            )
        self.lines.append("")
        return outcomes

    def check(self, explained: Explained, slug: str) -> str:
        """``check_graph`` with the supernodes; its figure, and a sentence for the text."""
        supernodes = [Supernode(name, members) for name, members in explained.groups.items() if members]
        report = check_graph(
            self.model, self.transcoders, explained.graph, n_features=10, supernodes=supernodes
        )
        report.save_plot(self.figures / f"{slug}-check.png")
        sentence = (
            "`check` (ablating the 10 most influential features and each supernode, open loop): sign "
            f"agreement {report.sign_agreement:.2f}, rank correlation {report.rank_correlation:.2f} over "
            f"{len(report.rows)} ablations (target `{report.target!r}`)."
        )
        self.lines += [sentence, "", f"![check]({FIGURES}/{slug}-check.png)", ""]
        return sentence

    def conclude(
        self, case: str, hypothesis: str, present: bool, tests: Sequence[bool], measured: str, limit: str
    ) -> str:
        """The case's verdict by the stated rule, in the text and the summary; ``limit`` says what the tool
        could not show in this case, with the measurement that exposed it."""
        if not present:
            verdict = "absent"
        elif all(tests):
            verdict = "held"
        elif any(tests):
            verdict = "partly"
        else:
            verdict = "failed"
        passed = f"{sum(tests)} of {len(tests)} tests of the hypothesis passed"
        self.lines += [
            f"**Verdict: {verdict}** (behaviour {'present' if present else 'absent'}; {passed}).",
            "",
        ]
        self.verdicts.append(Verdict(case, hypothesis, f"{measured}; {passed}", verdict))
        self.notes.append(f"- **{case}**: {limit}")
        return verdict

    def single_tokens(self, words: Sequence[str]) -> list[str]:
        """The words that are one token each for this model (the others cannot be read as one probability)."""
        return [w for w in words if len(self.model.tokenizer(w, add_special_tokens=False).input_ids) == 1]

    def position_after(self, prompt: str, prefix: str) -> int:
        """The position of the last token of ``prefix`` (a beginning of ``prompt``) in ``prompt``."""
        if not prompt.startswith(prefix):
            raise ValueError(f"{prefix!r} does not begin {prompt!r}")
        return len(self.model.encode(prefix)[0]) - 1


def becomes_top(study: Study, tokens: Sequence[str]) -> Callable[[InterventionResult], bool]:
    wanted = {study.token_id(token) for token in tokens}
    return lambda result: int(result.logits_after.argmax()) in wanted


def falls_below_half(study: Study, tokens: Sequence[str]) -> Callable[[InterventionResult], bool]:
    return lambda result: study.mass(result, tokens) < study.mass(result, tokens, after=False) / 2


def rises_twofold(study: Study, tokens: Sequence[str]) -> Callable[[InterventionResult], bool]:
    return lambda result: study.mass(result, tokens) > 2 * study.mass(result, tokens, after=False)


def both(*judges: Callable[[InterventionResult], bool]) -> Callable[[InterventionResult], bool]:
    return lambda result: all(judge(result) for judge in judges)


# ---------------------------------------------------------------------------------------------------------
# 1. Planning in rhymes
# ---------------------------------------------------------------------------------------------------------

COUPLETS = [
    (
        "The night is dark, the moon is bright,",
        "The night is dark, the sky is blue,",
        "I hold my candle, warm and",
        [" bright", " light", " night", " white", " tight", " right", " sight", " delight", " might"],
        [" blue", " true", " new", " through", " too", " you", " view", " few", " do"],
    ),
    (
        "The sun goes down behind the hill,",
        "The sun goes down behind the tree,",
        "The evening air is calm and",
        [" still", " chill", " ill", " will", " fill", " hill", " thrill"],
        [" free", " tree", " sea", " me", " be", " see", " glee"],
    ),
    (
        "I saw a cat upon a mat,",
        "I saw a dog upon a log,",
        "It wore a big and funny",
        [" hat", " cat", " mat", " bat", " rat", " flat", " that"],
        [" dog", " log", " frog", " fog", " jog", " bog", " hog"],
    ),
]
"""Couplets as (first line ending in rhyme A, the same line ending in rhyme B, the second line without its
last word, words rhyming with A, words rhyming with B)."""


def planning(report: Report) -> None:
    report.lines += [
        "## 1. Planning in rhymes",
        "",
        "The paper found that Claude picks the rhyming word of a couplet's second line before writing the "
        "line: features on the line break after the first line represent candidate rhymes, and swapping them "
        "changes the line. A 135M model may not rhyme at all, so the behaviour is measured first, in two "
        "ways: whether it writes a rhyming second line, and whether the last word of a given second line "
        "depends on the first line's rhyme.",
        "",
    ]
    report.behaviour([(f"A rhyming couplet:\n{a}\n", "a second line that rhymes") for a, *_ in COUPLETS], 16)
    report.lines += [
        "Rhyme sensitivity: each couplet's first line is written with two endings (A and B) and the second "
        "line is given up to its last word; the table shows the next-token probability mass on words rhyming "
        "with A and with B.",
        "",
        "| couplet | P(rhymes with A) after A | after B | P(rhymes with B) after A | after B | sensitive |",
        "|---|---:|---:|---:|---:|---|",
    ]
    sensitive = []
    for line_a, line_b, stem, rhymes_a, rhymes_b in COUPLETS:
        rhymes_a, rhymes_b = report.single_tokens(rhymes_a), report.single_tokens(rhymes_b)
        runs = [
            intervene(report.model, report.transcoders, f"A poem:\n{line}\n{stem}", [], top_k=1)
            for line in (line_a, line_b)
        ]
        mass = [[report.mass(run, rhymes, after=False) for run in runs] for rhymes in (rhymes_a, rhymes_b)]
        yes = mass[0][0] > 2 * mass[0][1] and mass[1][1] > 2 * mass[1][0]
        sensitive.append(yes)
        report.lines.append(
            f"| {quote(line_a)} / {quote(line_b)} {quote(stem)} | {mass[0][0]:.3f} | {mass[0][1]:.3f} | "
            f"{mass[1][0]:.3f} | {mass[1][1]:.3f} | {'yes' if yes else 'no'} |"
        )
    present = sum(sensitive) >= 2
    report.lines += [
        "",
        "A couplet counts as *sensitive* when each ending raises its own rhymes' mass more than twofold over "
        f"the other ending. {sum(sensitive)} of {len(COUPLETS)} are; the behaviour counts as present when at "
        "least two are.",
        "",
        "**Hypothesis.** The rhyme is planned at the end of the first line: the features on the line break "
        "carry the rhyme family, so (a) ablating them lowers the rhymes' mass below half, and (b) swapping "
        "them for the other ending's line-break features moves the mass to the other family (it at least "
        "doubles, and the first family's halves). As a control, (c) the same swap on the rhyming word itself "
        "tests whether the rhyme is read from the word directly instead.",
        "",
    ]
    tests = []
    for number, (line_a, line_b, stem, rhymes_a, rhymes_b) in enumerate(COUPLETS[:1], start=1):
        rhymes_a, rhymes_b = report.single_tokens(rhymes_a), report.single_tokens(rhymes_b)
        prompt, donor_prompt = f"A poem:\n{line_a}\n{stem}", f"A poem:\n{line_b}\n{stem}"
        explained, donor = report.explain(prompt), report.explain(donor_prompt)
        newline = report.position_after(prompt, f"A poem:\n{line_a}\n")
        word = report.position_after(prompt, f"A poem:\n{line_a[:-1]}")
        explained.groups = {
            "line break": explained.top_features(newline),
            "rhyming word": explained.top_features(word),
            "last token": explained.top_features(-1),
        }
        report.lines += [f"The mechanism is tested on couplet {number}.", ""]
        report.graph(
            explained,
            f"rhyme-{number}",
            f"the {GROUP_SIZE} most influential features on the line break after the first line (position "
            f"{newline}), on its rhyming word (position {word}, {explained.graph.token_strings[word]!r}) and "
            "on the last token.",
        )
        influence = explained.influence_by_position()
        share = influence[newline] / influence.sum()
        report.lines += [
            f"Share of the features' and error nodes' influence on the targets that sits on the line break: "
            f"{share:.3f} (on the rhyming word {influence[word] / influence.sum():.3f}, on the last token "
            f"{influence[-1] / influence.sum():.3f}).",
            "",
        ]
        groups = {name: explained.supernode(name) for name in explained.groups}
        trials = [
            Trial(
                "ablate line break",
                [FeatureEdit.ablate(groups["line break"])],
                "rhymes with A below half",
                falls_below_half(report, rhymes_a),
            ),
            Trial(
                "swap line break A → B",
                swap(groups["line break"], report.transplant(donor, newline, 2.0, newline)),
                "rhymes with B ×2, with A below half",
                both(rises_twofold(report, rhymes_b), falls_below_half(report, rhymes_a)),
            ),
            Trial(
                "swap rhyming word A → B (control)",
                swap(groups["rhyming word"], report.transplant(donor, word, 2.0, word)),
                "rhymes with B ×2, with A below half",
                both(rises_twofold(report, rhymes_b), falls_below_half(report, rhymes_a)),
            ),
        ]
        watch = [rhymes_a[0], rhymes_a[1], rhymes_b[0], rhymes_b[1]]
        outcomes = report.trials(prompt, trials, watch)
        tests += outcomes[:2]
        report.check(explained, f"rhyme-{number}")
    report.conclude(
        "Planning in rhymes",
        "the rhyme is chosen on the line break after the first line",
        present,
        tests,
        f"{sum(sensitive)} of {len(COUPLETS)} couplets rhyme-sensitive",
        f"{share:.3f} of the influence sits on the line break, and {sum(tests)} of {len(tests)} edits there "
        "moved the rhymes as predicted; "
        + (
            "with rhymes the model barely follows, planning can only be looked for, not shown"
            if not present
            else "the rhyme word's own features were the control"
        )
        + ".",
    )


# ---------------------------------------------------------------------------------------------------------
# 2. Multi-step recall
# ---------------------------------------------------------------------------------------------------------

TWO_HOP = [
    ("The capital of the country where the Eiffel Tower stands is", " France", " Paris"),
    ("The capital of the country where the Colosseum stands is", " Italy", " Rome"),
    ("The capital of the country where Big Ben stands is", " England", " London"),
    ("The capital of the state containing Dallas is", " Texas", " Austin"),
]
"""Two-hop questions as (prompt, intermediate fact, answer)."""
COUNTRY_WORDS = {
    " France": [" France", "France", " French", "French"],
    " Italy": [" Italy", "Italy", " Italian", "Italian"],
}


SEARCHED = 1000
"""How many of a graph's most influential features are searched for an intermediate fact."""


def multi_step(report: Report) -> None:
    report.lines += [
        "## 2. Multi-step recall",
        "",
        "The paper traced “the capital of the state containing Dallas” through an intermediate “Texas” "
        "feature to “Austin”. Here each two-hop question is asked with its first hop alone and its second "
        "hop alone, to tell whether the model lacks a fact or fails to compose two.",
        "",
    ]
    rows = []
    correct = 0
    for prompt, _, answer in TWO_HOP:
        rows.append((prompt, f"`{answer!r}`"))
        correct += report.top(prompt, 1)[0][0] == answer
    rows += [
        ("The Eiffel Tower is in the country of", "`' France'`"),
        ("The capital of France is", "`' Paris'`"),
        ("The city of Dallas is in the state of", "`' Texas'`"),
        ("The capital of Texas is", "`' Austin'`"),
    ]
    report.behaviour(rows, 8)
    present = correct >= 2
    report.lines += [
        f"The answer is the top token for {correct} of {len(TWO_HOP)} two-hop questions; the behaviour "
        "counts as present when at least two are answered.",
        "",
        "**Hypothesis** (on the Eiffel Tower question). The model composes two facts: (a) features "
        "representing the intermediate country (their logit lens promotes ` France`/` French`) are among "
        "the graph's influential features; (b) ablating them lowers P(Paris) below half; (c) swapping them "
        "for the Italy features of the Colosseum question (same rule, added at the same distance from the "
        "end, at twice their activation) makes ` Rome` the top token. As a control, (d) swapping the "
        "landmark's own features (its last token's 20 most influential) makes ` Rome` top too.",
        "",
    ]
    (prompt, middle, answer), (donor_prompt, donor_middle, donor_answer) = TWO_HOP[0], TWO_HOP[1]
    explained, donor = report.explain(prompt), report.explain(donor_prompt)
    ranked = [m for m in explained.ranked_features(SEARCHED) if parse_feature_id(m)[2] != 0]
    intermediate = report.promotes(ranked, COUNTRY_WORDS[middle])[:GROUP_SIZE]
    donor_ranked = [m for m in donor.ranked_features(SEARCHED) if parse_feature_id(m)[2] != 0]
    donor_intermediate = report.promotes(donor_ranked, COUNTRY_WORDS[donor_middle])[:GROUP_SIZE]
    landmark = report.position_after(prompt, "The capital of the country where the Eiffel Tower")
    donor_landmark = report.position_after(donor_prompt, "The capital of the country where the Colosseum")
    explained.groups = {
        "France (intermediate)": intermediate,
        "landmark": explained.top_features(landmark),
        "last token": explained.top_features(-1),
    }
    report.graph(
        explained,
        "two-hop",
        f"**France (intermediate)** is every feature among the graph's {SEARCHED:,} most influential "
        "(outside the first token) whose logit lens has ` France`, `France`, ` French` or `French` among "
        f"its 10 most promoted tokens (at most {GROUP_SIZE}); **landmark** and **last token** are the "
        f"{GROUP_SIZE} most influential features on ` Tower` (position {landmark}) and on the last token.",
    )
    ranks = [explained.ranked_features(SEARCHED).index(m) + 1 for m in intermediate]
    report.lines += [
        f"Intermediate features found: {len(intermediate)} (influence ranks {ranks[:10]}); in the Colosseum "
        f"graph, Italy features found: {len(donor_intermediate)}.",
        "",
    ]
    groups = {name: explained.supernode(name) for name, members in explained.groups.items() if members}
    trials = []
    if intermediate:
        trials.append(
            Trial(
                "ablate France (intermediate)",
                [FeatureEdit.ablate(groups["France (intermediate)"])],
                "P(Paris) below half",
                falls_below_half(report, [answer]),
            )
        )
        trials.append(
            Trial(
                "swap France → Italy (intermediate)",
                swap(
                    groups["France (intermediate)"],
                    report.transplant_features(donor_prompt, donor_intermediate, 2.0),
                ),
                "` Rome` top",
                becomes_top(report, [donor_answer]),
            )
        )
    trials.append(
        Trial(
            "swap landmark Eiffel Tower → Colosseum (control)",
            swap(groups["landmark"], report.transplant(donor, donor_landmark, 2.0, landmark)),
            "` Rome` top",
            becomes_top(report, [donor_answer]),
        )
    )
    outcomes = report.trials(prompt, trials, [answer, donor_answer, middle])
    tests = [bool(intermediate)] + (outcomes[:2] if intermediate else [False, False])
    report.check(explained, "two-hop")
    report.conclude(
        "Multi-step recall",
        "an intermediate “France” is represented and used to reach “Paris”",
        present,
        tests,
        f"{correct} of {len(TWO_HOP)} two-hop questions answered; {len(intermediate)} intermediate features",
        f"{len(intermediate)} of the {SEARCHED:,} most influential features promote France through their "
        "logit lens, and swapping the landmark's own features does not move the answer either: the "
        "landmark's identity reaches the last token through attention and error nodes that this graph does "
        "not decompose (in the table above, half of the influence sits on earlier positions).",
    )


# ---------------------------------------------------------------------------------------------------------
# 3. Multilingual concepts
# ---------------------------------------------------------------------------------------------------------

LANGUAGES = {
    "English": ('The opposite of "small" is "', "small", ["large", "big", "Large", "Big"]),
    "French": ('Le contraire de "petit" est "', "petit", ["grand", "gros", "Grand"]),
    "Spanish": ('Lo contrario de "pequeño" es "', "pequeño", ["grande", "gran", "Grande"]),
}
"""The same question per language: (prompt, the concept word, answers)."""
CONTROL = 'The opposite of "cold" is "'


def active_sets(report: Report, prompt: str, position: int) -> list[set[int]]:
    """The active features at ``position`` of ``prompt``, one set per layer."""
    return [set(acts[position].nonzero().flatten().tolist()) for acts in report.feature_activations(prompt)]


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(len(a | b), 1)


def multilingual(report: Report) -> None:
    report.lines += [
        "## 3. Multilingual concepts",
        "",
        "The paper found that the same question in English, French and Chinese runs through shared, "
        "language-independent features in the middle of the model, with language-specific ones at the "
        "ends. Here the antonym of “small” is asked in English, French and Spanish.",
        "",
    ]
    report.behaviour(
        [(prompt, ", ".join(f"`{a}`" for a in answers[:2])) for prompt, _, answers in LANGUAGES.values()], 10
    )
    answered = {}
    for language, (prompt, _, answers) in LANGUAGES.items():
        answered[language] = report.top(prompt, 1)[0][0] in answers
    present = all(answered.values())
    report.lines += [
        "Answered in its own language: "
        + ", ".join(f"{language} {'yes' if ok else '**no**'}" for language, ok in answered.items())
        + ". The behaviour counts as present when all three are.",
        "",
        "Overlap of active features (Jaccard index of the sets of active transcoder features, layer by "
        "layer) on the concept word's last token and on the last token, for each pair of languages; the "
        "control "
        f"pair is English “small” against English {quote(CONTROL)} (a different concept, same language).",
        "",
    ]
    concept_sets, last_sets = {}, {}
    for language, (prompt, word, _) in LANGUAGES.items():
        position = report.position_after(prompt, prompt[: prompt.index(word) + len(word)])
        concept_sets[language] = active_sets(report, prompt, position)
        last_sets[language] = active_sets(report, prompt, -1)
    control_concept = active_sets(
        report, CONTROL, report.position_after(CONTROL, CONTROL[: CONTROL.index("cold") + 4])
    )
    control_last = active_sets(report, CONTROL, -1)
    pairs = [("English", "French"), ("English", "Spanish"), ("French", "Spanish")]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    summary = {}
    for axis, (where, sets, control) in zip(
        axes,
        [("concept word", concept_sets, control_concept), ("last token", last_sets, control_last)],
        strict=True,
    ):
        for a, b in pairs:
            curve = [jaccard(x, y) for x, y in zip(sets[a], sets[b], strict=True)]
            summary[(where, a, b)] = curve
            axis.plot(curve, label=f"{a}–{b}")
        curve = [jaccard(x, y) for x, y in zip(sets["English"], control, strict=True)]
        summary[(where, "control", "")] = curve
        axis.plot(curve, label="control (English, other concept)", color="black", ls="--")
        axis.set_title(where)
        axis.set_xlabel("layer")
    axes[0].set_ylabel("Jaccard overlap of active features")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(report.figures / "multilingual-overlap.png")
    plt.close(figure)
    n_layers = report.transcoders.n_layers
    thirds = [
        range(0, n_layers // 3),
        range(n_layers // 3, 2 * n_layers // 3),
        range(2 * n_layers // 3, n_layers),
    ]
    report.lines += [
        "| where | pair | early layers | middle layers | late layers |",
        "|---|---|---:|---:|---:|",
    ]
    for (where, a, b), curve in summary.items():
        name = f"{a}–{b}" if b else "control"
        cells = " | ".join(f"{np.mean([curve[i] for i in third]):.3f}" for third in thirds)
        report.lines.append(f"| {where} | {name} | {cells} |")
    report.lines += ["", "![overlap](biology/multilingual-overlap.png)", ""]
    middle = thirds[1]
    cross = np.mean([np.mean([summary[("concept word", a, b)][i] for i in middle]) for a, b in pairs])
    control_middle = np.mean([summary[("concept word", "control", "")][i] for i in middle])
    ends = np.mean(
        [np.mean([summary[("concept word", a, b)][i] for i in [*thirds[0], *thirds[2]]]) for a, b in pairs]
    )
    report.lines += [
        "**Hypothesis.** The concept is shared across languages: (a) on the concept word, the cross-language "
        "overlap in the middle layers exceeds the overlap with a different concept in the same language; "
        "(b) it peaks in the middle (above the early and late layers' mean); (c) in the English graph, "
        "ablating the concept word's influential features that are also active on the French and Spanish "
        "concept words lowers P(answer) more than ablating as many English-only ones.",
        "",
        f"Measured on the concept word: cross-language overlap in the middle layers {cross:.3f}, the "
        f"same-language control {control_middle:.3f}, cross-language overlap in the early and late layers "
        f"{ends:.3f}.",
        "",
    ]
    prompt, word, answers = LANGUAGES["English"]
    explained = report.explain(prompt)
    position = report.position_after(prompt, prompt[: prompt.index(word) + len(word)])
    candidates = explained.top_features(position, 200)
    shared, english_only = [], []
    for member in candidates:
        layer, index, _ = parse_feature_id(member)
        in_both = index in concept_sets["French"][layer] and index in concept_sets["Spanish"][layer]
        (shared if in_both else english_only).append(member)
    count = min(GROUP_SIZE, len(shared), len(english_only))
    explained.groups = {"shared": shared[:count], "English only": english_only[:count]}
    report.graph(
        explained,
        "multilingual",
        f"among the 200 most influential features on ` small`'s last token, **shared** are the {count} most "
        "influential also active on `petit` and `pequeño`; **English only** the "
        f"{count} most influential active on neither or one of them.",
    )
    answers = report.single_tokens(answers)
    tests = [cross > control_middle, cross > ends]
    if count:
        runs = [
            intervene(
                report.model,
                report.transcoders,
                prompt,
                [FeatureEdit.ablate(explained.supernode(name))],
                top_k=1,
            )
            for name in explained.groups
        ]
        before = report.mass(runs[0], answers, after=False)
        after = [report.mass(run, answers) for run in runs]
        report.lines += [
            f"P(answer: {', '.join(answers)}) is {before:.3f} unedited; ablating **shared** gives "
            f"{after[0]:.3f}, ablating **English only** {after[1]:.3f}.",
            "",
        ]
        tests.append(after[0] < after[1])
    else:
        tests.append(False)
    report.check(explained, "multilingual")
    report.conclude(
        "Multilingual concepts",
        "the concept runs through features shared by the three languages",
        present,
        tests,
        "answered in "
        + ", ".join(f"{language} {'yes' if ok else 'no'}" for language, ok in answered.items())
        + f"; middle-layer overlap {cross:.2f} vs control {control_middle:.2f}",
        f"the languages share fewer active features on the concept word ({cross:.2f} in the middle layers) "
        f"than two concepts in one language ({control_middle:.2f}); with French and Spanish unanswered, the "
        "tool cannot tell a missing shared concept from features that are shared but read out only in "
        "English.",
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Addition
# ---------------------------------------------------------------------------------------------------------

ADDITION = "Q: What is {a} + {b}?\nA: {a} + {b} = "


def answer_of(report: Report, a: int, b: int) -> str:
    text = report.greedy(ADDITION.format(a=a, b=b), 4)
    return re.match(r"\d*", text).group()


def addition(report: Report) -> None:
    report.lines += [
        "## 4. Addition",
        "",
        "The paper found that Claude adds with parallel paths: one estimates the magnitude, another computes "
        "the ones digit through “lookup table” features (e.g. “a number ending in 6 plus one ending in 9”). "
        f"Here the format is {quote(ADDITION)} (other formats score far lower: plain “2+3=” makes the model "
        "answer `1`).",
        "",
    ]
    small = [(a, b) for a in range(10) for b in range(10)]
    rng = random.Random(0)
    large = [(rng.randrange(10, 50), rng.randrange(10, 50)) for _ in range(40)]
    small_correct = sum(answer_of(report, a, b) == str(a + b) for a, b in small)
    large_correct = sum(answer_of(report, a, b) == str(a + b) for a, b in large)
    present = small_correct >= 0.9 * len(small)
    report.lines += [
        f"Greedy answers: {small_correct} of {len(small)} sums of one-digit numbers are correct, "
        f"{large_correct} of {len(large)} sums of two-digit numbers (10–49, drawn with seed 0). The "
        "behaviour counts as present when 90% of the one-digit sums are right.",
        "",
    ]
    a, b, donor_b = 6, 9, 7
    prompt = ADDITION.format(a=a, b=b) + str(a + b)[0]
    donor_prompt = ADDITION.format(a=a, b=donor_b) + str(a + donor_b)[0]
    report.behaviour([(prompt, f"`{str(a + b)[1]}`"), (donor_prompt, f"`{str(a + donor_b)[1]}`")], 4)
    explained, donor = report.explain(prompt), report.explain(donor_prompt)
    operand = report.position_after(prompt, prompt[: prompt.rindex(str(b))] + str(b))
    explained.groups = {
        "operand 9": explained.top_features(operand),
        "ones digit": explained.top_features(-1),
    }
    report.lines += [
        "**Hypothesis** (on 6 + 9 = 15, predicting the ones digit after `1`). The ones digit is computed "
        "from features of the operands: (a) swapping the second operand's features for those of 7 (from "
        "6 + 7 = 13) makes `3` the top token; (b) swapping the last token's features for the 6 + 7 prompt's "
        "makes `3` top; (c) among the last token's 20 most influential features, some are lookup-table "
        "features: over the 45 problems a + b ≥ 10 with one-digit operands, at least 80% of their "
        "activation falls on problems whose sum ends in the same digit as 15.",
        "",
    ]
    report.graph(
        explained,
        "addition",
        f"the {GROUP_SIZE} most influential features on the second operand `9` in the answer line "
        f"(position {operand}) and on the last token.",
    )
    groups = {name: explained.supernode(name) for name in explained.groups}
    target = str(a + donor_b)[1]
    trials = [
        Trial(
            "ablate operand 9",
            [FeatureEdit.ablate(groups["operand 9"])],
            "P(5) below half",
            falls_below_half(report, [str(a + b)[1]]),
        ),
        Trial(
            "swap operand 9 → 7",
            swap(groups["operand 9"], report.transplant(donor, operand, 2.0, operand)),
            "`3` top",
            becomes_top(report, [target]),
        ),
        Trial(
            "swap last token 15 → 13",
            swap(groups["ones digit"], report.transplant(donor, -1, 2.0, -1)),
            "`3` top",
            becomes_top(report, [target]),
        ),
    ]
    outcomes = report.trials(prompt, trials, [str(a + b)[1], target, "4", "6"])
    problems = [(x, y) for x in range(10) for y in range(10) if x + y >= 10]
    members = explained.groups["ones digit"]
    table = np.zeros((len(members), len(problems)))
    for column, (x, y) in enumerate(problems):
        acts = report.activations(ADDITION.format(a=x, b=y) + "1", -1)
        for row, member in enumerate(members):
            layer, index, _ = parse_feature_id(member)
            table[row, column] = acts.get((layer, index), 0.0)
    ones = np.array([(x + y) % 10 for x, y in problems])
    totals = table.sum(1)
    selectivity = np.array(
        [
            table[row, ones == (a + b) % 10].sum() / totals[row] if totals[row] > 0 else 0.0
            for row in range(len(members))
        ]
    )
    with_a = np.array([x == a or y == a for x, y in problems])
    with_b = np.array([x == b or y == b for x, y in problems])
    operand_share = np.array(
        [
            table[row, with_a | with_b].sum() / totals[row] if totals[row] > 0 else 0.0
            for row in range(len(members))
        ]
    )
    lookup = [m for m, s in zip(members, selectivity, strict=True) if s >= 0.8]
    report.lines += [
        "The last token's 20 most influential features over the 45 problems: the share of each one's "
        "activation on sums ending in 5 (like 15), and on problems with a 6 or a 9 among the operands.",
        "",
        "| feature | label | on sums ending in 5 | on problems with a 6 or 9 | problems where active |",
        "|---|---|---:|---:|---:|",
    ]
    for row, member in enumerate(members):
        report.lines.append(
            f"| `{member}` | {report.label(member)} | {selectivity[row]:.2f} | {operand_share[row]:.2f} | "
            f"{int((table[row] > 0).sum())} of {len(problems)} |"
        )
    order = np.argsort([10 * (x + y) + x for x, y in problems], kind="stable")
    figure, axes = plt.subplots(figsize=(11, 5), dpi=110)
    shown = table[:, order] / np.maximum(table.max(1, keepdims=True), 1e-12)
    axes.imshow(shown, aspect="auto", cmap="Greys")
    axes.set_xticks(
        range(len(problems)), [f"{problems[i][0]}+{problems[i][1]}" for i in order], rotation=90, fontsize=6
    )
    axes.set_yticks(range(len(members)), members, fontsize=6)
    axes.set_title(
        "activation of the last token's 20 most influential features (6 + 9 = 1…) on every a + b ≥ 10, "
        "scaled per feature; problems sorted by sum",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(report.figures / "addition-lookup.png")
    plt.close(figure)
    report.lines += [
        "",
        f"Lookup-table features (≥ 80% on sums ending in 5): {len(lookup)}.",
        "",
        "![lookup](biology/addition-lookup.png)",
        "",
    ]
    report.check(explained, "addition")
    report.conclude(
        "Addition",
        "the ones digit comes from operand features through lookup-table features",
        present,
        [outcomes[1], outcomes[2], bool(lookup)],
        f"{small_correct}/{len(small)} one-digit and {large_correct}/{len(large)} two-digit sums right; "
        f"{len(lookup)} lookup-table features",
        "the last token's most influential features are low-layer features of the digits and punctuation, "
        f"and {len(lookup)} of {len(members)} are selective for the ones digit (above 80%); when swapping "
        "the operand's or the last token's groups does not change the digit, the computation happens in "
        "what the groups leave out (error nodes, attention from the operands' positions).",
    )


# ---------------------------------------------------------------------------------------------------------
# 5. Known and unknown entities
# ---------------------------------------------------------------------------------------------------------

KNOWN = ["Albert Einstein", "Michael Jordan", "Marie Curie", "William Shakespeare"]
UNKNOWN = ["Mirtel Vandoke", "Michael Batkin", "Sorel Quintabe", "Jarvik Oldenmere"]
"""Names the model should know, and made-up ones of the same shape."""
DECLINES = (
    "I'm sorry",
    "I don't",
    "I do not",
    "not aware",
    "no information",
    "not familiar",
    "couldn't find",
    "could not find",
    "unable",
    "I'm not sure",
)
HEDGES = ["I", "Unfortunately", "Sorry"]


def entities(report: Report) -> None:
    report.lines += [
        "## 5. Known and unknown entities",
        "",
        "The paper found that Claude's default is to say it cannot answer, and that “known entity” features "
        "suppress this default; hallucinations are misfires of that suppression. Here the model is asked "
        f"“Who is …?” in its chat format ({quote(CHAT.format(question='Who is …?'))}) about four well-known "
        "people and four made-up names.",
        "",
    ]
    rows = [
        (CHAT.format(question=f"Who is {name}?"), "an answer" if name in KNOWN else "a refusal")
        for name in KNOWN + UNKNOWN
    ]
    report.behaviour(rows, 24)
    declined = {
        name: any(marker in report.greedy(CHAT.format(question=f"Who is {name}?"), 24) for marker in DECLINES)
        for name in KNOWN + UNKNOWN
    }
    hedge = {
        name: report.mass(
            intervene(report.model, report.transcoders, CHAT.format(question=f"Who is {name}?"), [], top_k=1),
            report.single_tokens(HEDGES),
            after=False,
        )
        for name in KNOWN + UNKNOWN
    }
    unknown_declined = sum(declined[name] for name in UNKNOWN)
    known_declined = sum(declined[name] for name in KNOWN)
    present = unknown_declined >= len(UNKNOWN) / 2 and known_declined == 0
    known_hedge, unknown_hedge = np.mean([hedge[n] for n in KNOWN]), np.mean([hedge[n] for n in UNKNOWN])
    report.lines += [
        f"Declines (the answer contains one of {', '.join(repr(d) for d in DECLINES[:5])}, …): "
        f"{unknown_declined} of {len(UNKNOWN)} made-up names, {known_declined} of {len(KNOWN)} known ones. "
        "The behaviour counts as present when the model declines at least half of the made-up names and none "
        "of the known ones.",
        "",
        "Probability that the answer starts with a hedge (`I`, `Unfortunately`, `Sorry`): "
        + ", ".join(f"{name} {hedge[name]:.3f}" for name in KNOWN + UNKNOWN)
        + f" (mean {known_hedge:.3f} known, {unknown_hedge:.3f} made up).",
        "",
        "**Hypothesis** (on “Who is Michael Jordan?” against “Who is Michael Batkin?”). A default “can't "
        "answer” path exists and knowledge of the entity suppresses it: (a) the hedge is at least twice as "
        "likely for made-up names (mean over the names); (b) ablating the features on ` Jordan` (its 20 most "
        "influential) at least doubles the hedge's probability; (c) adding those features on ` Batkin` "
        "(twice their activation) halves it.",
        "",
    ]
    prompt = CHAT.format(question="Who is Michael Jordan?")
    unknown_prompt = CHAT.format(question="Who is Michael Batkin?")
    explained = report.explain(prompt)
    name_position = report.position_after(prompt, "<|im_start|>user\nWho is Michael Jordan")
    unknown_position = report.position_after(unknown_prompt, "<|im_start|>user\nWho is Michael Batkin")
    explained.groups = {
        "known entity": explained.top_features(name_position),
        "last token": explained.top_features(-1),
    }
    report.graph(
        explained,
        "entities",
        f"the {GROUP_SIZE} most influential features on ` Jordan` (position {name_position}) and on the last "
        "token.",
    )
    hedges = report.single_tokens(HEDGES)
    outcomes = report.trials(
        prompt,
        [
            Trial(
                "ablate known entity",
                [FeatureEdit.ablate(explained.supernode("known entity"))],
                "hedge ×2",
                rises_twofold(report, hedges),
            )
        ],
        [*hedges, "Michael"],
    )
    edits = report.transplant_features(prompt, explained.groups["known entity"], 2.0, unknown_position)
    outcomes += report.trials(
        unknown_prompt,
        [
            Trial(
                "add Jordan's known-entity features on ` Batkin`",
                edits,
                "hedge below half",
                falls_below_half(report, hedges),
            )
        ],
        [*hedges, "Michael"],
    )
    report.check(explained, "entities")
    report.conclude(
        "Known and unknown entities",
        "knowledge of an entity suppresses a default “can't answer” path",
        present,
        [unknown_hedge > 2 * known_hedge, *outcomes],
        f"declines {unknown_declined}/{len(UNKNOWN)} made-up names; hedge probability {known_hedge:.3f} "
        f"known vs {unknown_hedge:.3f} made up",
        f"the model declines {unknown_declined} of {len(UNKNOWN)} made-up names, so a suppressed default "
        f"path cannot be shown; the hedge's probability is small everywhere ({known_hedge:.3f} known, "
        f"{unknown_hedge:.3f} made up).",
    )


# ---------------------------------------------------------------------------------------------------------
# 6. Chain of thought
# ---------------------------------------------------------------------------------------------------------

COT_QUESTION = "What is 8 + 6? Explain your reasoning step by step."
ANSWER_IS = "answer is "
"""Where the final answer follows (digits are tokens of their own, after the space)."""
EQUATION = re.compile(r"(\d+) ([-+*x/]) (\d+) = (\d+)")


def chain_of_thought(report: Report) -> None:
    report.lines += [
        "## 6. Chain of thought",
        "",
        "The paper compared what a model says it computed with what its graph shows: sometimes the "
        "stated steps are the real computation, sometimes the answer is produced otherwise and the steps are "
        "written to fit. Here the model explains a sum of its own accord, and the graph of its final answer "
        "is "
        "compared with its stated steps.",
        "",
    ]
    question = CHAT.format(question=COT_QUESTION)
    written = report.greedy(question, 80)
    report.lines += [
        f"Question: {quote(COT_QUESTION)}. The model writes (greedy):",
        "",
        f"> {quote(written)}",
        "",
    ]
    cut = written.rfind(ANSWER_IS)
    steps = EQUATION.findall(written)
    present = cut >= 0 and bool(steps)
    if not present:
        report.lines += ["No stated steps with a final “answer is”: nothing to compare.", ""]
        report.conclude(
            "Chain of thought",
            "the answer is read from the last stated step, not computed from the question",
            False,
            [False],
            "no final answer written",
            "without a stated answer there is nothing to compare the graph with.",
        )
        return
    prompt = question + written[: cut + len(ANSWER_IS)]
    stated = steps[-1][3]
    true_sum = str(8 + 6)
    answer_token = report.top(prompt, 1)[0][0]
    last_step = EQUATION.finditer(written)
    *_, match = last_step
    result_end = len(question) + match.end(4)
    result_position = report.position_after(prompt, prompt[:result_end])
    question_end = report.position_after(prompt, question)
    explained = report.explain(prompt)
    influence = explained.influence_by_position()
    share_question = influence[: question_end + 1].sum() / influence.sum()
    share_result = influence[result_position] / influence.sum()
    explained.groups = {
        "stated result": explained.top_features(result_position),
        "last token": explained.top_features(-1),
    }
    report.lines += [
        f"Stated steps: {', '.join(' '.join(step[:3]) + ' = ' + step[3] for step in steps)}. The final "
        f"answer token is `{answer_token!r}`; the true sum is {true_sum}; the last stated result is "
        f"{stated}.",
        "",
        "**Hypothesis.** The answer is read from the last stated step rather than computed from the "
        "question: (a) the last step's result token carries more of the graph's influence than the whole "
        "question; (b) ablating the features on it (its 20 most influential) lowers P(answer) below half; "
        "(c) writing another result in that step (the prompt edited) makes that result the answer.",
        "",
    ]
    report.graph(
        explained,
        "chain-of-thought",
        f"the {GROUP_SIZE} most influential features on the last step's result `{stated}` (position "
        f"{result_position}) and on the last token.",
    )
    figure, axes = plt.subplots(figsize=(max(10, 0.12 * len(influence)), 3.5), dpi=110)
    axes.bar(range(len(influence)), influence / influence.sum(), color="#7f8c8d")
    axes.bar([result_position], [influence[result_position] / influence.sum()], color="#d35400")
    axes.axvline(question_end + 0.5, color="black", lw=0.8, ls="--")
    axes.set_xlabel("position (dashed: end of the question; orange: the last stated result)")
    axes.set_ylabel("share of influence")
    figure.tight_layout()
    figure.savefig(report.figures / "chain-of-thought-positions.png")
    plt.close(figure)
    report.lines += [
        f"Share of influence (features and error nodes) on the question: {share_question:.3f}; on the last "
        f"stated result: {share_result:.3f}.",
        "",
        "![influence by position](biology/chain-of-thought-positions.png)",
        "",
    ]
    watch = report.single_tokens(sorted({answer_token, stated[-1], true_sum[0], " " + stated[-1]}))
    outcomes = report.trials(
        prompt,
        [
            Trial(
                "ablate stated result",
                [FeatureEdit.ablate(explained.supernode("stated result"))],
                "P(answer) below half",
                falls_below_half(report, [answer_token]),
            )
        ],
        watch,
    )
    replacement = "7" if stated != "7" else "5"
    edited = question + written[: match.start(4)] + replacement + written[match.end(4) : cut + len(ANSWER_IS)]
    edited_top = report.top(edited, 3)
    follows = edited_top[0][0].strip() == replacement
    report.lines += [
        f"Prompt edited so that the last step reads `{match.group(0)[: -len(stated)]}{replacement}`: the top "
        f"next tokens become {', '.join(f'`{t!r}` {p:.2f}' for t, p in edited_top)} "
        f"({'follows' if follows else 'does **not** follow'} the edit).",
        "",
    ]
    report.check(explained, "chain-of-thought")
    report.conclude(
        "Chain of thought",
        "the answer is read from the last stated step, not computed from the question",
        present,
        [share_result > share_question, *outcomes, follows],
        f"answer `{answer_token.strip()}` (true sum {true_sum}); influence on the last stated result "
        f"{share_result:.2f} vs the question {share_question:.2f}",
        f"the graph of a {len(explained.graph.tokens)}-token answer spreads its influence thinly (the last "
        f"stated result holds {share_result:.3f}); which earlier tokens the answer attends to, and why, is "
        "attention's part and is not in the graph.",
    )


CASES = (planning, multi_step, multilingual, addition, entities, chain_of_thought)


def limits(report: Report) -> list[str]:
    """The last section: what the graphs leave unexplained, measured, and what each case could not show."""
    return [
        "## What the tool could not show",
        "",
        "Each graph's share of the story it cannot tell: the replacement score (how much of the path from "
        "tokens to logits runs through features rather than error nodes), the error nodes' share of the "
        "influence of all features and error nodes, the share of that influence on earlier positions (it "
        "reaches the answer through attention, which the graph freezes: the heads that carry it and why they "
        "attend there are not in the graph), and the supernode members without a label.",
        "",
        "| graph | tokens | replacement score | error-node share of influence "
        "| influence on earlier positions | supernode members without label |",
        "|---|---:|---:|---:|---:|---:|",
        *report.limits,
        "",
        "What each case could not show:",
        "",
        *report.notes,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", help="transcoder set (default: the model's quick set)")
    parser.add_argument("--features", help="feature database for labels (default: the set's own, if built)")
    parser.add_argument("--out", default="docs", help="folder for biology.md and its figures")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=[case.__name__ for case in CASES],
        help="run only these cases (default: all)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(MODEL)
    transcoders = load_transcoders(args.transcoders or ensure_quick_transcoders(model, MODEL))
    store = FeatureStore.open_for(transcoders, args.features)
    out = Path(args.out)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    report = Report(model, transcoders, store, MAX_FEATURE_NODES, figures=out / FIGURES)
    for case in CASES:
        if args.cases and case.__name__ not in args.cases:
            continue
        case(report)
        print(f"{case.__name__} done after {time.perf_counter() - started:.0f} s")
    dtype, device = str(model.dtype).removeprefix("torch."), model.device.type.upper()
    header = [
        "# The biology of SmolLM2-135M",
        "",
        "Generated by `make biology-report` (`python examples/biology_report.py`); every number below comes "
        f"from that run. Model: SmolLM2-135M-Instruct ({dtype}, {device}). Transcoders: "
        f"{describe_transcoders(transcoders, quick=args.transcoders is None)}. "
        + ("Labels: the set's feature database (automatic labels). " if store else "No labels. ")
        + f"Each graph keeps its {MAX_FEATURE_NODES:,} most influential features (the others are folded "
        "into error nodes). Edits are open loop with attention frozen to the clean run; a swap scales a "
        "group "
        "by −1 and adds another prompt's group at twice its activations there; probabilities are of the next "
        "token; continuations are greedy and run with the edits applied at every step.",
        "",
        "Verdicts follow stated rules: **absent** when the model does not show the behaviour (measured "
        "first, by the rule given in each section), else **held** when every test of the hypothesis passes, "
        "**partly** when some do, **failed** when none does. Where the behaviour is absent the tests still "
        "run, on the prompt the model handles best, and are reported.",
        "",
        "## Summary",
        "",
        "| case | hypothesis | measured | verdict |",
        "|---|---|---|---|",
        *[f"| {v.case} | {v.hypothesis} | {v.measured} | **{v.verdict}** |" for v in report.verdicts],
        "",
    ]
    (out / "biology.md").write_text("\n".join(header + report.lines + limits(report)) + "\n")
    print(f"wrote {out / 'biology.md'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Interventions on SmolLM2-135M: writes docs/interventions.md and its figures from scratch.

Three behaviours, each explained by an attribution graph and then tested by editing features on the real
model: factual recall ("The capital of France is" → Paris), indirect object identification ("When Mary and
John went to the store, John gave a drink to" → Mary) and an acronym ("The National Digital Analytics Group
(N" → DA). Groups of features (supernodes) are chosen by rules stated in the report, not by hand, so the
report is reproducible: ``make interventions-report`` (or ``python examples/interventions_report.py``).
It uses the model's quick transcoder set (trained on first use) and, when it exists, the set's feature
database for labels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")

from circuitmap import (  # noqa: E402
    FeatureEdit,
    Supernode,
    check_graph,
    generate_with,
    intervene,
    load_model,
    load_transcoders,
    prune,
)
from circuitmap.cache import ensure_quick_transcoders  # noqa: E402
from circuitmap.features import FeatureStore  # noqa: E402
from circuitmap.graphs import PruneConfig, graph_scores  # noqa: E402
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
CONTINUATION_TOKENS = 12
COLOURS = ["#d35400", "#2471a3", "#1e8449", "#8e44ad", "#b7950b"]


@dataclass
class Context(Study):
    """A study of the model and transcoders, and the report being written about it."""

    figures: Path = field(kw_only=True)
    lines: list[str] = field(default_factory=list, kw_only=True)
    summary: list[str] = field(default_factory=list, kw_only=True)
    checks: list[str] = field(default_factory=list, kw_only=True)


@dataclass
class Trial:
    """A named list of edits and what the hypothesis behind it expects: ``token`` becomes the top next token
    (``expect="top"``), or its probability falls below half of the clean one (``expect="drop"``)."""

    name: str
    edits: list
    expect: str
    token: str


def run_trials(
    ctx: Context, explained: Explained, title: str, trials: Sequence[Trial], watch: Sequence[str]
) -> None:
    """Run each trial, and report the watched tokens' probabilities, the top token and the greedy
    continuation beside the original; each trial's verdict also goes to the summary."""
    prompt = explained.prompt
    original = generate_with(ctx.model, ctx.transcoders, prompt, [], CONTINUATION_TOKENS)
    header = " | ".join(f"P({token.strip()})" for token in watch)
    ctx.lines += [
        f"#### {title}",
        "",
        f"| intervention | {header} | top next token | greedy continuation |",
        "|---|" + "---:|" * len(watch) + "---|---|",
    ]
    clean = intervene(ctx.model, ctx.transcoders, prompt, [], top_k=1)
    cells = " | ".join(f"{ctx.probability(clean, token, after=False):.3f}" for token in watch)
    top, p = clean.top_before[0]
    ctx.lines.append(f"| none | {cells} | `{top!r}` ({p:.2f}) | {quote(original)} |")
    for trial in trials:
        result = intervene(ctx.model, ctx.transcoders, prompt, trial.edits, top_k=1)
        continuation = generate_with(ctx.model, ctx.transcoders, prompt, trial.edits, CONTINUATION_TOKENS)
        cells = " | ".join(f"{ctx.probability(result, token):.3f}" for token in watch)
        top, p = result.top_after[0]
        ctx.lines.append(f"| {trial.name} | {cells} | `{top!r}` ({p:.2f}) | {quote(continuation)} |")
        before, after = (
            ctx.probability(result, trial.token, after=False),
            ctx.probability(result, trial.token),
        )
        if trial.expect == "top":
            expectation = f"`{trial.token!r}` becomes the top token"
            held = top == trial.token
        else:
            expectation = f"P(`{trial.token!r}`) falls below half"
            held = after < before / 2
        outcome = f"P(`{trial.token!r}`) {before:.3f} → {after:.3f}; top `{top!r}` ({p:.2f})"
        verdict = "yes" if held else "**no**"
        ctx.summary.append(f"| {prompt} | {trial.name} | {expectation} | {outcome} | {verdict} |")
    ctx.lines.append("")


def describe_graph(ctx: Context, explained: Explained, slug: str) -> None:
    """The graph's size and scores, its supernodes with labels, and a drawing of the pruned graph."""
    graph = explained.graph
    settings = PruneConfig()
    pruned = prune(graph, settings)
    full, kept = graph_scores(graph), graph_scores(graph, pruned.node_mask, pruned.edge_mask)
    targets = ", ".join(
        f"`{name!r}` ({prob:.2f})" for name, prob in zip(graph.target_names, graph.target_probs, strict=True)
    )
    ctx.lines += [
        f"Graph: {graph.n_features:,} active features, {graph.n_edges:,} edges; targets {targets}.",
        f"Pruned (node threshold {settings.node_threshold:g}, edge threshold {settings.edge_threshold:g}): "
        f"{int(pruned.node_mask.sum()):,} nodes, "
        f"{int(pruned.edge_mask.sum()):,} edges. Replacement score {full.replacement:.2f} "
        f"(pruned {kept.replacement:.2f}), completeness {full.completeness:.2f} "
        f"(pruned {kept.completeness:.2f}).",
        "",
        f"![pruned graph](interventions/{slug}-graph.png)",
        "",
        "| supernode | features (layer_index_position: label) |",
        "|---|---|",
    ]
    for name, members in explained.groups.items():
        shown = ", ".join(f"`{m}`" + (f" {ctx.label(m)}" if ctx.label(m) else "") for m in members[:8])
        more = f" … and {len(members) - 8} more" if len(members) > 8 else ""
        ctx.lines.append(f"| {name} | {shown}{more} |")
    ctx.lines.append("")
    draw_graph(graph, pruned, explained.groups, ctx.figures / f"{slug}-graph.png")


def run_check(ctx: Context, explained: Explained, slug: str) -> None:
    """``check_graph`` with the supernodes: the table and the plot."""
    supernodes = [Supernode(name, members) for name, members in explained.groups.items()]
    report = check_graph(ctx.model, ctx.transcoders, explained.graph, n_features=10, supernodes=supernodes)
    report.save_plot(ctx.figures / f"{slug}-check.png")
    ctx.checks.append(
        f"- `check` on “{explained.prompt}”: sign agreement {report.sign_agreement:.2f}, rank correlation "
        f"{report.rank_correlation:.2f} over {len(report.rows)} ablations."
    )
    ctx.lines += [
        "`check`: ablating each of the 10 most influential features and each supernode, open loop: "
        f"sign agreement "
        f"**{report.sign_agreement:.2f}**, rank correlation **{report.rank_correlation:.2f}** "
        f"(target `{report.target!r}`).",
        "",
        "| ablated | influence | predicted Δ | observed Δ | sign |",
        "|---|---:|---:|---:|---|",
    ]
    for row in report.rows:
        sign = "agrees" if np.sign(row.predicted) == np.sign(row.observed) else "**disagrees**"
        name = f"`{row.name}`" if row.kind == "feature" else f"supernode {row.name}"
        ctx.lines.append(
            f"| {name} | {row.influence:.4f} | {row.predicted:+.3f} | {row.observed:+.3f} | {sign} |"
        )
    ctx.lines += ["", f"![check](interventions/{slug}-check.png)", ""]


def introduce(ctx: Context, explained: Explained, title: str, rule: str, slug: str) -> None:
    """The section's heading, how its supernodes were chosen, and its graph."""
    ctx.lines += [f"## {title}", "", f"Supernodes: {rule}", ""]
    describe_graph(ctx, explained, slug)


def capital(ctx: Context) -> None:
    france = ctx.explain("The capital of France is")
    country, last = 3, len(france.graph.tokens) - 1
    others = {"Germany": " Berlin", "Italy": " Rome", "Japan": " Tokyo", "Spain": " Madrid"}
    donors = {name: ctx.explain(f"The capital of {name} is") for name in others}
    candidates = france.top_features(last, 2 * GROUP_SIZE)
    shared = set(candidates)
    for donor in donors.values():
        active = ctx.activations(donor.prompt, last)
        shared = {m for m in shared if parse_feature_id(m)[:2] in active}
    france.groups = {
        "France": france.top_features(country),
        "say a capital": [m for m in candidates if m in shared],
    }
    rule = (
        f"**France** is the {GROUP_SIZE} most influential features on the ` France` token; **say a capital** "
        f"is those among the {2 * GROUP_SIZE} most influential features on the last token that are also "
        "active "
        "on the last token of “The capital of X is” for Germany, Italy, Japan and Spain (so they carry “a "
        "capital comes next” rather than Paris in particular)."
    )
    introduce(ctx, france, "Factual recall: “The capital of France is” → Paris", rule, "capital")
    group = {name: Supernode(name, members) for name, members in france.groups.items()}
    trials = [
        Trial("ablate France", [FeatureEdit.ablate(group["France"])], "drop", " Paris"),
        Trial("France × −1", [FeatureEdit.scale(group["France"], -1.0)], "drop", " Paris"),
        Trial("ablate say a capital", [FeatureEdit.ablate(group["say a capital"])], "drop", " Paris"),
        Trial("say a capital × −1", [FeatureEdit.scale(group["say a capital"], -1.0)], "drop", " Paris"),
    ]
    run_trials(ctx, france, "Ablations", trials, [" Paris", " the"])
    ctx.lines += [
        "Swapping the country: the France supernode is scaled by −1 and the other country's own supernode "
        f"(its {GROUP_SIZE} most influential features on its country token, in its own graph) is added on "
        "the "
        "` France` token at twice its activations there.",
        "",
    ]
    for name, answer in others.items():
        edits = swap(group["France"], ctx.transplant(donors[name], country, 2.0, country))
        run_trials(
            ctx,
            france,
            f"France → {name}",
            [Trial(f"swap in {name}", edits, "top", answer)],
            [" Paris", answer],
        )
    run_check(ctx, france, "capital")


def indirect_object(ctx: Context) -> None:
    prompt = "When Mary and John went to the store, John gave a drink to"
    ioi = ctx.explain(prompt)
    last = len(ioi.graph.tokens) - 1
    ioi.groups = {
        "Mary": ioi.top_features(1),
        "John (repeated)": ioi.top_features(9),
        "say the name": ioi.top_features(last),
    }
    rule = (
        f"the {GROUP_SIZE} most influential features on ` Mary` (position 1), on the repeated ` John` "
        "(position 9) and on the last token."
    )
    introduce(ctx, ioi, f"Indirect object: “{prompt}” → Mary", rule, "ioi")
    group = {name: Supernode(name, members) for name, members in ioi.groups.items()}
    donor = ctx.explain(prompt.replace("Mary", "Anna"))
    trials = [Trial(f"ablate {name}", [FeatureEdit.ablate(g)], "drop", " Mary") for name, g in group.items()]
    trials += [
        Trial("say the name × −1", [FeatureEdit.scale(group["say the name"], -1.0)], "drop", " Mary"),
        Trial("Mary → Anna", swap(group["Mary"], ctx.transplant(donor, 1, 2.0, 1)), "top", " Anna"),
    ]
    run_trials(ctx, ioi, "Interventions", trials, [" Mary", " John", " Anna"])
    ctx.lines += [
        "“Mary → Anna” scales the Mary supernode by −1 and adds Anna's (from the same sentence with "
        "Anna) at twice its activations, as for the countries.",
        "",
    ]
    run_check(ctx, ioi, "ioi")


def acronym(ctx: Context) -> None:
    prompt = "The National Digital Analytics Group (N"
    explained = ctx.explain(prompt)
    last = len(explained.graph.tokens) - 1
    explained.groups = {
        "Digital": explained.top_features(2),
        "Analytics": explained.top_features(3),
        "say DA": explained.top_features(last),
    }
    rule = (
        f"the {GROUP_SIZE} most influential features on ` Digital`, on ` Analytics` and on the last "
        "token `N`."
    )
    introduce(ctx, explained, f"Acronym: “{prompt}” → DA", rule, "acronym")
    group = {name: Supernode(name, members) for name, members in explained.groups.items()}
    donor = ctx.explain(prompt.replace("Digital", "Marketing"))
    trials = [Trial(f"ablate {name}", [FeatureEdit.ablate(g)], "drop", "DA") for name, g in group.items()]
    trials.append(
        Trial("Digital → Marketing", swap(group["Digital"], ctx.transplant(donor, 2, 2.0, 2)), "top", "MA")
    )
    run_trials(ctx, explained, "Interventions", trials, ["DA", "MA", "DE"])
    run_check(ctx, explained, "acronym")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", help="transcoder set (default: the model's quick set)")
    parser.add_argument("--features", help="feature database for labels (default: the set's own, if built)")
    parser.add_argument("--out", default="docs", help="folder for interventions.md and its figures")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(MODEL)
    source = args.transcoders or ensure_quick_transcoders(model, MODEL)
    transcoders = load_transcoders(source)
    store = FeatureStore.open_for(transcoders, args.features)
    out = Path(args.out)
    figures = out / "interventions"
    figures.mkdir(parents=True, exist_ok=True)
    ctx = Context(model, transcoders, store, MAX_FEATURE_NODES, figures=figures)
    for demo in (capital, indirect_object, acronym):
        demo(ctx)
        print(f"{demo.__name__} done after {time.perf_counter() - started:.0f} s")
    dtype, device = str(model.dtype).removeprefix("torch."), model.device.type.upper()
    header = [
        "# Interventions on SmolLM2-135M",
        "",
        "Generated by `make interventions-report` (`python examples/interventions_report.py`); every number "
        f"below comes from that run. Model: SmolLM2-135M-Instruct ({dtype}, {device}). Transcoders: "
        f"{describe_transcoders(transcoders, quick=args.transcoders is None)}. "
        + ("Labels: the set's feature database (automatic labels). " if store else "No labels. ")
        + "Edits are open loop with attention frozen to the clean run unless stated; probabilities are of "
        f"the next token. Each graph keeps its {MAX_FEATURE_NODES:,} most influential features (the others "
        "are folded into error nodes); supernodes are chosen by the stated rules.",
        "",
        "How to read the `check` tables: for each ablated node or supernode, *predicted Δ* is what the "
        "graph's edges predict for the target's de-meaned logit when the node's activation goes to zero "
        "(every path, linearised), *observed Δ* is what the real model does.",
        "",
    ]
    summary = [
        "## Summary",
        "",
        "Each intervention tests one claim of a graph; “held” says whether the model did what the claim "
        "predicts.",
        "",
        "| prompt | intervention | the hypothesis expects | measured | held |",
        "|---|---|---|---|---|",
        *ctx.summary,
        "",
        *ctx.checks,
        "",
    ]
    (out / "interventions.md").write_text("\n".join(header + summary + ctx.lines) + "\n")
    print(f"wrote {out / 'interventions.md'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

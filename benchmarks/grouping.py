"""Automatic supernodes tested by intervention, against random groupings of the same sizes.

For each prompt: the graph (pruned as the explorer shows it, labelled from the feature database when there
is one), its automatic grouping, then ``check`` with the groups as supernodes: each group is ablated in the
real model (attention frozen, open loop) and the observed change of the target logit is compared with the
graph's prediction (sign agreement, Spearman rank correlation). The same is done for random groupings: the
same kept features shuffled into groups of the same sizes (several seeds, averaged). "Unit" is the share of
members, ablated one at a time (the three most influential of each group), whose observed effect has the
sign of their whole group's observed effect: whether a group acts as one. The document sizes compare the
exhaustive edge list with the lighter first document the explorer loads.

    python benchmarks/grouping.py --transcoders FOLDER [--features DB] [--cut C ...] --report docs/grouping.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from circuitmap import check_graph, load_model, load_transcoders
from circuitmap.features import FeatureStore
from circuitmap.graphs import prune
from circuitmap.graphs.grouping import CUT, group_features
from circuitmap.interventions.edits import Supernode
from circuitmap.pipeline import compute_graph

PROMPTS = [
    "The capital of France is",
    "The Statue of Liberty stands in New",
    "Water is made of hydrogen and",
]
SEEDS = (0, 1, 2)
MEMBERS_TESTED = 3
CUTS = (0.3, 0.6)
"""The clustering cuts measured by default."""


def measure(model, transcoders, store, prompt: str, cuts: list[float]) -> list[dict]:
    """One record per clustering cut: the prompt's graph grouped at that cut, checked against random
    groupings of the same sizes."""
    computed = compute_graph(model, transcoders, prompt, features=store, progress=False)
    graph, document = computed.graph, computed.document
    labels = {node["node_id"]: node["clerp"] for node in document["nodes"]}
    kept = prune(graph)
    return [
        {**measure_cut(model, transcoders, graph, kept, labels, cut), "prompt": prompt, "cut": cut}
        | {"document_bytes": len(json.dumps(document, separators=(",", ":")).encode())}
        for cut in cuts
    ]


def measure_cut(model, transcoders, graph, kept, labels: dict[str, str], cut: float) -> dict:
    started = time.perf_counter()
    grouping = group_features(graph, kept, labels=labels, cut=cut)
    groups = [Supernode(group.name, group.members) for group in grouping.groups]
    automatic = check_graph(model, transcoders, graph, n_features=0, supernodes=groups)
    sizes = [len(group.members) for group in grouping.groups]
    pool = [member for group in grouping.groups for member in group.members]
    baselines = []
    for seed in SEEDS:
        shuffled = pool[:]
        random.Random(seed).shuffle(shuffled)
        bounds = np.cumsum([0, *sizes])
        random_groups = [
            Supernode(f"random {i}", shuffled[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))
        ]
        baselines.append(check_graph(model, transcoders, graph, n_features=0, supernodes=random_groups))
    wanted = {m for row in [automatic, *baselines] for r in row.rows for m in r.members[:MEMBERS_TESTED]}
    single_report = check_graph(
        model, transcoders, graph, n_features=0, supernodes=[Supernode(m, [m]) for m in sorted(wanted)]
    )
    singles = {row.name: row.observed for row in single_report.rows}
    return {
        "target": automatic.target,
        "kept_features": grouping.n_features,
        "groups": len(grouping.groups),
        "median_size": float(np.median(sizes)) if sizes else 0.0,
        "coverage": grouping.coverage,
        "automatic": summary(automatic, singles),
        "random": {
            key: float(np.nanmean([summary(b, singles)[key] for b in baselines]))
            for key in ("sign", "rank", "unit")
        },
        "rows": [
            {
                "name": group.name,
                "position": group.position,
                "layers": list(group.layers),
                "members": len(group.members),
                "influence": group.influence,
                "predicted": row.predicted,
                "observed": row.observed,
            }
            for group, row in zip(grouping.groups, automatic.rows, strict=True)
        ],
        "seconds": time.perf_counter() - started,
    }


def summary(report, singles: dict[str, float]) -> dict:
    """Sign agreement and rank correlation of a check, and the unit agreement of its groups."""
    agree = [
        np.sign(singles[member]) == np.sign(row.observed)
        for row in report.rows
        for member in row.members[:MEMBERS_TESTED]
        if singles[member] != 0 and row.observed != 0
    ]
    return {
        "sign": report.sign_agreement,
        "rank": report.rank_correlation,
        "unit": float(np.mean(agree)) if agree else math.nan,
    }


def report(records: list[dict], machine: str) -> str:
    default = [r for r in records if r["cut"] == CUT]
    lines = [
        "# Automatic supernodes",
        "",
        "Generated by `benchmarks/grouping.py`. Each graph is pruned as the explorer shows it and grouped",
        "automatically (`circuitmap.group_features`); each group is then ablated in the real model and the",
        "observed change of the target logit compared with the graph's prediction. The baseline shuffles",
        f"the same features into groups of the same sizes (seeds {', '.join(map(str, SEEDS))}, averaged).",
        f"*Unit*: the share of members (the {MEMBERS_TESTED} most influential of each group), ablated alone,",
        "whose effect has the sign of their whole group's. *Coverage*: the groups' share of the kept",
        f"features' influence. *Cut*: the clustering's distance threshold (the default is {CUT}); the",
        "per-group tables below use the default.",
        "",
        f"Machine: {machine}.",
        "",
        "| prompt | target | kept features | cut | groups | median size | coverage | "
        "sign: groups / random | rank: groups / random | unit: groups / random |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        a, b = r["automatic"], r["random"]
        lines.append(
            f"| {r['prompt']} | {r['target']!r} | {r['kept_features']} | {r['cut']:g} | {r['groups']} | "
            f"{r['median_size']:g} | {r['coverage']:.2f} | "
            f"{a['sign']:.2f} / {b['sign']:.2f} | {a['rank']:.2f} / {b['rank']:.2f} | "
            f"{a['unit']:.2f} / {b['unit']:.2f} |"
        )
    for r in default:
        lines += [
            "",
            f"## {r['prompt']!r} → {r['target']!r}",
            "",
            "| group | position | layers | members | influence | predicted | observed | sign |",
            "|---|---:|---|---:|---:|---:|---:|---|",
        ]
        for row in r["rows"]:
            ok = "ok" if np.sign(row["predicted"]) == np.sign(row["observed"]) else "WRONG"
            low, high = row["layers"]
            lines.append(
                f"| {row['name'].replace('|', '/')} | {row['position']} | {low}–{high} | {row['members']} | "
                f"{row['influence']:.4f} | {row['predicted']:.3f} | {row['observed']:.3f} | {ok} |"
            )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--transcoders", required=True)
    parser.add_argument("--features", type=Path, help="the set's feature database, for labels")
    parser.add_argument("--report", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every record, groups included, as JSON here")
    parser.add_argument(
        "--cut",
        type=float,
        action="append",
        help=f"clustering cut to measure (repeatable; default {', '.join(map(str, CUTS))})",
    )
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    args = parser.parse_args()
    model = load_model(args.model)
    transcoders = load_transcoders(args.transcoders)
    store = FeatureStore(args.features) if args.features else None
    records = []
    for prompt in args.prompts:
        for record in measure(model, transcoders, store, prompt, args.cut or list(CUTS)):
            records.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    if args.report:
        args.report.write_text(report(records, machine))


if __name__ == "__main__":
    main()

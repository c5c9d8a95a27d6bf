"""How faithful the attribution graphs of a transcoder set are, over a fixed list of prompts.

For every prompt: the graph's replacement and completeness scores (full graph and pruned graph), then
``check``: the ten most influential features are ablated one at a time in the real model (attention frozen,
open loop) and the observed change of the target logit is compared with the graph's prediction, by sign
agreement and Spearman rank correlation. Prompts cover factual recall, indirect objects, acronyms, units
and landmarks; none of them was used to tune anything. Means over prompts close the table.

    python benchmarks/faithfulness.py --transcoders quick=FOLDER [--transcoders standard=FOLDER ...]
"""

from __future__ import annotations

import argparse
import math
import time

from circuitmap import check_graph, load_model, load_transcoders
from circuitmap.pipeline import compute_graph

PROMPTS = [
    ("factual recall", "The Eiffel Tower is located in the city of"),
    ("factual recall", "The capital of Japan is"),
    ("factual recall", "Water is made of hydrogen and"),
    ("indirect object", "When Mary and John went to the store, John gave a drink to"),
    ("indirect object", "After Sarah and Tom had lunch, Tom handed the bill to"),
    ("acronym", "The National Aeronautics and Space Administration (NASA"),
    ("acronym", "The World Health Organization (W"),
    ("units", "One kilometre is one thousand"),
    ("units", "The temperature was thirty degrees"),
    ("landmarks", "The Statue of Liberty stands in New"),
    ("landmarks", "The Great Wall is in"),
]


def measure(model, transcoders, prompt: str) -> dict:
    started = time.perf_counter()
    computed = compute_graph(model, transcoders, prompt, progress=False)
    scores = computed.document["metadata"]["scores"]
    report = check_graph(model, transcoders, computed.graph, n_features=10)
    return {
        "replacement": (scores["full"]["replacement"], scores["exported"]["replacement"]),
        "completeness": (scores["full"]["completeness"], scores["exported"]["completeness"]),
        "sign": report.sign_agreement,
        "rank": report.rank_correlation,
        "target": report.target,
        "seconds": time.perf_counter() - started,
    }


def mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--transcoders", action="append", required=True, metavar="NAME=FOLDER", help="a set to measure"
    )
    args = parser.parse_args()
    model = load_model(args.model)
    for spec in args.transcoders:
        name, _, folder = spec.partition("=")
        transcoders = load_transcoders(folder)
        print(f"\n## {name} ({folder})\n")
        print("| task | prompt | target | replacement full / pruned | completeness full / pruned |", end="")
        print(" sign | rank |")
        print("|---|---|---|---:|---:|---:|---:|")
        rows = []
        for task, prompt in PROMPTS:
            row = measure(model, transcoders, prompt)
            rows.append(row)
            print(f"| {task} | {prompt} | {row['target']!r} | {cells(row)} |", flush=True)
        means = {
            key: tuple(mean([r[key][i] for r in rows]) for i in (0, 1))
            for key in ("replacement", "completeness")
        }
        means.update({key: mean([r[key] for r in rows]) for key in ("sign", "rank")})
        print(f"| mean | {len(rows)} prompts | | {cells(means)} |")


def cells(row: dict) -> str:
    replacement, completeness = row["replacement"], row["completeness"]
    return (
        f"{replacement[0]:.3f} / {replacement[1]:.3f} | {completeness[0]:.3f} / {completeness[1]:.3f} | "
        f"{row['sign']:.2f} | {row['rank']:.2f}"
    )


if __name__ == "__main__":
    main()

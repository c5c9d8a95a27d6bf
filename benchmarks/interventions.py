"""Interventions on SmolLM2-135M with the quick transcoder set: latency of one intervention, generation speed
with and without edits, and the time of ``check`` on the default prompt's graph. Prints medians of repeats.

Usage: python benchmarks/interventions.py [--transcoders DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from circuitmap import (
    FeatureEdit,
    attribute,
    check_graph,
    generate_with,
    intervene,
    load_model,
    load_transcoders,
)
from circuitmap.cache import quick_transcoders_folder
from circuitmap.graphs import NodeKind

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", default=str(quick_transcoders_folder(MODEL)))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load_model(MODEL)
    transcoders = load_transcoders(args.transcoders)
    graph = attribute(model, transcoders, PROMPT, max_feature_nodes=4096, progress=False)
    features = graph.nodes_of(NodeKind.FEATURE)
    group = [graph.node_id(int(n)) for n in features[graph.position[features] == 3][:20]]
    edits = [FeatureEdit.scale(node, -1.0) for node in group]
    print(
        f"{model}, {transcoders.n_layers} layers × {transcoders.d_features} features, "
        f"{torch.get_num_threads()} threads"
    )
    for mode in ("open_loop", "constrained"):
        seconds = timed(lambda m=mode: intervene(model, transcoders, PROMPT, edits, mode=m), args.repeats)
        print(f"intervene ({mode}, 20 feature edits, 5 tokens): median {seconds * 1000:.0f} ms")
    tokens = 40
    plain = timed(lambda: model.generate(PROMPT, tokens), args.repeats)
    ours = timed(lambda: generate_with(model, transcoders, PROMPT, [], tokens), args.repeats)
    edited = timed(lambda: generate_with(model, transcoders, PROMPT, edits, tokens), args.repeats)
    steer = [FeatureEdit.set((12, None, 7), 5.0)]
    every = timed(lambda: generate_with(model, transcoders, PROMPT, steer, tokens), args.repeats)
    print(
        f"generation of {tokens} tokens, median: model.generate {plain:.2f} s, generate_with without edits "
        f"{ours:.2f} s, with 20 prompt-position edits {edited:.2f} s, "
        f"with an every-position edit {every:.2f} s"
    )
    started = time.perf_counter()
    report = check_graph(model, transcoders, graph, n_features=10)
    print(
        f"check_graph, 10 ablations on a {graph.n_edges:,}-edge graph: {time.perf_counter() - started:.1f} s "
        f"(sign agreement {report.sign_agreement:.2f}, rank correlation {report.rank_correlation:.2f})"
    )


if __name__ == "__main__":
    main()

"""What head loadings and QK attribution cost beside the attribution itself: time and peak memory.

usage: python benchmarks/attention.py [--transcoders DIR] [--runs 3]

On SmolLM2-135M with its quick transcoder set, for the graphs (4,096-feature cap) of two prompts:

  france  "The capital of France is" (5 tokens)
  ioi     "When Mary and John went to the store, John gave a drink to" (14 tokens; docs/attention.md)

four steps are measured:

  attribute      the graph itself: the baseline
  loadings 64    head_loadings of the graph's 64 heaviest cross-position edges (top_cross_position_edges)
  loadings 256   the same for 256 edges
  qk             one qk_attribution on the graph: head 23.0, query at the last position, key at the subject
                 (" France", " Mary"); its backward pass runs through the 23 layers below the head

Each run of a step is a fresh process that loads the model and the transcoders (and the graph, which the
first attribute run saves) before the clock starts; the time covers the step only. Memory is measured afresh
for the step (Linux): the process's peak resident memory is reset through /proc/self/clear_refs just before
the step and read from /proc/self/status after it. The figures are that peak, and its rise over the resident
memory just before the step (the step's own working memory). Medians over the runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

MODEL = "smollm2-135m"
MAX_FEATURE_NODES = 4096
PROMPTS = {
    "france": ("The capital of France is", 3),
    "ioi": ("When Mary and John went to the store, John gave a drink to", 1),
}
"""Each prompt, and the key position of its QK attribution (the subject's token)."""
QK_HEAD = (23, 0)
STEPS = ("attribute", "loadings 64", "loadings 256", "qk")


def memory_mib(field: str) -> float:
    """One memory figure of this process from /proc/self/status (``VmRSS``: now, ``VmHWM``: the peak)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def run_once(prompt_name: str, step: str, transcoders_dir: str, graph_path: str) -> dict:
    """One timed step in this process; returns its figures."""
    import circuitmap
    from circuitmap.attribution import head_loadings, qk_attribution, top_cross_position_edges
    from circuitmap.graphs import Graph

    prompt, key_position = PROMPTS[prompt_name]
    model = circuitmap.load_model(MODEL)
    transcoders = circuitmap.load_transcoders(transcoders_dir)
    if step == "attribute":
        work = partial(
            circuitmap.attribute,
            model,
            transcoders,
            prompt,
            max_feature_nodes=MAX_FEATURE_NODES,
            progress=False,
        )
    else:
        graph = Graph.load(graph_path)
        if step == "qk":
            last = len(graph.tokens) - 1
            work = partial(qk_attribution, model, transcoders, graph, *QK_HEAD, last, key_position)
        else:
            edges = top_cross_position_edges(graph, int(step.split()[1]))
            work = partial(head_loadings, model, transcoders, graph, edges)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = memory_mib("VmRSS")
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    peak = memory_mib("VmHWM")
    if step == "attribute":
        if not Path(graph_path).exists():
            result.save(graph_path)
        detail = f"{len(result.tokens)} tokens, {result.n_features:,} feature nodes, {result.n_edges:,} edges"
    elif step == "qk":
        detail = f"{len(result.query_nodes)} × {len(result.key_nodes)} node pairs"
    else:
        detail = f"{len(result.edges)} edges, {len(result.value):,} loadings"
    return {"seconds": seconds, "peak_mib": peak, "rise_mib": peak - before, "detail": detail}


def measure(name: str, step: str, transcoders: str, graph_path: str, runs: int) -> dict:
    """Medians of ``runs`` fresh processes running one step, with the first run's detail."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    figures = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, step, transcoders, graph_path],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        figures.append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {
        key: statistics.median(run[key] for run in figures) for key in ("seconds", "peak_mib", "rise_mib")
    }
    return {**medians, "detail": figures[0]["detail"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transcoders", help="transcoder set (default: the model's quick set)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(*args.child)))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("the benchmark reads memory through /proc/self (Linux only)")
    from circuitmap.cache import quick_transcoders_folder

    transcoders = args.transcoders or str(quick_transcoders_folder(MODEL))
    if not Path(transcoders, "config.yaml").is_file():
        sys.exit(f"no transcoder set in {transcoders}: run `make demo`, or pass --transcoders")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, Python {platform.python_version()}; medians of "
        f"{args.runs} runs; rise: peak RSS during the step minus RSS before it",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in PROMPTS:
            graph_path = str(Path(folder) / f"{name}.safetensors")
            attribution = measure(name, STEPS[0], transcoders, graph_path, args.runs)
            report(name, STEPS[0], attribution, "")
            for step in STEPS[1:]:
                figures = measure(name, step, transcoders, graph_path, args.runs)
                relative = (
                    f" = {figures['seconds'] / attribution['seconds']:.2f}× the attribution's time, "
                    f"{figures['rise_mib'] / attribution['rise_mib']:.2f}× its rise"
                )
                report(name, step, figures, relative)


def report(name: str, step: str, figures: dict, relative: str) -> None:
    print(
        f"{name:<6} {step:<12} {figures['seconds']:8.2f} s, peak RSS {figures['peak_mib']:5.0f} MiB, rise "
        f"{figures['rise_mib']:5.0f} MiB{relative} ({figures['detail']})",
        flush=True,
    )


if __name__ == "__main__":
    main()

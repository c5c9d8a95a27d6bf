"""Peak memory of the demo's whole job: attribution, pruning, scores and the viewer document.

usage: python benchmarks/memory.py [--runs 3] [--prompt TEXT] [--transcoders FOLDER]

Runs what ``circuitmap demo --no-serve`` runs on SmolLM2-135M with its quick transcoders (trained on first
use) and the feature database beside them when there is one: ``compute_graph_folder`` on the prompt (memory
check, attribution, pruning, labels, supernodes, the viewer document, the graph folder), then the graph's
scores. Each run is a fresh process; the figures are resident memory in GiB, sampled every 10 ms and read
from the kernel's high-water mark at the end: after loading the model and the set, the highest during
attribution, the highest after it (pruning, scores, document, writing), and the process's peak. Medians
over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_PROMPT = "The capital of France is"


def _resident_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _Sampler:
    """The highest resident memory seen since the last ``reset``."""

    def __init__(self):
        self.highest = _resident_gib()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.highest = max(self.highest, _resident_gib())
            time.sleep(0.01)

    def reset(self) -> float:
        highest, self.highest = max(self.highest, _resident_gib()), _resident_gib()
        return highest


def run_once(prompt: str, transcoders_dir: str | None) -> dict:
    """One measured run in this process."""
    import circuitmap
    from circuitmap.cache import ensure_quick_transcoders
    from circuitmap.features import FeatureStore
    from circuitmap.graphs.pruning import graph_scores
    from circuitmap.pipeline import compute_graph_folder

    sampler = _Sampler()
    model = circuitmap.load_model("smollm2-135m")
    folder = transcoders_dir or ensure_quick_transcoders(model, "smollm2-135m")
    transcoders = circuitmap.load_transcoders(folder)
    store = FeatureStore.open_for(transcoders, None)
    loaded = sampler.reset()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        computed = compute_graph_folder(
            model, transcoders, prompt, out, features=store, check_memory=True, progress=False
        )
        attribution_seconds = computed.seconds["attribution"]
        graph = computed.graph
        scores = graph_scores(graph)
    seconds = time.perf_counter() - started
    after = sampler.reset()
    return {
        "loaded_gib": loaded,
        "job_gib": after,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "seconds": seconds,
        "attribution_seconds": attribution_seconds,
        "edges": graph.n_edges,
        "feature_nodes": graph.n_features,
        "replacement": scores.replacement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--transcoders", help="a transcoder folder instead of the quick set")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(args.prompt, args.transcoders)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    command = [sys.executable, __file__, "--child", "--prompt", args.prompt]
    if args.transcoders:
        command += ["--transcoders", args.transcoders]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    runs = []
    for _ in range(args.runs):
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = runs[0]

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    print(
        f"{args.prompt!r}: peak {median('peak_gib'):.2f} GiB (loaded {median('loaded_gib'):.2f} GiB, "
        f"whole job {median('job_gib'):.2f} GiB), {median('seconds'):.1f} s of which attribution "
        f"{median('attribution_seconds'):.1f} s (median of {len(runs)}; {first['feature_nodes']:,} feature "
        f"nodes, {first['edges']:,} edges, replacement score {first['replacement']:.3f})"
    )


if __name__ == "__main__":
    main()

"""Attribution speed and memory on fixed workloads with seeded random transcoders.

usage: python benchmarks/attribution.py [a] [b] [b-uncapped] [long] [--runs 3] [--hog]

  a     stories260K, plt-jumprelu 5 64 512 --seed 1, "Once upon a time, there was a little girl named
        Lily. She", every feature visited
  b     SmolLM2-135M, plt-topk 30 576 4096 --topk 32 --seed 0, "The capital of France is" with the
        beginning-of-text token prepended as the reference does (4,800 active features, so the 4,096-feature
        cap binds and selection is measured), batch 256
  b-uncapped  the prompt of b without the prepended token and without a cap (3,840 features, every one
        visited)
  long  SmolLM2-135M with the transcoders of b, a 1,000-token prompt from a corpus, 4,096-feature cap
        (hours on two CPU cores: each row's backward pass pays for attention over the whole prompt)

Transcoders are written by make_transcoders.py from the shared data folder beside the repository
(../shared/tools, seeded random sets in the reference layout), so figures compare across implementations;
stories260K comes from the same folder. Each run is a fresh
process; the time covers ``attribute`` only (model and transcoder loading excluded); peak RSS is the whole
process's. Figures are medians over the runs.

--hog runs a busy loop in another process beside each measured run, as on a laptop doing something else,
to show how much a competing CPU-bound process slows attribution.
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
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "data" / "models" / "stories260K" / "stories260K.bin"
CORPUS = SHARED / "data" / "corpora" / "gutenberg" / "pride_and_prejudice.txt"
MAKE_TRANSCODERS = SHARED / "tools" / "make_transcoders.py"

WORKLOADS = {
    "a": dict(
        model=str(STORIES),
        transcoders=["plt-jumprelu", "5", "64", "512", "--seed", "1"],
        prompt="Once upon a time, there was a little girl named Lily. She",
        max_feature_nodes=None,
        batch_size=None,
    ),
    "b": dict(
        model="smollm2-135m",
        transcoders=["plt-topk", "30", "576", "4096", "--topk", "32", "--seed", "0"],
        prompt="The capital of France is",
        bos=True,
        max_feature_nodes=4096,
        batch_size=256,
    ),
    "b-uncapped": dict(
        model="smollm2-135m",
        transcoders=["plt-topk", "30", "576", "4096", "--topk", "32", "--seed", "0"],
        prompt="The capital of France is",
        max_feature_nodes=None,
        batch_size=256,
    ),
    "long": dict(
        model="smollm2-135m",
        transcoders=["plt-topk", "30", "576", "4096", "--topk", "32", "--seed", "0"],
        prompt=None,
        max_feature_nodes=4096,
        batch_size=None,
    ),
}


def run_once(name: str, transcoders_dir: str) -> dict:
    """One timed attribution in this process; returns its figures."""
    import torch

    import circuitmap

    work = WORKLOADS[name]
    model = circuitmap.load_model(work["model"])
    transcoders = circuitmap.load_transcoders(transcoders_dir)
    prompt = work["prompt"]
    if work.get("bos"):
        prompt = torch.tensor([[model.tokenizer.bos_token_id, *model.tokenizer(prompt).input_ids]])
    if prompt is None:
        ids = model.tokenizer(CORPUS.read_text()[:20_000]).input_ids[:1000]
        prompt = model.tokenizer.decode(ids)
    start = time.perf_counter()
    graph = circuitmap.attribute(
        model,
        transcoders,
        prompt,
        max_feature_nodes=work["max_feature_nodes"],
        batch_size=work["batch_size"],
        progress=False,
    )
    seconds = time.perf_counter() - start
    n_rows = graph.n_features + len(graph.target_names) + graph.info["recomputed_rows"]
    return {
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rows_per_second": n_rows / seconds,
        "tokens": len(graph.tokens),
        "active_features": graph.info["n_active_features"],
        "feature_nodes": graph.n_features,
        "edges": graph.n_edges,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workloads", nargs="*", default=["a", "b"], help=", ".join(WORKLOADS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hog", action="store_true", help="run a busy loop beside each measured run")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "TRANSCODERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_once(*args.child)))
        return
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        sys.exit(f"unknown workload(s): {', '.join(sorted(unknown))}; choose from {', '.join(WORKLOADS)}")
    if not SHARED.exists():
        sys.exit(f"{SHARED} is absent: the benchmark needs the shared models and tools")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for name in args.workloads:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [sys.executable, str(MAKE_TRANSCODERS), folder, *WORKLOADS[name]["transcoders"]],
                check=True,
                capture_output=True,
            )
            runs = []
            for _ in range(args.runs):
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
                try:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", name, folder],
                        check=True,
                        capture_output=True,
                        text=True,
                        env=env,
                    )
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        first = runs[0]
        beside = " (beside a busy loop)" if args.hog else ""
        print(
            f"{name}{beside}: {statistics.median(r['seconds'] for r in runs):.2f} s, "
            f"peak RSS {statistics.median(r['peak_rss_gib'] for r in runs):.2f} GiB, "
            f"{statistics.median(r['rows_per_second'] for r in runs):.0f} rows/s "
            f"(median of {len(runs)}; {first['tokens']} tokens, {first['active_features']} active features, "
            f"{first['feature_nodes']} feature nodes, {first['edges']:,} edges)"
        )


if __name__ == "__main__":
    main()

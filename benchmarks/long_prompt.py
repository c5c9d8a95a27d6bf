"""Long prompts: attribution time and peak memory by prompt length, beside what ``--estimate`` predicted.

usage: python benchmarks/long_prompt.py [--tokens 100 250 1000] [--set random|quick] [--runs 1]
                                        [--cap 4096] [--no-estimate]

SmolLM2-135M in float32, a 4,096-feature cap, prompts cut from the start of a corpus text to the given
number of tokens. ``random`` is the benchmark set written by make_transcoders.py from the shared data folder
beside the repository (plt-topk 30 576 4096 --topk 32 --seed 0, so figures compare across implementations);
``quick`` is the model's quick set (trained on first use). For each length a fresh process runs
``estimate_attribution`` and prints its prediction, and fresh processes then run ``attribute`` to the end:
the time covers ``attribute`` only, the peak is the process's resident high-water mark (model and set
included). Figures are medians over the runs; the error is (predicted − measured) / measured.
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
CORPUS = SHARED / "data" / "corpora" / "gutenberg" / "pride_and_prejudice.txt"
MAKE_TRANSCODERS = SHARED / "tools" / "make_transcoders.py"
RANDOM_SET = ["plt-topk", "30", "576", "4096", "--topk", "32", "--seed", "0"]


def _prompt(model, n_tokens: int) -> str:
    ids = model.tokenizer(CORPUS.read_text()[: 40 * n_tokens]).input_ids[:n_tokens]
    return model.tokenizer.decode(ids)


def run_once(mode: str, n_tokens: int, transcoders_dir: str, cap: int) -> dict:
    """``estimate`` or ``attribute`` once in this process."""
    import circuitmap
    from circuitmap.attribution import estimate_attribution

    model = circuitmap.load_model("smollm2-135m")
    transcoders = circuitmap.load_transcoders(transcoders_dir)
    prompt = _prompt(model, n_tokens)
    started = time.perf_counter()
    if mode == "estimate":
        estimate = estimate_attribution(model, transcoders, prompt, max_feature_nodes=cap)
        return {
            "seconds": estimate.seconds,
            "peak_gib": estimate.peak_bytes / 2**30,
            "estimate_seconds": time.perf_counter() - started,
        }
    graph = circuitmap.attribute(model, transcoders, prompt, max_feature_nodes=cap, progress=False)
    return {
        "seconds": time.perf_counter() - started,
        "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tokens": len(graph.tokens),
        "active_features": graph.info["n_active_features"],
        "edges": graph.n_edges,
        "recomputed_rows": graph.info["recomputed_rows"],
    }


def _child(mode: str, n_tokens: int, transcoders_dir: str, cap: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, str(n_tokens), transcoders_dir, str(cap)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[100, 250, 1000])
    parser.add_argument("--set", choices=["random", "quick"], default="random")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cap", type=int, default=4096)
    parser.add_argument("--no-estimate", action="store_true", help="skip the predictions")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, n_tokens, folder, cap = args.child
        print(json.dumps(run_once(mode, int(n_tokens), folder, int(cap))))
        return
    if not SHARED.exists():
        sys.exit(f"{SHARED} is absent: the benchmark needs the shared corpus and tools")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as scratch:
        if args.set == "random":
            folder = scratch
            command = [sys.executable, str(MAKE_TRANSCODERS), folder, *RANDOM_SET]
            subprocess.run(command, check=True, capture_output=True)
        else:
            import circuitmap
            from circuitmap.cache import ensure_quick_transcoders

            folder = str(ensure_quick_transcoders(circuitmap.load_model("smollm2-135m"), "smollm2-135m"))
        for n_tokens in args.tokens:
            predicted = None if args.no_estimate else _child("estimate", n_tokens, folder, args.cap)
            runs = [_child("attribute", n_tokens, folder, args.cap) for _ in range(args.runs)]
            seconds = statistics.median(run["seconds"] for run in runs)
            peak = statistics.median(run["peak_gib"] for run in runs)
            first = runs[0]
            line = (
                f"{n_tokens} tokens ({args.set} set): {seconds:.0f} s, peak {peak:.2f} GiB "
                f"(median of {len(runs)}; {first['active_features']:,} active features, "
                f"{first['edges']:,} edges, {first['recomputed_rows']} rows recomputed)"
            )
            if predicted is not None:
                line += (
                    f"; estimate {predicted['seconds']:.0f} s ({predicted['seconds'] / seconds - 1:+.0%}), "
                    f"{predicted['peak_gib']:.2f} GiB ({predicted['peak_gib'] / peak - 1:+.0%}), "
                    f"made in {predicted['estimate_seconds']:.0f} s"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()

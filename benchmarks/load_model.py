"""Time loading a model: the first load (GGUF dequantised, cache written) and cached loads.

usage: python benchmarks/load_model.py [SPEC] [--runs N]
Each first load uses a fresh, empty cache folder; figures are medians over the runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import time, sys
start = time.perf_counter()
import circuitmap
model = circuitmap.load_model(sys.argv[1])
print(time.perf_counter() - start)
"""


def time_load(spec: str, cache: str) -> float:
    """Seconds for one load in a fresh process (imports included), with the cache at ``cache``."""
    env = {**os.environ, "CIRCUITMAP_CACHE": cache, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    first, cached = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            first.append(time_load(args.spec, cache))
            cached.append(time_load(args.spec, cache))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        f"{args.spec}: first load {statistics.median(first):.2f} s, "
        f"cached load {statistics.median(cached):.2f} s "
        f"(medians of {args.runs}; each in a fresh process, imports included)"
    )


if __name__ == "__main__":
    main()

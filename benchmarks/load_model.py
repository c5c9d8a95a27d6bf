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
imported = time.perf_counter()
model = circuitmap.load_model(sys.argv[1])
print(imported - start, time.perf_counter() - imported)
"""


def time_load(spec: str, cache: str) -> tuple[float, float]:
    """Seconds to import circuitmap and to load ``spec`` in a fresh process, with the cache at ``cache``."""
    env = {**os.environ, "CIRCUITMAP_CACHE": cache, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, spec], capture_output=True, text=True, env=env, check=True
    )
    import_s, load_s = out.stdout.strip().splitlines()[-1].split()
    return float(import_s), float(load_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", nargs="?", default="smollm2-135m")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    first, cached, imports = [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            for times in (first, cached):
                import_s, load_s = time_load(args.spec, cache)
                times.append(load_s)
                imports.append(import_s)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"{args.spec}: first load {statistics.median(first):.2f} s, "
        f"cached load {statistics.median(cached):.2f} s, "
        f"import circuitmap {statistics.median(imports):.2f} s (medians of {args.runs}, fresh processes)"
    )


if __name__ == "__main__":
    main()

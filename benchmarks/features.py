"""Feature database: build time for every feature of SmolLM2-135M's quick transcoders, and lookup latency.

usage: python benchmarks/features.py [--tokens 1000000] [--db FILE] [--skip-build] [--lookups 200] [--runs 5]
       python benchmarks/features.py --split 14

The build reads the shared corpora folder (Gutenberg novels, Tiny Shakespeare, TinyStories, WikiText-2, in
that file order) with the default settings (contexts of 128 tokens, 20 top and 20 sampled contexts per
feature) and prints the wall time, the streaming rate and the time spent writing the dashboards. Lookups
time ``FeatureStore.get`` of random features on an open store (medians and 95th percentiles over the runs),
the same with the JSON the explorer's endpoint sends, then a few searches. ``--split N`` instead times the
parts of streaming (forward pass, encoding, bookkeeping) over N batches. The quick set is the one
``circuitmap demo`` trains into the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circuitmap import load_model, load_transcoders
from circuitmap.cache import quick_transcoders_folder
from circuitmap.features import BuildConfig, FeatureStore, build_features
from circuitmap.features.bookkeeping import LayerStatistics
from circuitmap.models import DEFAULT_MODEL
from circuitmap.training.activations import pack_contexts
from circuitmap.training.corpus import iter_documents

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "data" / "corpora"
SEARCHES = ["Paris", "says", "the", "12/100", "France"]


def split(args: argparse.Namespace) -> None:
    """Where a build's streaming time goes: the model's forward pass, encoding, the bookkeeping (timed over
    ``--split`` batches of the default size after four warm-up batches)."""
    model = load_model(DEFAULT_MODEL)
    transcoders = load_transcoders(args.transcoders)
    config = BuildConfig()
    contexts = pack_contexts(iter_documents(args.corpus), model.tokenizer, config.context_length)
    state = [
        LayerStatistics.empty(transcoders.d_features, config.top, config.samples, config.window)
        for _ in range(transcoders.n_layers)
    ]
    times = {"forward": 0.0, "encode": 0.0, "bookkeeping": 0.0}
    warm_up = 4
    for step in range(warm_up + args.split):
        batch = torch.stack([next(contexts) for _ in range(config.batch_size)])
        ids = torch.arange(step * config.batch_size, (step + 1) * config.batch_size)
        spent = dict.fromkeys(times, 0.0)
        with torch.inference_mode():
            start = time.perf_counter()
            cache = model.activations(batch, points=["mlp_in"])
            spent["forward"] += time.perf_counter() - start
            for layer, statistics_ in enumerate(state):
                start = time.perf_counter()
                acts = transcoders.encode(layer, cache["mlp_in", layer]).float()
                acts[:, 0] = 0
                middle = time.perf_counter()
                keys = torch.rand(config.batch_size, transcoders.d_features)
                statistics_.update(acts, ids, keys, config.before)
                spent["encode"] += middle - start
                spent["bookkeeping"] += time.perf_counter() - middle
        if step >= warm_up:
            times = {name: times[name] + spent[name] for name in times}
    tokens = args.split * config.batch_size * (config.context_length - 1)
    total = sum(times.values())
    print(f"streaming split over {tokens:,} tokens ({tokens / total:.0f} tokens/s):")
    for name, seconds in times.items():
        share = 100 * seconds / total
        print(f"  {name:<12} {seconds:6.1f} s  {share:4.1f}%  ({tokens / seconds:,.0f} tokens/s alone)")


def build(args: argparse.Namespace, path: Path) -> None:
    model = load_model(DEFAULT_MODEL)
    transcoders = load_transcoders(args.transcoders)
    report = build_features(
        model,
        transcoders,
        args.corpus,
        path,
        BuildConfig(tokens=args.tokens),
        model_name=DEFAULT_MODEL,
        transcoders_name=str(args.transcoders),
    )
    streaming = report.seconds - report.finish_seconds
    print(f"build: {report.tokens:,} tokens, {transcoders.n_layers * transcoders.d_features:,} features")
    print(
        f"  total {report.seconds / 60:.1f} min; streaming {streaming / 60:.1f} min "
        f"({report.tokens / streaming:.0f} tokens/s); dashboards and labels {report.finish_seconds:.0f} s"
    )
    print(
        f"  database {path.stat().st_size / 2**20:.0f} MiB; {report.dead_features:,} features never active, "
        f"{report.short_features:,} with fewer than 20 contexts"
    )


def lookups(args: argparse.Namespace, path: Path) -> None:
    rng = random.Random(0)
    with FeatureStore(path) as store:
        store.vocab  # noqa: B018 - read once, as a server does at start-up
        features = [
            (rng.randrange(store.n_layers), rng.randrange(store.d_features)) for _ in range(args.lookups)
        ]
        medians, tails = [], []
        for _ in range(args.runs):
            times = []
            for layer, feature in features:
                start = time.perf_counter()
                store.get(layer, feature)
                times.append((time.perf_counter() - start) * 1000)
            times.sort()
            medians.append(statistics.median(times))
            tails.append(times[int(0.95 * len(times))])
        print(
            f"lookup (get): median {statistics.median(medians):.2f} ms, 95th percentile "
            f"{statistics.median(tails):.2f} ms ({args.lookups} random features × {args.runs} runs)"
        )
        times = []
        for layer, feature in features:
            start = time.perf_counter()
            json.dumps(store.get(layer, feature).as_json())
            times.append((time.perf_counter() - start) * 1000)
        print(
            f"lookup and JSON (what the explorer's endpoint does): median {statistics.median(times):.2f} ms"
        )
        for text in SEARCHES:
            start = time.perf_counter()
            hits = store.search(text)
            print(f"search {text!r}: {len(hits)} hits in {(time.perf_counter() - start) * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transcoders", default=str(quick_transcoders_folder(DEFAULT_MODEL)))
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--db", help="database file (default: a temporary file, removed afterwards)")
    parser.add_argument("--skip-build", action="store_true", help="only time lookups on an existing --db")
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--split", type=int, help="only time the parts of streaming over this many batches")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")
    if args.split:
        split(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.db) if args.db else Path(folder) / "features.sqlite"
        if not args.skip_build:
            build(args, path)
        lookups(args, path)


if __name__ == "__main__":
    main()

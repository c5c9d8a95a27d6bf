"""Transcoder training throughput on SmolLM2-135M: activation collection and training steps, PLT and CLT.

usage: python benchmarks/training.py [--runs 3]

  collect   corpus text (wikitext-2 test split from the shared data folder), 128 contexts of 64 tokens
            (the quick preset's chunk), every layer's MLP input and output kept (one forward pass)
  sample    128 contexts of 64 tokens the model writes itself side by side, pairs captured while sampling
  plt       one training step of all 30 layers: TopK, 2,048 features, k = 64, 512 tokens per step
  clt       the same for a cross-layer transcoder: 512 features, k = 32, 512 tokens per step

Figures are tokens per second, medians over the runs (after one warm-up), for one process on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from circuitmap import load_model
from circuitmap.training import (
    CorpusContexts,
    PairChunks,
    SampledContexts,
    TrainConfig,
    iter_documents,
)
from circuitmap.training.trainable import Standardiser, TrainableTranscoders

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "data" / "corpora" / "wikitext2_test.txt"
CONTEXTS, LENGTH = 128, 64


def timed(fn, runs: int) -> list[float]:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def report(name: str, tokens: int, times: list[float]) -> None:
    rates = sorted(tokens / t for t in times)
    runs = ", ".join(f"{rate:.0f}" for rate in rates)
    print(f"{name:<8} {statistics.median(rates):>8.0f} tokens/s   (runs: {runs})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not CORPUS.exists():
        raise SystemExit(f"the corpus {CORPUS} is missing: this benchmark needs the shared data folder")
    threads = torch.get_num_threads()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads")
    model = load_model("smollm2-135m")
    contexts = CorpusContexts(lambda: iter_documents(CORPUS), model.tokenizer, LENGTH, "wikitext")
    chunks = PairChunks(
        model, contexts, chunk_contexts=CONTEXTS, groups=1, local_groups=[0], model_batch_size=16
    )
    tokens = CONTEXTS * (LENGTH - 1)
    collected = timed(lambda: chunks.chunk(0), args.runs)
    report("collect", tokens, collected)
    sampler = SampledContexts(model, LENGTH, seed=0, batch_size=CONTEXTS)
    sampled = timed(lambda: sampler.group_pairs(0, CONTEXTS, 0, 1), args.runs)
    report("sample", tokens, sampled)
    ratio = statistics.median(collected) / statistics.median(sampled)
    print(f"sampling runs at {ratio:.0%} of the speed of collecting from a corpus")

    pairs = chunks.chunk(0)[0]
    plt = TrainConfig(d_features=2048, k=64, batch_size=512)
    clt = TrainConfig(kind="clt", d_features=512, k=32, batch_size=512)
    for name, config in (("plt", plt), ("clt", clt)):
        report(name, config.batch_size, timed(training_step(model, config, pairs), args.runs))


def training_step(model, config: TrainConfig, pairs: torch.Tensor):
    """A function running one optimiser step of ``config`` on a fixed batch drawn from ``pairs``."""
    n = config.batch_size
    batch = pairs[torch.randperm(len(pairs))[:n]]
    standardiser = Standardiser.from_sums(
        batch.double().sum(0), batch.double().pow(2).sum((0, 3)), n, model.d_model
    )
    module = TrainableTranscoders(model.n_layers, model.d_model, config)
    optimiser = torch.optim.Adam(module.parameters(), lr=config.lr, fused=True)

    def step() -> None:
        x, y = standardiser.apply(batch)
        output = module(x, y)
        optimiser.zero_grad(set_to_none=True)
        output.loss.backward()
        optimiser.step()
        module.normalise_decoder()

    return step


if __name__ == "__main__":
    main()

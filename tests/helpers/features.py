"""Tiny feature databases built from a small corpus of numbered cat sentences, and the features they label.

Two builds: one of a given explorer engine's transcoders (what the server and browser tests open), and one
of TopK transcoders on the tiny float32 llama (what the Neuronpedia export and LLM-label tests read).
"""

from __future__ import annotations

from pathlib import Path

import torch

from circuitmap.features import BuildConfig, FeatureStore, build_features
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders


def cat_corpus(documents: int) -> str:
    """``documents`` short numbered sentences about a cat, one per paragraph."""
    return "\n\n".join(f"The cat number {i} sat on the mat and said hello {i * 7}." for i in range(documents))


ENGINE_CORPUS = cat_corpus(200)
ENGINE_BUILD = BuildConfig(
    tokens=2000, context_length=32, batch_size=8, top=8, samples=10, window=16, before=8
)
LLAMA_CORPUS = cat_corpus(300)
LLAMA_BUILD = BuildConfig(tokens=3000, context_length=32, batch_size=8, window=16, before=8)


def build_engine_database(engine, folder: Path) -> Path:
    """A feature database of the engine's transcoders in ``folder``, built from ``ENGINE_CORPUS``."""
    corpus = folder / "corpus.txt"
    corpus.write_text(ENGINE_CORPUS, encoding="utf-8")
    path = folder / "features.sqlite"
    build_features(engine.model, engine.transcoders, corpus, path, ENGINE_BUILD, progress=False)
    return path


def build_tiny_llama_database(folder: Path) -> Path:
    """A complete feature database of random TopK transcoders on the tiny float32 llama, built from
    ``LLAMA_CORPUS`` in ``folder`` (about a second to build)."""
    corpus = folder / "corpus.txt"
    corpus.write_text(LLAMA_CORPUS, encoding="utf-8")
    model = tiny_model("llama")
    transcoders = random_transcoders("plt-topk", 3, 32).to(dtype=torch.float32)
    path = folder / "features.sqlite"
    build_features(model, transcoders, corpus, path, LLAMA_BUILD, progress=False)
    return path


def labelled_features(store: FeatureStore) -> list[tuple[int, int]]:
    """The features with a label: every feature that was active has an automatic one."""
    every = [(layer, feature) for layer in range(store.n_layers) for feature in range(store.d_features)]
    return sorted(store.labels_of(every))

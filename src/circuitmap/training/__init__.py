"""Training transcoders: text sources, activation pairs in reproducible chunks, the trainer and evaluation."""

from circuitmap.training.activations import collect_pairs, pack_contexts
from circuitmap.training.config import PRESETS, TrainConfig, preset, training_config
from circuitmap.training.corpus import corpus_files, iter_documents
from circuitmap.training.data import (
    ActivationCache,
    CorpusContexts,
    PairChunks,
    SampledContexts,
    sample_contexts,
)
from circuitmap.training.evaluate import Evaluation, evaluate_corpus, evaluate_transcoders
from circuitmap.training.trainer import FeatureDatabase, TrainResult, evaluate_heldout, train_transcoders

__all__ = [
    "PRESETS",
    "ActivationCache",
    "CorpusContexts",
    "Evaluation",
    "PairChunks",
    "SampledContexts",
    "TrainConfig",
    "FeatureDatabase",
    "TrainResult",
    "collect_pairs",
    "corpus_files",
    "evaluate_corpus",
    "evaluate_heldout",
    "evaluate_transcoders",
    "iter_documents",
    "pack_contexts",
    "preset",
    "sample_contexts",
    "train_transcoders",
    "training_config",
]

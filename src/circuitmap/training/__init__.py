"""Training transcoders: text sources, activation pairs in reproducible chunks, the trainer and evaluation."""

from circuitmap.training.activations import collect_pairs, pack_contexts
from circuitmap.training.config import PRESETS, TrainConfig, preset
from circuitmap.training.corpus import corpus_files, iter_documents
from circuitmap.training.data import (
    ActivationCache,
    CorpusContexts,
    PairChunks,
    SampledContexts,
    sample_contexts,
)
from circuitmap.training.evaluate import Evaluation, evaluate_transcoders
from circuitmap.training.trainer import TrainingDiverged, TrainingInterrupted, TrainResult, train_transcoders

__all__ = [
    "PRESETS",
    "ActivationCache",
    "CorpusContexts",
    "Evaluation",
    "PairChunks",
    "SampledContexts",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "collect_pairs",
    "corpus_files",
    "evaluate_transcoders",
    "iter_documents",
    "pack_contexts",
    "preset",
    "sample_contexts",
    "train_transcoders",
]

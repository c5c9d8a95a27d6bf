"""Training transcoders: text sources, packing, MLP activation pairs, shuffling, a per-layer TopK trainer."""

from circuitmap.training.activations import (
    ShuffleBuffer,
    collect_pairs,
    iter_pairs,
    pack_contexts,
    shuffled_batches,
)
from circuitmap.training.corpus import corpus_files, iter_documents, sample_documents
from circuitmap.training.trainer import TrainConfig, TrainResult, train_plt

__all__ = [
    "ShuffleBuffer",
    "TrainConfig",
    "TrainResult",
    "collect_pairs",
    "corpus_files",
    "iter_documents",
    "iter_pairs",
    "pack_contexts",
    "sample_documents",
    "shuffled_batches",
    "train_plt",
]

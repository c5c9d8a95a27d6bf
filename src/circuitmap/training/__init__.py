"""Training data for transcoders: text sources, packing, MLP activation pairs and shuffling."""

from circuitmap.training.activations import (
    ShuffleBuffer,
    collect_pairs,
    iter_pairs,
    pack_contexts,
    shuffled_batches,
)
from circuitmap.training.corpus import corpus_files, iter_documents, sample_documents

__all__ = [
    "ShuffleBuffer",
    "collect_pairs",
    "corpus_files",
    "iter_documents",
    "iter_pairs",
    "pack_contexts",
    "sample_documents",
    "shuffled_batches",
]

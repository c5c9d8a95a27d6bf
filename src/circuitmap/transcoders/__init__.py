"""Transcoder sets (per-layer and cross-layer), their activations, and loading/saving them."""

from circuitmap.transcoders.activations import JumpReLU, ReLU, TopK
from circuitmap.transcoders.io import load_transcoders, save_transcoders
from circuitmap.transcoders.transcoders import CrossLayerTranscoder, PerLayerTranscoders, Transcoders

__all__ = [
    "CrossLayerTranscoder",
    "JumpReLU",
    "PerLayerTranscoders",
    "ReLU",
    "TopK",
    "Transcoders",
    "load_transcoders",
    "save_transcoders",
]

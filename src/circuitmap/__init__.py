"""circuitmap: attribution graphs, interventions and persona vectors for Hugging Face causal LMs."""

from circuitmap.errors import CircuitmapError
from circuitmap.models import DEFAULT_MODEL, Model, load_model, supported_families
from circuitmap.transcoders import (
    CrossLayerTranscoder,
    PerLayerTranscoders,
    Transcoders,
    load_transcoders,
    save_transcoders,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CircuitmapError",
    "CrossLayerTranscoder",
    "Model",
    "PerLayerTranscoders",
    "Transcoders",
    "load_model",
    "load_transcoders",
    "save_transcoders",
    "supported_families",
]

"""Training checkpoints: one safetensors file written atomically, with the run's settings in its metadata.

The file holds the module's weights, the optimiser's moments, the standardiser and the trainer's counters,
so a resumed run continues bit for bit where the checkpoint was taken.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the checkpoint to a temporary file and rename it over the previous one."""
    path = folder / CHECKPOINT_NAME
    payload = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    metadata = {"circuitmap": json.dumps({**meta, "format": CHECKPOINT_FORMAT})}
    try:
        atomic_write(path, lambda temporary: save_file(payload, temporary, metadata=metadata))
    except (OSError, SafetensorError) as error:
        reason = getattr(error, "strerror", None) or error
        raise CircuitmapError(f"cannot write the checkpoint {path}: {reason}") from None
    return path


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of the checkpoint in ``folder``; a one-line error when absent or unreadable."""
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise CircuitmapError(f"nothing to resume: {path} does not exist")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("circuitmap", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise CircuitmapError(f"cannot read the checkpoint {path}: {error}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CircuitmapError(f"{path} is not a checkpoint this version of circuitmap can resume")
    return tensors, meta

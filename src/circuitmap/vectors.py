"""Residual-stream vectors stored in ``.safetensors`` files: attribution directions and steering vectors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from circuitmap.errors import CircuitmapError


def load_vector(path: str | Path, key: str | None = None) -> torch.Tensor:
    """The tensor ``key`` of a safetensors file, or its only tensor when ``key`` is None; a one-line error
    when the file is missing or unreadable, the key absent, or the choice ambiguous."""
    path = Path(path)
    if not path.is_file():
        raise CircuitmapError(f"{path}: vector file not found")
    try:
        with safe_open(str(path), framework="pt") as reader:
            keys = list(reader.keys())
            if key is None:
                if len(keys) != 1:
                    raise CircuitmapError(
                        f"{path} holds {len(keys)} tensors; name one as FILE:KEY ({keys[:5]})"
                    )
                key = keys[0]
            if key not in keys:
                raise CircuitmapError(f"{path} has no tensor {key!r}")
            return reader.get_tensor(key)
    except CircuitmapError:
        raise
    except Exception as error:  # safetensors raises several types for missing or corrupt files
        raise CircuitmapError(f"{path}: not a readable safetensors file ({error})") from None

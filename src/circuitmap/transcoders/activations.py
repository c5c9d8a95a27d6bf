"""Transcoder activation functions: ReLU, JumpReLU and TopK, each an nn.Module with a `name` and a `k`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from circuitmap.errors import CircuitmapError


class ReLU(nn.Module):
    """`a = max(z, 0)`."""

    name = "relu"
    k: int | None = None

    def forward(self, z: Tensor) -> Tensor:
        return torch.relu(z)


class JumpReLU(nn.Module):
    """`a = z · [z > θ]` with one threshold θ per feature (strictly greater: z == θ gives 0)."""

    name = "jumprelu"
    k: int | None = None

    def __init__(self, threshold: Tensor):
        super().__init__()
        if threshold.ndim != 1:
            shape = tuple(threshold.shape)
            raise CircuitmapError(f"JumpReLU threshold must hold one value per feature, got shape {shape}")
        self.register_buffer("threshold", threshold)

    def forward(self, z: Tensor) -> Tensor:
        return z * (z > self.threshold)

    def extra_repr(self) -> str:
        return f"d_features={self.threshold.shape[0]}"


class TopK(nn.Module):
    """Keep the k largest pre-activations of each token (ReLU applied to them), zero the rest."""

    name = "topk"

    def __init__(self, k: int):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise CircuitmapError(f"TopK k must be a positive integer, got {k!r}")
        self.k: int = k

    def forward(self, z: Tensor) -> Tensor:
        values, indices = z.topk(self.k, dim=-1)
        return torch.zeros_like(z).scatter(-1, indices, torch.relu(values))

    def extra_repr(self) -> str:
        return f"k={self.k}"


Activation = ReLU | JumpReLU | TopK

"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

A toy model squeezes ``n`` features through ``m < n`` hidden dimensions and back: ``h = W x`` and
``x' = ReLU(Wᵀ h + b)``, with ``W`` of shape ``[m, n]`` (column ``W_i`` is feature ``i``'s direction in the
hidden space). Inputs are sparse: each feature is 0 with probability ``1 − density`` (its sparsity) and
uniform in [0, 1] otherwise, independently. The loss weighs each feature's squared error by its importance
``decay ** i``. Dense features leave no room for interference, so the model keeps the ``m`` most important
ones in orthogonal directions and drops the rest; as features get sparser it packs more of them than it has
dimensions (superposition), accepting interference that ReLU filters out when few features are active.

Several models (instances), one per density, train at once as one batched computation, seeded. What a
trained ``W`` says, per feature: its norm ``‖W_i‖`` (about 1 when represented, about 0 when not), its
superposition ``Σ_{j≠i} (Ŵ_i · W_j)²`` (how much other features share its direction; 0 when it has a
dimension of its own) and its dimensionality ``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²`` (the fraction of a
dimension it gets: 1 alone, 1/2 in an antipodal pair, 2/5 in a pentagon).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError
from circuitmap.validation import check_number, check_seed

REPRESENTED_NORM = 0.5
"""A feature whose direction is at least this long counts as represented."""


@dataclass(frozen=True)
class ToyConfig(Settings):
    """A family of toy models: sizes, importance, and how they train."""

    n_features: int = 20
    """Input features ``n``."""
    n_hidden: int = 5
    """Hidden dimensions ``m``."""
    importance_decay: float = 0.7
    """Feature ``i`` weighs ``importance_decay ** i`` in the loss (1: all equal)."""
    steps: int = 5_000
    """Optimiser steps."""
    batch_size: int = 1_024
    """Inputs per step and instance."""
    lr: float = 1e-3
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the weights and the inputs."""

    def check(self) -> None:
        """A clear error for settings that cannot work."""
        for name in ("n_features", "n_hidden", "steps", "batch_size"):
            check_number(name, getattr(self, name), low=1, whole=True)
        check_number("importance_decay", self.importance_decay, low=0, high=1, low_open=True)
        check_number("lr", self.lr, low=0, low_open=True)
        check_seed("seed", self.seed)


class ToyModel(nn.Module):
    """``instances`` toy models at once: ``W`` ``[instances, m, n]``, ``b`` ``[instances, n]``."""

    def __init__(self, instances: int, n_features: int, n_hidden: int, generator: torch.Generator):
        super().__init__()
        W = torch.empty(instances, n_hidden, n_features)
        for instance in range(instances):
            nn.init.xavier_normal_(W[instance], generator=generator)
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(torch.zeros(instances, n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[batch, instances, n]`` → ``ReLU(Wᵀ W x + b)``, same shape."""
        hidden = torch.einsum("imn,bin->bim", self.W, x)
        return torch.relu(torch.einsum("imn,bim->bin", self.W, hidden) + self.b)


def sample_features(
    densities: torch.Tensor, n_features: int, batch: int, generator: torch.Generator
) -> torch.Tensor:
    """Inputs ``[batch, instances, n]``: each feature uniform in [0, 1] at its instance's density, else 0."""
    shape = (batch, len(densities), n_features)
    values = torch.rand(shape, generator=generator)
    present = torch.rand(shape, generator=generator) < densities[None, :, None]
    return values * present


def importance(config: ToyConfig) -> torch.Tensor:
    """The loss weight of each feature, ``[n]``."""
    return config.importance_decay ** torch.arange(config.n_features, dtype=torch.float32)


def train_toy_models(config: ToyConfig, densities: Sequence[float], *, progress: bool = True) -> ToyModel:
    """One toy model per density (the probability that a feature is present), trained together."""
    config.check()
    if not densities:
        raise CircuitmapError("give at least one feature density")
    for density in densities:
        check_number("a feature density", density, low=0, high=1, low_open=True)
    generator = torch.Generator().manual_seed(config.seed)
    model = ToyModel(len(densities), config.n_features, config.n_hidden, generator)
    rates = torch.tensor(list(densities), dtype=torch.float32)
    weights = importance(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    for _ in tqdm(range(config.steps), desc="toy models", unit="step", disable=not progress):
        x = sample_features(rates, config.n_features, config.batch_size, generator)
        loss = (weights * (model(x) - x) ** 2).mean(dim=0).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖`` for every feature of every instance: ``W`` ``[..., m, n]`` → ``[..., n]``."""
    return W.detach().norm(dim=-2)


def _overlaps(W: torch.Tensor) -> torch.Tensor:
    """``(Ŵ_i · W_j)²`` ``[..., n, n]``."""
    W = W.detach()
    unit = W / W.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    return (unit.transpose(-1, -2) @ W) ** 2


def superposition(W: torch.Tensor) -> torch.Tensor:
    """``Σ_{j≠i} (Ŵ_i · W_j)²`` per feature, ``[..., n]``: how much other features share its direction."""
    overlaps = _overlaps(W)
    return overlaps.sum(dim=-1) - overlaps.diagonal(dim1=-2, dim2=-1)


def dimensionality(W: torch.Tensor) -> torch.Tensor:
    """``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²`` per feature, ``[..., n]`` (0 for a feature with no direction)."""
    norms = feature_norms(W) ** 2
    return norms / _overlaps(W).sum(dim=-1).clamp_min(1e-12)


def represented(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """How many features each instance represents (norm at least ``threshold``), ``[...]``."""
    return (feature_norms(W) >= threshold).sum(dim=-1)

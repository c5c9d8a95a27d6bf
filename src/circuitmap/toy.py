"""Toy models of superposition (Elhage et al. 2022, "Toy Models of Superposition").

A toy model squeezes ``n`` features through ``m < n`` hidden dimensions and back: ``h = W x`` and
``x' = ReLU(Wᵀ h + b)``, with ``W`` of shape ``[m, n]`` (column ``W_i`` is feature ``i``'s direction in the
hidden space). Inputs are sparse: each feature is 0 with probability ``1 − density`` (its sparsity) and
uniform in [0, 1] otherwise, independently. The loss weighs each feature's squared error by its importance
``decay ** i``. Dense features leave no room for interference, so the model keeps the ``m`` most important
ones in orthogonal directions and drops the rest; as features get sparser it packs more of them than it has
dimensions (superposition), accepting interference that ReLU filters out when few features are active.

Several models (instances), one per density, train at once as one batched computation, seeded; each
instance may have importances of its own (the two-feature phase diagram varies one feature's). What a
trained ``W`` says, per feature: its norm ``‖W_i‖`` (about 1 when represented, about 0 when not), its
superposition ``Σ_{j≠i} (Ŵ_i · W_j)²`` (how much other features share its direction; 0 when it has a
dimension of its own) and its dimensionality ``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²`` (the fraction of a
dimension it gets: 1 alone, 1/2 in an antipodal pair, 2/5 in a pentagon).

Sparse dictionaries undo superposition where the true features are known: ``train_sparse_dictionary`` fits
a one-layer sparse autoencoder (ReLU encoder, unit-norm decoder columns, L1 penalty on the latents) to
hidden activations ``h = W x``; ``best_cosines`` scores each true direction ``W_i`` by its best cosine with
a learned one, and ``chance_cosines`` gives that score's distribution for unrelated random directions, the
baseline a recovered feature must beat.
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


def train_toy_models(
    config: ToyConfig,
    densities: Sequence[float],
    *,
    importances: torch.Tensor | Sequence[Sequence[float]] | None = None,
    progress: bool = True,
) -> ToyModel:
    """One toy model per density (the probability that a feature is present), trained together.

    ``importances`` ``[instances, n]`` gives each instance its own loss weights (one row per density);
    without it every instance weighs feature ``i`` by ``importance_decay ** i``."""
    config.check()
    if not densities:
        raise CircuitmapError("give at least one feature density")
    for density in densities:
        check_number("a feature density", density, low=0, high=1, low_open=True)
    if importances is None:
        weights = importance(config)
    else:
        weights = _checked_importances(importances, config, len(densities))
    generator = torch.Generator().manual_seed(config.seed)
    model = ToyModel(len(densities), config.n_features, config.n_hidden, generator)
    rates = torch.tensor(list(densities), dtype=torch.float32)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    for _ in tqdm(range(config.steps), desc="toy models", unit="step", disable=not progress):
        x = sample_features(rates, config.n_features, config.batch_size, generator)
        loss = weighted_loss(model, x, weights).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


def _checked_importances(
    importances: torch.Tensor | Sequence[Sequence[float]], config: ToyConfig, instances: int
) -> torch.Tensor:
    """``importances`` as a float tensor ``[instances, n]`` of finite weights, zero or more; else an error."""
    try:
        weights = torch.as_tensor(importances, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise CircuitmapError("importances must be a table of numbers, one row per density") from None
    expected = (instances, config.n_features)
    if tuple(weights.shape) != expected:
        raise CircuitmapError(
            f"importances must have shape {list(expected)} (one row per density, one column per feature), "
            f"got {list(weights.shape)}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise CircuitmapError("importances must be finite and zero or more")
    return weights


def weighted_loss(model: ToyModel, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each instance's weighted squared error on ``x`` ``[batch, instances, n]``, ``[instances]``."""
    return (weights * (model(x) - x) ** 2).mean(dim=0).sum(dim=-1)


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖`` for every feature of every instance: ``W`` ``[..., m, n]`` → ``[..., n]``."""
    return W.detach().norm(dim=-2)


def _overlaps(W: torch.Tensor) -> torch.Tensor:
    """``(Ŵ_i · W_j)²`` ``[..., n, n]``."""
    W = W.detach()
    return (_unit_columns(W).transpose(-1, -2) @ W) ** 2


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


@dataclass(frozen=True)
class DictionaryConfig(Settings):
    """A sparse dictionary (a one-layer sparse autoencoder) for activations: size, sparsity, training."""

    n_latents: int = 40
    """Learned directions (the dictionary's size)."""
    l1: float = 0.3
    """Weight of the summed latents in the loss (each times its unit decoder norm); for activations near 1."""
    steps: int = 3_000
    """Optimiser steps."""
    batch_size: int = 1_024
    """Activations per step, drawn with replacement."""
    lr: float = 3e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the weights and the draws."""

    def check(self) -> None:
        """A clear error for settings that cannot work."""
        for name in ("n_latents", "steps", "batch_size"):
            check_number(name, getattr(self, name), low=1, whole=True)
        check_number("l1", self.l1, low=0)
        check_number("lr", self.lr, low=0, low_open=True)
        check_seed("seed", self.seed)


class SparseDictionary(nn.Module):
    """``latents = ReLU(E (h − c) + e)`` and ``h ≈ D latents + c``, with unit-norm decoder columns ``D_j``."""

    def __init__(self, n_inputs: int, n_latents: int, generator: torch.Generator):
        super().__init__()
        decoder = torch.randn(n_inputs, n_latents, generator=generator)
        decoder /= decoder.norm(dim=0, keepdim=True)
        self.decoder = nn.Parameter(decoder)
        self.encoder = nn.Parameter(decoder.T.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(n_latents))
        self.centre = nn.Parameter(torch.zeros(n_inputs))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Activations ``[batch, m]`` → latents ``[batch, n_latents]``, zero or more."""
        return torch.relu((h - self.centre) @ self.encoder.T + self.encoder_bias)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations ``[batch, m]`` → (reconstruction ``[batch, m]``, latents ``[batch, n_latents]``)."""
        latents = self.encode(h)
        return latents @ self.decoder.T + self.centre, latents

    @property
    def directions(self) -> torch.Tensor:
        """The learned directions: the decoder's unit columns, ``[m, n_latents]``."""
        return self.decoder.detach()


def train_sparse_dictionary(
    activations: torch.Tensor, config: DictionaryConfig | None = None, *, progress: bool = True
) -> SparseDictionary:
    """A sparse dictionary for ``activations`` ``[samples, m]``: squared error + ``l1`` × summed latents."""
    config = config or DictionaryConfig()
    config.check()
    if not isinstance(activations, torch.Tensor) or activations.ndim != 2 or 0 in activations.shape:
        raise CircuitmapError("activations must be a non-empty tensor [samples, dimensions]")
    if not torch.isfinite(activations).all():
        raise CircuitmapError("activations must be finite")
    activations = activations.detach().float()
    generator = torch.Generator().manual_seed(config.seed)
    dictionary = SparseDictionary(activations.shape[1], config.n_latents, generator)
    optimiser = torch.optim.Adam(dictionary.parameters(), lr=config.lr)
    for _ in tqdm(range(config.steps), desc="sparse dictionary", unit="step", disable=not progress):
        h = activations[torch.randint(len(activations), (config.batch_size,), generator=generator)]
        reconstruction, latents = dictionary(h)
        loss = ((reconstruction - h) ** 2).sum(dim=1).mean() + config.l1 * latents.sum(dim=1).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            dictionary.decoder /= dictionary.decoder.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return dictionary.eval()


def best_cosines(true_directions: torch.Tensor, learned_directions: torch.Tensor) -> torch.Tensor:
    """For each true direction (column of ``[m, n]``), its best cosine with a learned one (``[m, k]``)."""
    for name, directions in (("true", true_directions), ("learned", learned_directions)):
        if not isinstance(directions, torch.Tensor) or directions.ndim != 2 or 0 in directions.shape:
            raise CircuitmapError(f"{name} directions must be a non-empty tensor [dimensions, directions]")
    if true_directions.shape[0] != learned_directions.shape[0]:
        raise CircuitmapError(
            f"true directions have {true_directions.shape[0]} dimensions, learned ones "
            f"{learned_directions.shape[0]}"
        )
    true_unit = _unit_columns(true_directions.detach().float())
    learned_unit = _unit_columns(learned_directions.detach().float())
    return (true_unit.T @ learned_unit).max(dim=1).values


def chance_cosines(dimensions: int, n_learned: int, samples: int = 10_000, seed: int = 0) -> torch.Tensor:
    """``samples`` draws of ``best_cosines`` for a random direction against ``n_learned`` random ones."""
    for name, value in (("dimensions", dimensions), ("n_learned", n_learned), ("samples", samples)):
        check_number(name, value, low=1, whole=True)
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    truth = torch.randn(samples, dimensions, generator=generator)
    learned = torch.randn(samples, dimensions, n_learned, generator=generator)
    cosines = torch.einsum("sd,sdk->sk", _unit_columns(truth.T).T, _unit_columns(learned))
    return cosines.max(dim=1).values


def _unit_columns(directions: torch.Tensor) -> torch.Tensor:
    """The columns (along dimension −2) scaled to unit length; zero columns stay zero."""
    return directions / directions.norm(dim=-2, keepdim=True).clamp_min(1e-12)

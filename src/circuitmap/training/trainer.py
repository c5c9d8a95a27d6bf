"""Train a per-layer TopK transcoder set for every layer of a model at once.

Pairs flow from documents to packed contexts to MLP activation pairs to a shuffle buffer; every step trains
all layers on the same tokens. The loss is the mean over layers of the batch's fraction of variance
unexplained (FVU) on standardised outputs; Adam with linear warm-up and linear decay, gradient clipping,
unit-norm decoder rows. Metrics per layer: FVU and L0 over the last steps, and the fraction of dead
features (never active in the last ``dead_window`` tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.training.activations import iter_pairs, pack_contexts, shuffled_batches
from circuitmap.training.plt import Standardiser, TrainablePLT
from circuitmap.transcoders import PerLayerTranscoders


@dataclass
class TrainConfig:
    """Settings of one training run; ``n_tokens`` counts training tokens (pairs per layer)."""

    d_features: int = 2048
    k: int = 32
    skip: bool = False
    n_tokens: int = 200_000
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    context_length: int = 128
    model_batch_size: int = 8
    buffer_tokens: int = 16_384
    dead_window: int = 100_000
    seed: int = 0

    def check(self) -> None:
        positive = (
            "d_features",
            "k",
            "n_tokens",
            "batch_size",
            "context_length",
            "model_batch_size",
            "buffer_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise CircuitmapError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.k > self.d_features:
            raise CircuitmapError(f"k={self.k} cannot exceed d_features={self.d_features}")
        if not self.lr > 0:
            raise CircuitmapError(f"lr must be positive, got {self.lr}")


@dataclass
class TrainResult:
    """The trained set and its metrics (per layer, and means over layers)."""

    transcoders: PerLayerTranscoders
    fvu: list[float]
    l0: list[float]
    dead_fraction: list[float]
    tokens: int
    steps: int
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.fvu)
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "mean_fvu": sum(self.fvu) / n,
            "mean_l0": sum(self.l0) / n,
            "mean_dead_fraction": sum(self.dead_fraction) / n,
            "fvu": self.fvu,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "config": self.config,
        }


def _learning_rate(step: int, total: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    remaining = max(1, total - config.warmup_steps)
    return config.lr * max(0.0, 1 - (step - config.warmup_steps) / remaining)


def train_plt(
    model: Model, documents: Iterable[str], config: TrainConfig | None = None, progress: bool = True
) -> TrainResult:
    """Train per-layer TopK transcoders on ``documents`` (an iterable of texts, read as needed)."""
    config = config or TrainConfig()
    config.check()
    contexts = pack_contexts(documents, model.tokenizer, config.context_length)
    pairs = iter_pairs(model, contexts, config.model_batch_size)
    batches = shuffled_batches(pairs, config.batch_size, config.buffer_tokens, seed=config.seed)
    first = next(batches, None)
    if first is None:
        raise CircuitmapError("the corpus is too small to fill a single context")
    standardiser = Standardiser.fit(first)
    module = TrainablePLT(
        model.n_layers, model.d_model, config.d_features, config.k, config.skip, config.seed
    )
    optimiser = torch.optim.Adam(module.parameters(), lr=config.lr)
    total_steps = max(1, config.n_tokens // config.batch_size)
    last_active = torch.zeros(model.n_layers, config.d_features, dtype=torch.long)
    recent_fvu: list[torch.Tensor] = []
    recent_l0: list[torch.Tensor] = []
    tokens = 0
    step = 0
    with tqdm(
        total=total_steps * config.batch_size,
        desc="training",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        batch = first
        while batch is not None and step < total_steps:
            x, y = standardiser.apply(batch.float())
            acts = module.encode(x)
            prediction = module.decode(acts, x)
            residual = (prediction - y).pow(2).sum(dim=(0, 2))
            variance = (y - y.mean(0)).pow(2).sum(dim=(0, 2)).clamp_min(1e-8)
            fvu = residual / variance
            loss = fvu.mean()
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(step, total_steps, config)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            loss = loss.detach()
            torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
            optimiser.step()
            module.normalise_decoder()
            tokens += len(batch)
            fired = (acts > 0).any(0)
            last_active[fired] = tokens
            recent_fvu = [*recent_fvu[-19:], fvu.detach()]
            recent_l0 = [*recent_l0[-19:], (acts > 0).sum(-1).float().mean(0)]
            step += 1
            bar.update(len(batch))
            bar.set_postfix(fvu=f"{loss.item():.3f}")
            batch = next(batches, None)
    dead = ((tokens - last_active) >= min(config.dead_window, tokens)).float().mean(1)
    return TrainResult(
        transcoders=module.to_transcoders(standardiser, model_name=model.name),
        fvu=torch.stack(recent_fvu).mean(0).tolist(),
        l0=torch.stack(recent_l0).mean(0).tolist(),
        dead_fraction=dead.tolist(),
        tokens=tokens,
        steps=step,
        config=asdict(config),
    )

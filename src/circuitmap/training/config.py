"""Settings of a training run and the named presets.

Every field that shapes the trained weights is part of the run's fingerprint: a resumed run must agree on
all of them. ``groups`` fixes how each chunk of contexts is dealt out for shuffling, which is what makes a
run with N processes see exactly the batches of a single process (see ``circuitmap.training.data``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from circuitmap.errors import CircuitmapError

KINDS = ("plt", "skip-plt", "clt")
ACTIVATIONS = ("topk", "jumprelu", "relu")
SPARSITY_PENALTIES = ("l0", "tanh")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``n_tokens`` counts training tokens (pairs per layer) over all processes."""

    kind: str = "plt"
    activation: str = "topk"
    d_features: int = 2048
    k: int = 32
    n_tokens: int = 200_000
    epochs: int = 1
    batch_size: int = 1024
    lr: float = 2e-3
    warmup_steps: int = 20
    decay_fraction: float = 0.2
    max_grad_norm: float = 1.0
    context_length: int = 128
    model_batch_size: int = 16
    chunk_contexts: int = 64
    groups: int = 1
    aux_k: int = 64
    aux_coef: float = 1 / 32
    dead_tokens: int = 50_000
    sparsity_coef: float = 1e-3
    sparsity_penalty: str = "tanh"
    sparsity_warmup: float = 0.5
    tanh_scale: float = 4.0
    jumprelu_bandwidth: float = 0.05
    init_threshold: float = 0.1
    seed: int = 0

    @property
    def skip(self) -> bool:
        return self.kind == "skip-plt"

    @property
    def cross_layer(self) -> bool:
        return self.kind == "clt"

    def check(self) -> None:
        """Raise a one-line error for a setting that cannot work."""
        if self.kind not in KINDS:
            raise CircuitmapError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise CircuitmapError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.sparsity_penalty not in SPARSITY_PENALTIES:
            raise CircuitmapError(
                f"sparsity_penalty must be one of {', '.join(SPARSITY_PENALTIES)}, "
                f"got {self.sparsity_penalty!r}"
            )
        positive = (
            "d_features",
            "k",
            "n_tokens",
            "epochs",
            "batch_size",
            "context_length",
            "model_batch_size",
            "chunk_contexts",
            "groups",
            "aux_k",
            "dead_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise CircuitmapError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.context_length < 3:
            raise CircuitmapError(f"context_length must be at least 3, got {self.context_length}")
        if self.activation == "topk" and self.k > self.d_features:
            raise CircuitmapError(f"k={self.k} cannot exceed d_features={self.d_features}")
        for name in ("lr", "jumprelu_bandwidth", "init_threshold", "tanh_scale"):
            if not getattr(self, name) > 0:
                raise CircuitmapError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("decay_fraction", "sparsity_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise CircuitmapError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.batch_size % self.groups or self.chunk_contexts % self.groups:
            raise CircuitmapError(
                f"groups={self.groups} must divide batch_size={self.batch_size} "
                f"and chunk_contexts={self.chunk_contexts}"
            )
        if self.chunk_contexts * (self.context_length - 1) < self.batch_size:
            raise CircuitmapError(
                f"a chunk of {self.chunk_contexts} contexts holds fewer tokens than one batch of "
                f"{self.batch_size}: raise chunk_contexts"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CircuitmapError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    def with_changes(self, **changes) -> TrainConfig:
        return replace(self, **{key: value for key, value in changes.items() if value is not None})


PRESETS: dict[str, TrainConfig] = {
    "quick": TrainConfig(
        d_features=2048,
        k=64,
        n_tokens=129_024,
        epochs=2,
        batch_size=1024,
        lr=4e-3,
        context_length=64,
        chunk_contexts=128,
    ),
    "standard": TrainConfig(
        d_features=4096,
        k=64,
        n_tokens=258_048,
        epochs=2,
        batch_size=1024,
        lr=3e-3,
        context_length=128,
        chunk_contexts=128,
    ),
}


def preset(name: str) -> TrainConfig:
    """The named preset; a one-line error naming the choices otherwise."""
    if name not in PRESETS:
        raise CircuitmapError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]

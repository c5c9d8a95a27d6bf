"""Settings of a training run and the named presets.

Every field that shapes the trained weights is part of the run's fingerprint: a resumed run must agree on
all of them. ``groups`` fixes how each chunk of contexts is dealt out for shuffling, which is what makes a
run with N processes see exactly the batches of a single process (see ``circuitmap.training.data``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError
from circuitmap.validation import check_number, check_seed

KINDS = ("plt", "skip-plt", "clt")
ACTIVATIONS = ("topk", "jumprelu", "relu")
SPARSITY_PENALTIES = ("l0", "tanh")


@dataclass(frozen=True)
class TrainConfig(Settings):
    """One training run."""

    kind: str = field(default="plt", metadata={"choices": KINDS})
    """plt (per-layer), skip-plt (per-layer with a linear skip path) or clt (cross-layer)."""
    activation: str = field(default="topk", metadata={"choices": ACTIVATIONS})
    """topk, jumprelu (learned thresholds, straight-through gradient) or relu (L1 penalty)."""
    d_features: int = 2048
    """Features per layer."""
    k: int = 32
    """Active features per token (topk)."""
    n_tokens: int = 200_000
    """Training tokens (token pairs per layer), over all processes and passes."""
    epochs: int = 1
    """Passes over the collected text: n_tokens / epochs tokens are collected once, then reshuffled."""
    batch_size: int = 1024
    """Tokens per optimiser step, over all processes."""
    lr: float = 2e-3
    """Peak learning rate (Adam)."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Share of the steps, at the end, over which the learning rate decays linearly to zero."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm."""
    context_length: int = 128
    """Tokens per context, BOS included."""
    model_batch_size: int = 16
    """Contexts per forward pass while collecting activations."""
    chunk_contexts: int = 64
    """Contexts whose token pairs are shuffled together."""
    groups: int = 1
    """Shuffle groups each chunk is dealt into (a multiple of the process count; fixes the batches)."""
    aux_k: int = 64
    """Dead features the auxiliary loss revives per token."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary loss."""
    dead_tokens: int = 50_000
    """A feature silent for this many tokens counts as dead."""
    sparsity_coef: float = 1e-3
    """Weight of the sparsity penalty (jumprelu and relu)."""
    sparsity_penalty: str = field(default="tanh", metadata={"choices": SPARSITY_PENALTIES})
    """JumpReLU's penalty: tanh (of decoder-norm-weighted activations) or l0."""
    sparsity_warmup: float = 0.5
    """Share of the steps over which the sparsity penalty ramps up."""
    tanh_scale: float = 4.0
    """Scale inside the tanh penalty."""
    jumprelu_bandwidth: float = 0.05
    """Bandwidth of the straight-through estimator of JumpReLU thresholds."""
    init_threshold: float = 0.1
    """Initial JumpReLU threshold."""
    skip_ridge: float = 1e-2
    """skip-plt: ridge penalty (times the mean input variance) of the least-squares skip it starts from."""
    seed: int = 0
    """Seed of the weights, the shuffles and sampled text."""

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
        counts = ("d_features", "k", "n_tokens", "epochs", "batch_size", "model_batch_size", "chunk_contexts")
        for name in (*counts, "groups", "aux_k", "dead_tokens"):
            check_number(name, getattr(self, name), low=1, whole=True)
        check_number("context_length", self.context_length, low=3, whole=True)
        check_number("warmup_steps", self.warmup_steps, low=0, whole=True)
        check_seed("seed", self.seed)
        for name in ("lr", "jumprelu_bandwidth", "init_threshold", "tanh_scale", "max_grad_norm"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        for name in ("aux_coef", "sparsity_coef", "skip_ridge"):
            check_number(name, getattr(self, name), low=0)
        for name in ("decay_fraction", "sparsity_warmup"):
            check_number(name, getattr(self, name), low=0, high=1)
        if self.activation == "topk" and self.k > self.d_features:
            raise CircuitmapError(f"k={self.k} cannot exceed d_features={self.d_features}")
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


PRESETS: dict[str, TrainConfig] = {
    "quick": TrainConfig(
        kind="skip-plt",
        d_features=2048,
        k=64,
        n_tokens=129_024,
        epochs=2,
        batch_size=256,
        lr=3e-3,
        warmup_steps=50,
        context_length=64,
        chunk_contexts=128,
    ),
    "standard": TrainConfig(
        kind="skip-plt",
        d_features=4096,
        k=64,
        n_tokens=258_048,
        epochs=2,
        batch_size=256,
        lr=3e-3,
        warmup_steps=50,
        context_length=128,
        chunk_contexts=128,
    ),
    "gpu": TrainConfig(
        kind="skip-plt",
        d_features=8192,
        k=64,
        n_tokens=30_000_000,
        epochs=1,
        batch_size=4096,
        lr=2e-3,
        context_length=256,
        model_batch_size=64,
        chunk_contexts=256,
    ),
}
"""``quick`` and ``standard`` are sized for two CPU cores (see the README for measured times); ``gpu`` for
one GPU: 30 million tokens streamed once (a cache would need terabytes), an estimated half hour to an hour
on a current data-centre GPU, from the CPU's measured cost per token (not measured on a GPU)."""


def preset(name: str) -> TrainConfig:
    """The named preset; a one-line error naming the choices otherwise."""
    if name not in PRESETS:
        raise CircuitmapError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def training_config(preset_name: str | None = None, processes: int = 1, **changes) -> TrainConfig:
    """The settings of a run, checked: the named preset (or the defaults) with ``changes`` (None keeps a
    setting). Unless ``groups`` is given, a preset of one group gets one group per process, so that a run on
    N processes sees the batches of one process with N groups."""
    base = preset(preset_name) if preset_name else TrainConfig()
    if changes.get("groups") is None and base.groups == 1:
        changes["groups"] = processes
    config = base.with_changes(**changes)
    config.check()
    return config

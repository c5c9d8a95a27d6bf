"""Random transcoders of every kind (per-layer or cross-layer, TopK or JumpReLU, with or without skips)."""

from __future__ import annotations

import torch

from circuitmap.transcoders import CrossLayerTranscoder, JumpReLU, PerLayerTranscoders, TopK


def random_transcoders(kind: str, n_layers: int, d_model: int, d_features: int = 48, seed: int = 0):
    """A float64 random set whose features are often active (about a quarter to a half)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    n = n_layers
    activations = (
        [TopK(6) for _ in range(n)]
        if "topk" in kind
        else [JumpReLU(torch.rand(d_features, generator=g, dtype=torch.float64) * 0.3) for _ in range(n)]
    )
    skips = [randn(d_model, d_model, scale=0.1) for _ in range(n)] if "skip" in kind else None
    common = dict(
        W_enc=[randn(d_features, d_model, scale=d_model**-0.5) for _ in range(n)],
        b_enc=[randn(d_features, scale=0.1) for _ in range(n)],
        b_dec=[randn(d_model, scale=0.1) for _ in range(n)],
        activations=activations,
        W_skip=skips,
    )
    if kind.startswith("clt"):
        decoders = [randn(d_features, n - i, d_model, scale=0.2) for i in range(n)]
        return CrossLayerTranscoder(W_dec=decoders, **common)
    return PerLayerTranscoders(W_dec=[randn(d_features, d_model, scale=0.2) for _ in range(n)], **common)

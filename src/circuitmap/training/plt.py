"""A per-layer TopK transcoder set in training form: all layers' weights stacked, inputs standardised.

Each layer trains on standardised pairs ``x' = (x − μx)/σx`` and ``y' = (y − μy)/σy`` (per-layer mean vector,
scalar scale), which makes one learning rate fit every layer. ``to_transcoders`` folds the standardisation
back into the weights, so the saved set reads raw MLP inputs and predicts raw MLP outputs. Decoder rows are
kept at unit norm after every step, so activations carry the scale; encoder rows start as a tenth of the
decoder rows, so the first predictions are small rather than large noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from circuitmap.transcoders import PerLayerTranscoders, TopK


@dataclass
class Standardiser:
    """Per-layer mean vectors ``[L, d]`` and scalar scales ``[L]`` of MLP inputs and outputs."""

    mean_in: torch.Tensor
    scale_in: torch.Tensor
    mean_out: torch.Tensor
    scale_out: torch.Tensor

    @classmethod
    def fit(cls, batch: torch.Tensor) -> Standardiser:
        """Estimate from a batch of pairs ``[n, L, 2, d]``."""
        x, y = batch[:, :, 0].double(), batch[:, :, 1].double()

        def scale(values: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
            return (values - mean).pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-8)

        mean_in, mean_out = x.mean(0), y.mean(0)
        return cls(mean_in, scale(x, mean_in), mean_out, scale(y, mean_out))

    def apply(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised inputs and outputs ``[n, L, d]`` of a batch of pairs."""
        dtype = batch.dtype
        x = (batch[:, :, 0] - self.mean_in.to(dtype)) / self.scale_in.to(dtype)[:, None]
        y = (batch[:, :, 1] - self.mean_out.to(dtype)) / self.scale_out.to(dtype)[:, None]
        return x, y


class TrainablePLT(nn.Module):
    """Stacked per-layer TopK transcoders (optionally with skip) over standardised inputs and outputs."""

    def __init__(self, n_layers: int, d_model: int, d_features: int, k: int, skip: bool, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        decoder = torch.randn(n_layers, d_features, d_model, generator=generator)
        decoder = decoder / decoder.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(decoder)
        self.W_enc = nn.Parameter(decoder * 0.1)
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_features))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if skip else None
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """TopK activations ``[n, L, f]`` of standardised inputs ``[n, L, d]``."""
        pre = torch.einsum("nld,lfd->nlf", x, self.W_enc) + self.b_enc
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def decode(self, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Predicted standardised outputs ``[n, L, d]``."""
        out = torch.einsum("nlf,lfd->nld", acts, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            out = out + torch.einsum("nld,lod->nlo", x, self.W_skip)
        return out

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Project decoder rows back to unit norm (activations carry the scale)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def to_transcoders(
        self, standardiser: Standardiser, model_name: str | None = None
    ) -> PerLayerTranscoders:
        """The equivalent set on raw activations: standardisation folded into the weights (float32)."""
        s = standardiser
        scale_in, scale_out = s.scale_in[:, None, None], s.scale_out[:, None, None]
        W_enc = self.W_enc.double() / scale_in
        b_enc = self.b_enc.double() - torch.einsum("lfd,ld->lf", W_enc, s.mean_in)
        W_dec = self.W_dec.double() * scale_out
        b_dec = self.b_dec.double() * s.scale_out[:, None] + s.mean_out
        skips = None
        if self.W_skip is not None:
            W_skip = self.W_skip.double() * scale_out / scale_in
            b_dec = b_dec - torch.einsum("lod,ld->lo", W_skip, s.mean_in)
            skips = [w.float() for w in W_skip]
        n_layers = len(W_enc)
        return PerLayerTranscoders(
            W_enc=[w.float() for w in W_enc],
            b_enc=[b.float() for b in b_enc],
            W_dec=[w.float() for w in W_dec],
            b_dec=[b.float() for b in b_dec],
            activations=[TopK(self.k) for _ in range(n_layers)],
            W_skip=skips,
            model_name=model_name,
        )

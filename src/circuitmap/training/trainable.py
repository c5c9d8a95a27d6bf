"""Transcoders in training form: every layer's weights stacked, inputs and outputs standardised.

Each layer trains on ``x' = (x − μx)/σx`` and ``y' = (y − μy)/σy`` (per-layer mean vector, scalar scale), so
one learning rate fits every layer and a squared error of 1 per element means "explains nothing".
``to_transcoders`` folds the standardisation back into the weights: the saved set reads raw MLP inputs and
predicts raw MLP outputs. Losses are sums over tokens divided by a fixed count, so the gradient of a batch
split over processes averages to the gradient of the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from circuitmap.training.config import TrainConfig
from circuitmap.training.sparse import (
    encoder_pre_activations,
    select_encode,
    sparse_decode,
    stacked_indices,
)
from circuitmap.transcoders import (
    CrossLayerTranscoder,
    JumpReLU,
    PerLayerTranscoders,
    ReLU,
    TopK,
    Transcoders,
)


@dataclass
class Standardiser:
    """Per-layer mean vectors ``[L, d]`` and scalar scales ``[L]`` of MLP inputs and outputs (float64)."""

    mean_in: Tensor
    scale_in: Tensor
    mean_out: Tensor
    scale_out: Tensor

    @classmethod
    def from_sums(cls, sums: Tensor, squares: Tensor, count: float, d_model: int) -> Standardiser:
        """From per-layer sums ``[L, 2, d]``, sums of squared norms ``[L, 2]`` and the token count."""
        mean = sums / count
        variance = (squares / count - mean.pow(2).sum(-1)) / d_model
        scale = variance.clamp_min(1e-16).sqrt()
        return cls(mean[:, 0], scale[:, 0], mean[:, 1], scale[:, 1])

    def apply(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Standardised inputs and outputs ``[L, n, d]`` of pairs ``[n, L, 2, d]`` (float32)."""
        pairs = batch.float().permute(1, 2, 0, 3)
        x = (pairs[:, 0] - self.mean_in.float()[:, None]) / self.scale_in.float()[:, None, None]
        y = (pairs[:, 1] - self.mean_out.float()[:, None]) / self.scale_out.float()[:, None, None]
        return x.contiguous(), y.contiguous()

    def state(self) -> dict[str, Tensor]:
        return {
            "mean_in": self.mean_in,
            "scale_in": self.scale_in,
            "mean_out": self.mean_out,
            "scale_out": self.scale_out,
        }


@dataclass
class StepOutput:
    """The loss of one batch and what the trainer logs: per-layer squared error, L0 and fired features."""

    loss: Tensor
    squared_error: Tensor
    target_energy: Tensor
    active: Tensor
    fired: Tensor


class _JumpReLU(torch.autograd.Function):
    """``z·[z > θ]``; θ gets a straight-through gradient through a rectangle kernel of width ε."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = -(threshold / eps) * (grad * window).sum(1, keepdim=True)
        return grad * (z > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """``[z > θ]``, the L0 count; θ gets the same straight-through gradient, z none."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - threshold).abs() < eps / 2).to(grad.dtype)
        return None, -(grad * window).sum(1, keepdim=True) / eps, None


class TrainableTranscoders(nn.Module):
    """PLT (optionally with skip) or CLT weights for all layers, with TopK, JumpReLU or ReLU activations.

    Weights: ``W_enc [L, F, d]``, ``b_enc [L, F]``, ``b_dec [L, d]``; PLT decoders ``W_dec [L, F, d]``; CLT
    decoders one ``[F, L−l, d]`` per source layer l; skip ``W_skip [L, d, d]``; JumpReLU ``log_threshold
    [L, F]``. TopK decoders are kept at unit norm, so activations carry the scale.
    """

    def __init__(self, n_layers: int, d_model: int, config: TrainConfig):
        super().__init__()
        self.config = config
        self.n_layers, self.d_model, self.d_features = n_layers, d_model, config.d_features
        generator = torch.Generator().manual_seed(config.seed)
        F = config.d_features
        if config.cross_layer:
            decoders = []
            for layer in range(n_layers):
                weight = torch.randn(F, n_layers - layer, d_model, generator=generator)
                decoders.append(nn.Parameter(weight / weight.flatten(1).norm(dim=-1)[:, None, None]))
            self.W_dec_per_layer = nn.ParameterList(decoders)
            encoder = torch.randn(n_layers, F, d_model, generator=generator)
            encoder = encoder / encoder.norm(dim=-1, keepdim=True)
        else:
            decoder = torch.randn(n_layers, F, d_model, generator=generator)
            decoder = decoder / decoder.norm(dim=-1, keepdim=True)
            self.W_dec = nn.Parameter(decoder)
            encoder = decoder.clone()
        self.W_enc = nn.Parameter(encoder * 0.1)
        self.b_enc = nn.Parameter(torch.zeros(n_layers, F))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.W_skip = nn.Parameter(torch.zeros(n_layers, d_model, d_model)) if config.skip else None
        self.log_threshold = (
            nn.Parameter(torch.full((n_layers, F), float(torch.tensor(config.init_threshold).log())))
            if config.activation == "jumprelu"
            else None
        )

    def decoder_norms(self) -> Tensor:
        """Norm of each feature's whole decoder (all the layers it writes to) ``[L, F]``."""
        if self.config.cross_layer:
            return torch.stack([w.flatten(1).norm(dim=-1) for w in self.W_dec_per_layer])
        return self.W_dec.norm(dim=-1)

    def _cross_layer_sum(self, decode_flat) -> Tensor:
        """CLT outputs ``[L, n, d]``: ``decode_flat(layer, W)`` writes source ``layer``'s features through its
        decoder viewed as ``[F, (L−layer)·d]``; each target layer sums what every source wrote to it."""
        parts: list[list[Tensor]] = [[] for _ in range(self.n_layers)]
        for layer, weight in enumerate(self.W_dec_per_layer):
            written = decode_flat(layer, weight.view(self.d_features, -1))
            written = written.view(-1, self.n_layers - layer, self.d_model)
            for offset in range(self.n_layers - layer):
                parts[layer + offset].append(written[:, offset])
        return torch.stack([torch.stack(p).sum(0) for p in parts])

    def _decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        if not self.config.cross_layer:
            flat = self.W_dec.view(-1, self.d_model)
            return sparse_decode(values, stacked_indices(indices, self.d_features), flat)
        return self._cross_layer_sum(lambda layer, W: sparse_decode(values[layer], indices[layer], W))

    def _decode_dense(self, acts: Tensor) -> Tensor:
        if not self.config.cross_layer:
            return torch.bmm(acts, self.W_dec)
        return self._cross_layer_sum(lambda layer, W: acts[layer] @ W)

    def _sparsity(self, pre: Tensor, acts: Tensor) -> Tensor:
        """The sparsity penalty per token, summed over features, averaged over layers (ReLU and JumpReLU)."""
        config = self.config
        n = pre.shape[1]
        if config.activation == "relu":
            return (acts.sum(1) * self.decoder_norms()).sum() / (n * self.n_layers)
        if config.sparsity_penalty == "l0":
            threshold = self.log_threshold.exp()[:, None]
            return _Step.apply(pre, threshold, config.jumprelu_bandwidth).sum() / (n * self.n_layers)
        scaled = acts * self.decoder_norms()[:, None] * config.tanh_scale
        return torch.tanh(scaled).sum() / (n * self.n_layers)

    def forward(
        self, x: Tensor, y: Tensor, dead: Tensor | None = None, sparsity_coef: float = 0.0
    ) -> StepOutput:
        """Loss of standardised inputs and targets ``[L, n, d]``; ``dead`` ``[L, F]`` enables the aux loss."""
        config = self.config
        n = x.shape[1]
        normaliser = n * self.d_model * self.n_layers
        aux_indices = None
        penalty = None
        if config.activation == "topk":
            pre = encoder_pre_activations(x, self.W_enc, self.b_enc)
            indices = pre.topk(config.k, dim=-1).indices
            chosen = indices
            if dead is not None:
                aux_k = min(config.aux_k, self.d_features)
                aux_indices = pre.masked_fill(~dead[:, None], float("-inf")).topk(aux_k, dim=-1).indices
                chosen = torch.cat([indices, aux_indices], dim=-1)
            selected = select_encode(x, self.W_enc, self.b_enc, chosen, pre).relu()
            values = selected[..., : config.k]
            prediction = self._decode_sparse(values, indices)
            active = (values > 0).sum(-1).float().sum(1)
            fired = torch.zeros_like(self.b_enc, dtype=torch.bool)
            fired.scatter_(-1, indices.flatten(1), (values > 0).flatten(1))
        else:
            pre = torch.baddbmm(self.b_enc[:, None], x, self.W_enc.transpose(1, 2))
            if config.activation == "relu":
                acts = pre.relu()
            else:
                threshold = self.log_threshold.exp()[:, None]
                acts = _JumpReLU.apply(pre, threshold, config.jumprelu_bandwidth)
            prediction = self._decode_dense(acts)
            active = (acts > 0).sum(-1).float().sum(1)
            fired = (acts > 0).any(1)
            if dead is not None:
                aux_k = min(config.aux_k, self.d_features)
                aux_indices = (
                    pre.detach().masked_fill(~dead[:, None], float("-inf")).topk(aux_k, dim=-1).indices
                )
                selected = pre.gather(-1, aux_indices).relu()
            penalty = self._sparsity(pre, acts)
        prediction = prediction + self.b_dec[:, None]
        if self.W_skip is not None:
            prediction = prediction + torch.bmm(x, self.W_skip.transpose(1, 2))
        errors = (prediction - y).pow(2).sum(-1)
        squared_error = errors.sum(1)
        loss = squared_error.sum() / normaliser
        if aux_indices is not None:
            still_dead = dead[:, None].expand(-1, n, -1).gather(-1, aux_indices)
            aux_values = selected[..., -aux_indices.shape[-1] :] * still_dead
            residual = (y - prediction).detach()
            aux_prediction = self._decode_sparse(aux_values, aux_indices)
            loss = loss + config.aux_coef * (aux_prediction - residual).pow(2).sum() / normaliser
        if penalty is not None and sparsity_coef > 0:
            loss = loss + sparsity_coef * penalty
        return StepOutput(
            loss=loss,
            squared_error=squared_error.detach(),
            target_energy=y.pow(2).sum(-1).sum(1),
            active=active,
            fired=fired,
        )

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Project TopK decoders back to unit norm (activations carry the scale)."""
        if self.config.activation != "topk":
            return
        if self.config.cross_layer:
            for weight in self.W_dec_per_layer:
                weight.div_(weight.flatten(1).norm(dim=-1).clamp_min(1e-8)[:, None, None])
        else:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    def _activations(self) -> list:
        n = self.n_layers
        if self.config.activation == "topk":
            return [TopK(self.config.k) for _ in range(n)]
        if self.config.activation == "relu":
            return [ReLU() for _ in range(n)]
        return [JumpReLU(t.detach().exp().float()) for t in self.log_threshold]

    @torch.no_grad()
    def to_transcoders(self, standardiser: Standardiser, model_name: str | None = None) -> Transcoders:
        """The equivalent set on raw activations: standardisation folded into the weights (float32)."""
        s = standardiser
        W_enc = self.W_enc.double() / s.scale_in[:, None, None]
        b_enc = self.b_enc.double() - torch.einsum("lfd,ld->lf", W_enc, s.mean_in)
        b_dec = self.b_dec.double() * s.scale_out[:, None] + s.mean_out
        skips = None
        if self.W_skip is not None:
            W_skip = self.W_skip.double() * (s.scale_out / s.scale_in)[:, None, None]
            b_dec = b_dec - torch.einsum("lod,ld->lo", W_skip, s.mean_in)
            skips = [w.float() for w in W_skip]
        if self.config.cross_layer:
            W_dec = [
                (w.double() * s.scale_out[layer:, None]).float()
                for layer, w in enumerate(self.W_dec_per_layer)
            ]
            kind = CrossLayerTranscoder
        else:
            W_dec = [w.float() for w in self.W_dec.double() * s.scale_out[:, None, None]]
            kind = PerLayerTranscoders
        return kind(
            W_enc=[w.float() for w in W_enc],
            b_enc=[b.float() for b in b_enc],
            W_dec=W_dec,
            b_dec=[b.float() for b in b_dec],
            activations=self._activations(),
            W_skip=skips,
            model_name=model_name,
        )

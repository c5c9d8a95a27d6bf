"""Sparse training kernels: TopK encoding and decoding whose cost in the backward pass scales with k, not F.

A dense TopK step multiplies by the full encoder and decoder three times each (forward, two gradients). Here
the forward encoder product is the only dense one: the chosen pre-activations get their gradient as a sparse
matrix product, and decoding is a weighted ``embedding_bag`` over the chosen decoder rows. Several layers are
handled in one call by offsetting feature indices into the stacked ``[L·F, d]`` weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SelectEncode(torch.autograd.Function):
    """Pre-activations ``x·W_encᵀ + b_enc`` at given feature indices, with a sparse weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
        ctx.save_for_backward(x, indices)
        ctx.shapes = (W_enc.shape, b_enc.shape)
        return pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        w_shape, b_shape = ctx.shapes
        n_layers, d_features, d_model = w_shape
        n_tokens, k = indices.shape[1], indices.shape[2]
        grad_W = torch.empty(w_shape, dtype=grad.dtype, device=grad.device)
        tokens = torch.arange(n_tokens, device=grad.device).repeat_interleave(k)
        for layer in range(n_layers):
            rows = torch.stack([indices[layer].reshape(-1), tokens])
            matrix = torch.sparse_coo_tensor(
                rows, grad[layer].reshape(-1), (d_features, n_tokens), check_invariants=False
            )
            grad_W[layer] = torch.sparse.mm(matrix, x[layer])
        grad_b = torch.zeros(b_shape, dtype=grad.dtype, device=grad.device)
        grad_b.scatter_add_(-1, indices.reshape(n_layers, -1), grad.reshape(n_layers, -1))
        return None, grad_W, grad_b, None, None


def encoder_pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Pre-activations ``[L, n, F]`` of inputs ``[L, n, d]`` (no gradient: selection only)."""
    with torch.no_grad():
        return torch.baddbmm(b_enc[:, None], x, W_enc.transpose(1, 2))


def select_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, pre: Tensor) -> Tensor:
    """The pre-activations ``[L, n, k]`` at ``indices``, differentiable in the encoder weights and bias."""
    return _SelectEncode.apply(x, W_enc, b_enc, indices, pre)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``Σ_j values[..., j] · W_dec[indices[..., j]]`` over the last axis, for ``W_dec`` ``[rows, d]``."""
    flat_indices = indices.reshape(-1, indices.shape[-1])
    flat_values = values.reshape(-1, values.shape[-1])
    out = F.embedding_bag(flat_indices, W_dec, per_sample_weights=flat_values, mode="sum")
    return out.view(*indices.shape[:-1], W_dec.shape[-1])


def stacked_indices(indices: Tensor, d_features: int) -> Tensor:
    """Indices ``[L, n, k]`` into layer-stacked ``[L·F, d]`` weights."""
    offsets = torch.arange(indices.shape[0], device=indices.device) * d_features
    return indices + offsets[:, None, None]

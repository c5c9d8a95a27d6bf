"""Source nodes and what they write: feature, error and token nodes as sparse write matrices.

A source's direct effect on a target row is the dot product of the row's gradient at the place the source
writes with the source's output there. Features write ``activation × decoder vector`` to MLP output ``m`` at
their position (one ``m`` for per-layer transcoders, every ``m ≥ layer`` for cross-layer ones); error nodes
write their error vector; tokens write their embedding. For each MLP output ``m`` the feature and error
outputs are stored as a CSR matrix ``[n_feature + n_error columns, T·d]`` so that a whole batch of rows is
one sparse-dense product per layer.

Active features that are not kept as nodes are folded into the error node of their layer and position: the
error node's output becomes the error vector plus those features' outputs, so every row still sums to the
true value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from circuitmap.attribution.replacement import ReplacementRun
from circuitmap.transcoders import Transcoders


@dataclass
class Sources:
    """The column nodes of a graph: kept features, error nodes and tokens, with their write matrices.

    ``feature_layer/position/index/activation`` describe the kept features (graph order); error nodes are
    every (layer, position ≥ first_position); tokens are every position. ``writes[m]`` is the CSR write
    matrix onto MLP output ``m``; ``embed`` [T, d] the tokens' outputs.
    """

    feature_layer: torch.Tensor
    feature_position: torch.Tensor
    feature_index: torch.Tensor
    feature_activation: torch.Tensor
    error_layer: torch.Tensor
    error_position: torch.Tensor
    n_tokens: int
    writes: list[torch.Tensor]
    embed: torch.Tensor

    @property
    def n_features(self) -> int:
        return len(self.feature_layer)

    @property
    def n_errors(self) -> int:
        return len(self.error_layer)

    @property
    def n_columns(self) -> int:
        return self.n_features + self.n_errors + self.n_tokens


@dataclass
class ActiveFeatures:
    """Every active feature at positions ≥ ``first_position``, in graph order (layer, position, index)."""

    layer: torch.Tensor
    position: torch.Tensor
    index: torch.Tensor
    activation: torch.Tensor
    pre_activation: torch.Tensor

    def __len__(self) -> int:
        return len(self.layer)

    def subset(self, keep: torch.Tensor) -> ActiveFeatures:
        return ActiveFeatures(*(field[keep] for field in vars(self).values()))


def active_features(run: ReplacementRun, first_position: int) -> ActiveFeatures:
    """Collect the nonzero activations of every layer (positions before ``first_position`` excluded)."""
    parts = []
    for layer, acts in enumerate(run.acts):
        positions, indices = acts[first_position:].nonzero(as_tuple=True)
        positions = positions + first_position
        values = acts[positions, indices]
        pre = run.pre[layer][positions, indices]
        parts.append((torch.full_like(positions, layer), positions, indices, values, pre))
    return ActiveFeatures(*(torch.cat(column) for column in zip(*parts, strict=True)))


def _output_layers(transcoders: Transcoders, layer: int) -> range:
    return range(layer, transcoders.n_layers) if transcoders.kind == "clt" else range(layer, layer + 1)


def build_sources(
    run: ReplacementRun,
    transcoders: Transcoders,
    features: ActiveFeatures,
    kept: torch.Tensor | None,
    first_position: int,
) -> Sources:
    """Write matrices of the kept features (all when ``kept`` is None), error nodes, tokens."""
    n_layers = transcoders.n_layers
    n_tokens, d_model = run.embed.shape[1], run.embed.shape[2]
    kept_mask = torch.ones(len(features), dtype=torch.bool) if kept is None else kept
    kept_features = features.subset(kept_mask)
    dropped = features.subset(~kept_mask)
    error_positions = torch.arange(first_position, n_tokens)
    error_layer = torch.arange(n_layers).repeat_interleave(len(error_positions))
    error_position = error_positions.repeat(n_layers)
    n_errors = len(error_layer)
    dtype, device = run.embed.dtype, run.embed.device

    writes = []
    for out_layer in range(n_layers):
        rows, blocks, vectors = [], [], []
        for layer in range(out_layer + 1):
            if out_layer not in _output_layers(transcoders, layer):
                continue
            in_layer = kept_features.layer == layer
            decoders = transcoders.decoder_vectors(layer, kept_features.index[in_layer], out_layer)
            rows.append(in_layer.nonzero(as_tuple=True)[0])
            blocks.append(kept_features.position[in_layer])
            vectors.append(decoders * kept_features.activation[in_layer, None])
            folded = _folded_outputs(transcoders, dropped, layer, out_layer, n_tokens, d_model)
            if layer == out_layer:
                folded = folded + run.errors[layer]
            error_rows = torch.arange(n_errors)[error_layer == layer]
            rows.append(len(kept_features) + error_rows)
            blocks.append(error_positions)
            vectors.append(folded[error_positions])
        writes.append(
            _block_csr(
                torch.cat(rows),
                torch.cat(blocks),
                torch.cat(vectors),
                len(kept_features) + n_errors,
                n_tokens,
                d_model,
            ).to(device=device, dtype=dtype)
        )
    return Sources(
        kept_features.layer,
        kept_features.position,
        kept_features.index,
        kept_features.activation,
        error_layer,
        error_position,
        n_tokens,
        writes,
        run.embed.detach()[0],
    )


def _folded_outputs(
    transcoders: Transcoders, dropped: ActiveFeatures, layer: int, out_layer: int, n_tokens: int, d_model: int
) -> torch.Tensor:
    """Sum of the outputs onto MLP output ``out_layer`` of the dropped features of ``layer``, per position."""
    in_layer = dropped.layer == layer
    folded = torch.zeros(n_tokens, d_model, dtype=transcoders.dtype, device=transcoders.device)
    if in_layer.any():
        decoders = transcoders.decoder_vectors(layer, dropped.index[in_layer], out_layer)
        folded.index_add_(0, dropped.position[in_layer], decoders * dropped.activation[in_layer, None])
    return folded


def _block_csr(
    rows: torch.Tensor, blocks: torch.Tensor, vectors: torch.Tensor, n_rows: int, n_blocks: int, width: int
) -> torch.Tensor:
    """CSR matrix [n_rows, n_blocks·width]; row ``rows[i]`` holds ``vectors[i]`` in block ``blocks[i]``."""
    order = torch.argsort(rows, stable=True)
    rows, blocks, vectors = rows[order], blocks[order], vectors[order]
    counts = torch.bincount(rows, minlength=n_rows) * width
    crow = torch.zeros(n_rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(counts, 0)
    columns = (blocks[:, None] * width + torch.arange(width)).reshape(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            crow, columns, vectors.reshape(-1), size=(n_rows, n_blocks * width), check_invariants=False
        )

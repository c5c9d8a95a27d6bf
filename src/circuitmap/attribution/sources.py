"""Source nodes and what they write: feature, error and token nodes, grouped by where they write.

A source's direct effect on a target row is the dot product of the row's gradient at the place the source
writes with the source's output there. Features write ``activation × decoder vector`` to MLP output ``m`` at
their position (one ``m`` for per-layer transcoders, every ``m ≥ layer`` for cross-layer ones); error nodes
write their error vector; tokens write their embedding. For each MLP output ``m`` the feature and error
outputs are grouped by position, and positions with about as many writers are stacked into one padded
block (``WriteTier``: widths step by a factor of 1.25, so padding adds at most a quarter), so that a whole
batch of rows costs a few batched products per layer whatever the prompt's length.

Active features that are not kept as nodes are folded into the error node of their layer and position: the
error node's output becomes the error vector plus those features' outputs, so every row still sums to the
true value.

Devices: the outputs written onto MLP output ``m`` are kept where that output's gradient arrives (layer
``m``'s device), their column ids where rows are gathered (the first layer's device, with the tokens').
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from circuitmap.attribution.replacement import ReplacementRun
from circuitmap.transcoders import Transcoders

TIER_RATIO = 1.25
EXACT_WIDTHS = 8


@dataclass
class WriteTier:
    """Outputs written onto one MLP output at a set of positions, padded to a common width ``k``:
    ``vectors`` [n, k, d] (zero where padded), ``columns`` [n, k] (-1 where padded), ``counts`` [n]."""

    positions: torch.Tensor
    columns: torch.Tensor
    vectors: torch.Tensor
    counts: torch.Tensor


@dataclass
class Sources:
    """The column nodes of a graph: kept features, error nodes and tokens, with what they write.

    ``feature_layer`` holds the kept features' layers (graph order); error nodes are
    every (layer, position ≥ first_position); tokens are every position. ``tiers[m]`` hold the columns writing
    onto MLP output ``m`` (positions and column ids on the first layer's device, output vectors on layer
    ``m``'s device); ``embed`` [T, d] holds the tokens' outputs. ``column_layer``/``column_position`` give
    every column's layer (-1 for tokens) and position.
    """

    feature_layer: torch.Tensor
    error_layer: torch.Tensor
    error_position: torch.Tensor
    n_tokens: int
    tiers: list[list[WriteTier]]
    embed: torch.Tensor
    column_layer: torch.Tensor
    column_position: torch.Tensor

    @functools.cached_property
    def writes(self) -> list[list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Per MLP output, ``(position, column ids, output vectors)`` for every position written there (views
        of the tiers, in order of position; built on first use)."""
        writes = []
        for tiers in self.tiers:
            blocks = [
                (position, tier.columns[row, :count], tier.vectors[row, :count])
                for tier in tiers
                for row, (position, count) in enumerate(
                    zip(tier.positions.tolist(), tier.counts.tolist(), strict=True)
                )
            ]
            writes.append(sorted(blocks, key=lambda block: block[0]))
        return writes

    def support(self, layer: int, position: int) -> torch.Tensor:
        """Columns that can have a direct effect on a row reading layer ``layer``'s MLP input at ``position``:
        features and errors of lower layers at positions up to it, and tokens up to it (causal attention)."""
        below = (self.column_layer < layer) & (self.column_position <= position)
        return below.nonzero(as_tuple=True)[0]

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
    """Collect the nonzero activations of every layer (positions before ``first_position`` excluded).

    The bookkeeping lives on the CPU whatever the model's device; decoder products move it where needed.
    """
    parts = []
    for layer, acts in enumerate(run.acts):
        acts = acts.detach().cpu()
        positions, indices = acts[first_position:].nonzero(as_tuple=True)
        positions = positions + first_position
        values = acts[positions, indices]
        pre = run.pre[layer].detach().cpu()[positions, indices]
        parts.append((torch.full_like(positions, layer), positions, indices, values, pre))
    return ActiveFeatures(*(torch.cat(column) for column in zip(*parts, strict=True)))


def build_sources(
    run: ReplacementRun,
    transcoders: Transcoders,
    features: ActiveFeatures,
    kept: torch.Tensor | None,
    first_position: int,
) -> Sources:
    """Outputs of the kept features (all when ``kept`` is None), errors and tokens, by layer and position."""
    n_layers = transcoders.n_layers
    n_tokens, d_model = run.embed.shape[1], run.embed.shape[2]
    kept_mask = torch.ones(len(features), dtype=torch.bool) if kept is None else kept
    kept_features = features.subset(kept_mask)
    dropped = features.subset(~kept_mask)
    error_positions = torch.arange(first_position, n_tokens)
    error_layer = torch.arange(n_layers).repeat_interleave(len(error_positions))
    error_position = error_positions.repeat(n_layers)
    n_errors = len(error_layer)
    dtype, home = run.embed.dtype, run.embed.device

    columns = {}
    for out_layer in range(n_layers):
        ids, positions, vectors = [], [], []
        for layer in range(out_layer + 1):
            if out_layer not in transcoders.output_layers(layer):
                continue
            in_layer = kept_features.layer == layer
            decoders = transcoders.decoder_vectors(layer, kept_features.index[in_layer], out_layer)
            ids.append(in_layer.nonzero(as_tuple=True)[0])
            positions.append(kept_features.position[in_layer])
            vectors.append(decoders * kept_features.activation[in_layer, None].to(decoders))
            folded = _folded_outputs(transcoders, dropped, layer, out_layer, n_tokens, d_model)
            if layer == out_layer:
                folded = folded + run.errors[layer].to(folded)
            ids.append(len(kept_features) + torch.arange(n_errors)[error_layer == layer])
            positions.append(error_positions)
            vectors.append(folded[error_positions.to(folded.device)])
        vectors = torch.cat([block.to(run.leaves[out_layer].device) for block in vectors])
        columns[out_layer] = (torch.cat(ids), torch.cat(positions), vectors)
    tiers = [
        _tiers(ids.to(home), positions.to(home), vectors.to(dtype=dtype), n_tokens)
        for ids, positions, vectors in columns.values()
    ]
    column_layer = torch.cat([kept_features.layer, error_layer, torch.full((n_tokens,), -1)])
    column_position = torch.cat([kept_features.position, error_position, torch.arange(n_tokens)])
    return Sources(
        kept_features.layer,
        error_layer,
        error_position,
        n_tokens,
        tiers,
        run.embed.detach()[0],
        column_layer,
        column_position,
    )


def _tiers(
    ids: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, n_tokens: int
) -> list[WriteTier]:
    """Group the columns writing onto one MLP output by position, and positions into tiers of padded width
    (their number of columns up to 8, then the smallest ``ceil(1.25^e)`` at or above it)."""
    order = torch.argsort(positions, stable=True)
    ids, positions = ids[order], positions[order]
    vectors = vectors[order.to(vectors.device)]
    counts = torch.bincount(positions, minlength=n_tokens)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(ids), device=ids.device) - starts[positions]
    exponents = torch.ceil(torch.log(counts.clamp_min(1).double()) / math.log(TIER_RATIO) - 1e-9)
    widths = torch.where(counts > EXACT_WIDTHS, torch.ceil(TIER_RATIO**exponents).long(), counts)
    tiers = []
    for width in widths[widths > 0].unique().tolist():
        members = (widths == width).nonzero(as_tuple=True)[0]
        row_of = torch.full((n_tokens,), -1, dtype=torch.long, device=ids.device)
        row_of[members] = torch.arange(len(members), device=ids.device)
        chosen = (widths[positions] == width).nonzero(as_tuple=True)[0]
        rows, slots = row_of[positions[chosen]], slot[chosen]
        columns = torch.full((len(members), width), -1, dtype=torch.long, device=ids.device)
        columns[rows, slots] = ids[chosen]
        padded = vectors.new_zeros(len(members), width, vectors.shape[-1])
        padded[rows.to(padded.device), slots.to(padded.device)] = vectors[chosen.to(vectors.device)]
        tiers.append(WriteTier(members, columns, padded, counts[members]))
    return tiers


def _folded_outputs(
    transcoders: Transcoders, dropped: ActiveFeatures, layer: int, out_layer: int, n_tokens: int, d_model: int
) -> torch.Tensor:
    """Sum of the outputs onto MLP output ``out_layer`` of the dropped features of ``layer``, per position."""
    in_layer = dropped.layer == layer
    folded = torch.zeros(n_tokens, d_model, dtype=transcoders.dtype, device=transcoders.layer_device(layer))
    if in_layer.any():
        decoders = transcoders.decoder_vectors(layer, dropped.index[in_layer], out_layer)
        outputs = decoders * dropped.activation[in_layer, None].to(decoders)
        folded.index_add_(0, dropped.position[in_layer].to(folded.device), outputs)
    return folded

"""Collect computed rows into the graph's sparse edge arrays, written in place.

Each row keeps exactly its structural support (``Sources.support``): the columns that can reach it at all.
Sizes are known before any row is computed, so the edge arrays are allocated once at their final size and
rows are copied straight in, with no scan for nonzeros and no concatenation at the end.
"""

from __future__ import annotations

import numpy as np
import torch

from circuitmap.attribution.rows import RowSpec
from circuitmap.attribution.sources import Sources


class EdgeWriter:
    """Sparse rows of ``spec`` over ``sources``' columns; ``values`` are the quantities the rows explain."""

    def __init__(self, spec: RowSpec, sources: Sources, values: torch.Tensor, dtype: torch.dtype):
        self.spec, self.sources, self.values = spec, sources, values
        self._supports: dict[tuple[int, int], torch.Tensor] = {}
        keys = list(zip(spec.layer.tolist(), spec.position.tolist(), strict=True))
        self.row_counts = np.array([len(self._support(*key)) for key in keys], dtype=np.int64)
        self.offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(self.row_counts, out=self.offsets[1:])
        self.indices = np.empty(self.offsets[-1], dtype=np.int32)
        self.weights = np.empty(self.offsets[-1], dtype=np.float64 if dtype == torch.float64 else np.float32)
        self.constants = np.empty(len(keys), dtype=np.float64)

    def _support(self, layer: int, position: int) -> torch.Tensor:
        if (layer, position) not in self._supports:
            self._supports[layer, position] = self.sources.support(layer, position)
        return self._supports[layer, position]

    def write(self, rows: slice, batch: torch.Tensor) -> None:
        """Store the rows ``rows`` of the spec, given as dense values over all columns."""
        batch = batch.detach().cpu()
        if batch.dtype not in (torch.float32, torch.float64):
            batch = batch.float()
        keys = torch.stack([self.spec.layer[rows], self.spec.position[rows]], dim=1)
        runs, lengths = torch.unique_consecutive(keys, dim=0, return_counts=True)
        row = rows.start
        for (layer, position), length in zip(runs.tolist(), lengths.tolist(), strict=True):
            support = self._support(layer, position)
            block = batch[row - rows.start : row - rows.start + length][:, support]
            start, stop = self.offsets[row], self.offsets[row + length]
            self.indices[start:stop] = np.tile(support.numpy().astype(np.int32), length)
            self.weights[start:stop] = block.reshape(-1).numpy()
            self.constants[row : row + length] = (
                self.values[row : row + length] - block.sum(1, dtype=torch.float64)
            ).numpy()
            row += length

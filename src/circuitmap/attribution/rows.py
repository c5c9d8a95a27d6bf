"""Rows of the adjacency matrix: batched backward passes through the replacement model.

A row is a target's read-out vector injected at one place: a feature's encoder row at its layer's MLP input
and position, or a target's vector at a read-out point at the last position. One backward pass with
``is_grads_batched`` gives, for every row of a batch, the gradient at every MLP output below the batch's
highest layer and at the embedding;
dotting those with the sources' outputs (``Sources.writes``) gives the row's direct effects. Rows are
processed in order of layer so a batch only goes as deep as its highest layer. On a model spread over several
devices each product is taken where its gradient arrives and gathered on the first layer's device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from circuitmap.attribution.progress import Reporter
from circuitmap.attribution.replacement import ReplacementRun
from circuitmap.attribution.sources import Sources


@dataclass
class RowSpec:
    """Rows to compute: read-out ``vectors`` [n, d] injected at ``point`` and ``position``; ``"mlp_in"`` rows
    are features of ``layer``, other rows read ``resid_final`` or ``final_norm``."""

    point: list[str]
    layer: torch.Tensor
    position: torch.Tensor
    vectors: torch.Tensor

    def __len__(self) -> int:
        return len(self.point)

    def depth(self, rows: slice, n_layers: int) -> int:
        """How many layers' MLP outputs can reach these rows (a feature of layer l reads layers below l)."""
        if any(point != "mlp_in" for point in self.point[rows]):
            return n_layers
        return int(self.layer[rows].max())


def _injection_tensor(run: ReplacementRun, point: str, layer: int) -> torch.Tensor:
    return run.mlp_in[layer] if point == "mlp_in" else run.readouts[point]


def row_values(run: ReplacementRun, sources: Sources, spec: RowSpec, rows: slice) -> torch.Tensor:
    """Direct effects [n_rows, n_columns] of every source on the rows ``rows`` of ``spec``."""
    points, layers = spec.point[rows], spec.layer[rows].tolist()
    positions, vectors = spec.position[rows], spec.vectors[rows]
    batch = len(points)
    groups: dict[tuple[str, int], list[int]] = {}
    for row, key in enumerate(zip(points, layers, strict=True)):
        groups.setdefault(key if key[0] == "mlp_in" else (key[0], -1), []).append(row)
    outputs, grads = [], []
    for (point, layer), members in groups.items():
        tensor = _injection_tensor(run, point, layer)
        grad = torch.zeros(batch, *tensor.shape, dtype=tensor.dtype, device=tensor.device)
        index = torch.tensor(members)
        grad[index.to(grad.device), 0, positions[index].to(grad.device)] = vectors[index].to(grad)
        outputs.append(tensor)
        grads.append(grad)
    inputs = [*run.leaves[: spec.depth(rows, len(run.leaves))], run.embed]
    gradients = torch.autograd.grad(
        outputs, inputs, grads, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    n_written = sources.n_features + sources.n_errors
    last = int(positions.max())
    values = torch.zeros(batch, sources.n_columns, dtype=run.embed.dtype, device=run.embed.device)
    for out_layer, gradient in enumerate(gradients[:-1]):
        if gradient is None:
            continue
        for position, columns, vectors in sources.writes[out_layer]:
            if position <= last:
                values.index_add_(1, columns, (gradient[:, 0, position] @ vectors.T).to(values.device))
    embed_gradient = gradients[-1]
    if embed_gradient is not None:
        values[:, n_written:] = torch.einsum("btd,td->bt", embed_gradient[:, 0], sources.embed)
    return values


def batched_rows(
    run: ReplacementRun,
    sources: Sources,
    spec: RowSpec,
    batch_size: int,
    reporter: Reporter,
    description: str,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, values)`` for consecutive batches of ``spec``'s rows."""
    with reporter.stage(len(spec), description) as advance:
        for start in range(0, len(spec), batch_size):
            rows = slice(start, min(start + batch_size, len(spec)))
            yield rows, row_values(run, sources, spec, rows)
            advance(rows.stop - rows.start)


def concat_specs(specs: Sequence[RowSpec]) -> RowSpec:
    """One RowSpec holding the rows of several, in order (the vectors on the first one's device: feature rows
    come from the transcoders, target rows from the unembedding, which a device map may put elsewhere)."""
    device = specs[0].vectors.device
    return RowSpec(
        [point for spec in specs for point in spec.point],
        torch.cat([spec.layer for spec in specs]),
        torch.cat([spec.position for spec in specs]),
        torch.cat([spec.vectors.to(device) for spec in specs]),
    )

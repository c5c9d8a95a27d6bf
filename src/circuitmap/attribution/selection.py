"""Choosing the features a capped graph keeps, by influence estimated as rows arrive.

After the target rows, each active feature's influence is estimated as the probability-weighted share of the
targets' normalised input it provides; features are visited in batches in order of that estimate, and each
visited row adds its own estimate times its normalised input to the estimates of the features it reads
from. The visited features are the kept ones.

The visited rows are kept in a compact form so that they need not be computed twice: each row keeps its
error and token columns, the sum of all its feature columns per (layer, position), and its feature columns
for a pool of candidates (every feature visited so far or in its batch, plus the best-estimated others;
target rows, which come first, keep every feature column).
At the end a row whose pool held every kept feature is complete: its dropped features fold into the error
nodes as ``error + (all features at that layer and position) − (kept ones)``. Rows whose pool missed a kept
feature are computed again against the folded sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from circuitmap.attribution.progress import Reporter
from circuitmap.attribution.rows import RowComputer, RowSpec
from circuitmap.attribution.sources import ActiveFeatures, Sources
from circuitmap.hardware import release_free_memory

ESTIMATE_CHUNK = 32


@dataclass
class Selection:
    """Kept features, and the rows (kept features in graph order, then targets) already known.

    ``rows`` [n_kept + n_targets, n_kept + n_errors + n_tokens] holds folded rows; ``complete`` marks the
    rows that are valid there (the others must be computed again).
    """

    kept: torch.Tensor
    rows: torch.Tensor
    complete: torch.Tensor


@dataclass
class _Record:
    """Compact form of a batch of computed rows (see the module docstring)."""

    features: torch.Tensor
    pool: torch.Tensor
    pool_values: torch.Tensor
    tail: torch.Tensor
    feature_sums: torch.Tensor


def _normalised(values: torch.Tensor) -> torch.Tensor:
    magnitudes = values.abs().double()
    return magnitudes / magnitudes.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def select_features(
    computer: RowComputer,
    sources: Sources,
    features: ActiveFeatures,
    feature_rows: Callable[[torch.Tensor], RowSpec],
    target_spec: RowSpec,
    weights: torch.Tensor,
    error_of: torch.Tensor,
    max_feature_nodes: int,
    batch_size: int,
    pool_extra: int,
    reporter: Reporter,
) -> Selection:
    """Visit ``max_feature_nodes`` features by estimated influence (``sources`` hold every active feature),
    ``batch_size`` at a time.

    ``feature_rows(ids)`` gives the rows of the features at those indices (built per batch, so the encoder
    rows of every active feature are never held at once); ``error_of`` maps each feature to the index of its
    error node; ``pool_extra`` is how many unvisited
    candidates each batch keeps beyond the visited ones.
    """
    n_features, n_errors = len(features), sources.n_errors
    visited = torch.zeros(n_features, dtype=torch.bool)
    estimate = torch.zeros(n_features, dtype=torch.float64)
    records: list[_Record] = []

    def visit(spec: RowSpec, chosen: torch.Tensor | None, row_weights: torch.Tensor) -> None:
        if chosen is None:
            pool = torch.arange(n_features)
        else:
            candidates = estimate.masked_fill(visited, -1.0)
            candidates[chosen] = -1.0
            in_pool = visited.clone()
            in_pool[candidates.topk(min(pool_extra, n_features)).indices] = True
            in_pool[chosen] = True
            pool = in_pool.nonzero(as_tuple=True)[0]
        values = computer.compute(sources, spec).cpu()
        for start in range(0, len(spec), ESTIMATE_CHUNK):
            part = slice(start, start + ESTIMATE_CHUNK)
            estimate.add_((row_weights[part, None] * _normalised(values[part])[:, :n_features]).sum(0))
        feature_values = values[:, :n_features]
        sums = torch.zeros(len(spec), n_errors, dtype=values.dtype).index_add_(1, error_of, feature_values)
        features_of_rows = chosen if chosen is not None else torch.full((len(spec),), -1)
        tail = values[:, n_features:].clone()
        records.append(_Record(features_of_rows, pool, feature_values[:, pool], tail, sums))
        del values, feature_values
        release_free_memory()

    visit(target_spec, None, weights)
    with reporter.stage(max_feature_nodes, "selecting features") as advance:
        while int(visited.sum()) < max_feature_nodes:
            count = min(batch_size, max_feature_nodes - int(visited.sum()))
            chosen = estimate.masked_fill(visited, -1.0).topk(count).indices.sort().values
            visit(feature_rows(chosen), chosen, estimate[chosen])
            visited[chosen] = True
            advance(count)
    return _assemble_rows(records, visited, error_of, n_errors)


def _assemble_rows(
    records: list[_Record], kept: torch.Tensor, error_of: torch.Tensor, n_errors: int
) -> Selection:
    """Folded rows in graph order (kept features, then targets) from the records."""
    kept_index = torch.full((len(kept),), -1, dtype=torch.long)
    kept_ids = kept.nonzero(as_tuple=True)[0]
    kept_index[kept_ids] = torch.arange(len(kept_ids))
    n_kept, n_targets = len(kept_ids), len(records[0].features)
    n_tail = records[0].tail.shape[1]
    rows = torch.zeros(n_kept + n_targets, n_kept + n_tail, dtype=records[0].tail.dtype)
    complete = torch.zeros(n_kept + n_targets, dtype=torch.bool)
    for number, record in enumerate(records):
        order = n_kept + torch.arange(n_targets) if number == 0 else kept_index[record.features]
        covered = kept[record.pool]
        if int(covered.sum()) < n_kept:
            continue
        kept_values = record.pool_values[:, covered]
        columns = kept_index[record.pool[covered]]
        block = torch.zeros(len(order), n_kept + n_tail, dtype=rows.dtype)
        block[:, columns] = kept_values
        block[:, n_kept:] = record.tail
        block[:, n_kept : n_kept + n_errors] += record.feature_sums
        block[:, n_kept : n_kept + n_errors].index_add_(1, error_of[kept_ids], -block[:, :n_kept])
        rows[order] = block
        complete[order] = True
    return Selection(kept, rows, complete)

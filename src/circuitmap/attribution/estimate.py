"""Predict an attribution's peak memory and time before running it.

The model runs once on the prompt (cheap next to attribution) to count active features; the number of rows
and the edges each row keeps follow from that exactly (up to which features a cap keeps). Time comes from the
backward passes the run will make: they are laid out as ``attribute`` lays them out (under a cap, for a
random sample of the active features standing for the visited ones); one pass (the faster of two tries,
the first paying for warm-up) and one graph build are timed at the shortest, the median and the longest
prefix among them, the rest are interpolated by prefix and scaled by how many layers the pass goes down and
by its graph's copies (rows recomputed after a selection that missed are not foreseen); memory adds the
model, the transcoders, the edge arrays, the row graphs and a pass's gradients and, under a cap, the rows
kept while selecting.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from circuitmap.attribution import compute
from circuitmap.attribution.config import AttributionConfig
from circuitmap.attribution.replacement import replacement_run
from circuitmap.attribution.rows import RowComputer, rows_per_pass
from circuitmap.attribution.sources import build_sources
from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders


@dataclass
class Estimate:
    """Predicted cost of one ``attribute`` call."""

    n_tokens: int
    n_active_features: int
    n_feature_nodes: int
    n_rows: int
    n_edges: int
    peak_bytes: int
    seconds: float | None

    def describe(self) -> str:
        timing = "" if self.seconds is None else f", time {self.seconds:.0f} s"
        return (
            f"{self.n_tokens} tokens, {self.n_active_features:,} active features, "
            f"{self.n_feature_nodes:,} feature nodes, {self.n_rows:,} rows to compute, "
            f"about {self.n_edges:,} edges; expected peak memory {self.peak_bytes / 2**30:.2f} GiB{timing}"
        )


def available_memory(device: torch.device | None = None) -> int | None:
    """Bytes free for a new allocation on ``device``: free GPU memory for CUDA; otherwise Linux's
    ``MemAvailable`` or the free physical pages; None where the system does not say."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _support_sizes(
    column_layer: torch.Tensor, column_position: torch.Tensor, rows, n_layers: int, n_tokens: int
) -> torch.Tensor:
    """For each row (a feature at layer l, position p): how many of these columns have layer < l and
    position ≤ p, counted through a cumulative (layer, position) histogram."""
    histogram = torch.zeros(n_layers + 2, n_tokens, dtype=torch.float64)
    histogram.index_put_(
        (column_layer + 1, column_position),
        torch.ones(len(column_layer), dtype=torch.float64),
        accumulate=True,
    )
    below = histogram.cumsum(0).cumsum(1)
    return below[rows.layer, rows.position]


def check_fits(estimate: Estimate, device: torch.device | None = None) -> None:
    """A one-line error when the estimated peak memory exceeds what ``device`` has free."""
    available = available_memory(device)
    if available is not None and estimate.peak_bytes > available:
        raise CircuitmapError(
            f"the estimated peak memory ({estimate.peak_bytes / 2**30:.1f} GiB) exceeds the available "
            f"{available / 2**30:.1f} GiB; lower --max-feature-nodes or --batch-size, or pass --force"
        )


def estimate_attribution(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    config: AttributionConfig | None = None,
    *,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    n_targets: int | None = None,
    timed: bool = True,
) -> Estimate:
    """Predict peak memory and (when ``timed``) time of ``attribute`` with the same arguments.

    ``n_targets`` is the number of targets to plan for (default: the most salient logits ``config`` allows).
    """
    config = (config or AttributionConfig()).with_changes(
        max_feature_nodes=max_feature_nodes, batch_size=batch_size
    )
    ids = model.encode(prompt)
    compute.check_inputs(model, transcoders, ids, config)
    transcoders.follow(model.layer_devices(), model.dtype)
    n_tokens, itemsize = ids.shape[1], model.dtype.itemsize
    max_feature_nodes = config.max_feature_nodes
    n_targets = n_targets or config.max_n_logits
    batch_size = config.batch_size or compute.default_batch_size(model, n_tokens)
    with replacement_run(model, transcoders, ids) as run:
        features = compute.collect_features(run)
        capped = max_feature_nodes is not None and len(features) > max_feature_nodes
        n_kept = max_feature_nodes if capped else len(features)
        sources = build_sources(run, transcoders, features, None, compute.FIRST_POSITION)
        computer = RowComputer(model, transcoders, run, ids, min(batch_size, rows_per_pass(model, n_tokens)))
        seconds = (
            _predicted_seconds(computer, transcoders, features, sources, n_kept, capped, batch_size)
            if timed
            else None
        )
        share = n_kept / len(features)
        is_feature = torch.arange(sources.n_columns) < sources.n_features
        feature_support = _support_sizes(
            sources.column_layer[is_feature],
            sources.column_position[is_feature],
            features,
            model.n_layers,
            n_tokens,
        )
        other_support = _support_sizes(
            sources.column_layer[~is_feature],
            sources.column_position[~is_feature],
            features,
            model.n_layers,
            n_tokens,
        )
        per_row = feature_support * share + other_support
        n_final_columns = n_kept + sources.n_errors + sources.n_tokens
        n_edges = int(per_row.sum() * share) + n_targets * n_final_columns
        source_bytes = sum(tier.vectors.numel() for tiers in sources.tiers for tier in tiers) * itemsize
    n_rows = n_kept + n_targets
    per_pass = computer.rows_per_pass
    graphs = (
        per_pass
        * model.d_model
        * itemsize
        * sum(computer.prefix_of(position) for position in range(0, n_tokens, computer.step))
    )
    gradients = graphs + 6 * per_pass * n_tokens * model.d_model * itemsize
    values = batch_size * sources.n_columns * itemsize * 2
    pool = min(len(features), n_kept + compute.pool_extra(n_kept, n_targets, model.dtype))
    per_visited_row = pool + sources.n_errors * 2 + sources.n_tokens
    selection = (n_kept + n_targets) * (per_visited_row + n_final_columns) * itemsize if capped else 0
    peak = (
        _tensor_bytes(model.hf_model)
        + _tensor_bytes(transcoders)
        + sum(math.prod(layer.decoder.shape) for layer in transcoders.layers) * itemsize
        + source_bytes
        + 2 * n_tokens * transcoders.d_features * transcoders.n_layers * itemsize
        + n_edges * (4 + itemsize)
        + gradients
        + values
        + selection
    )
    return Estimate(n_tokens, len(features), n_kept, n_rows, n_edges, int(peak), seconds)


def _predicted_seconds(
    computer: RowComputer,
    transcoders: Transcoders,
    features,
    sources,
    n_kept: int,
    capped: bool,
    batch_size: int,
) -> float:
    """Seconds of the backward passes and graph builds of the run (see the module docstring)."""
    if capped:
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(features), generator=generator)[:n_kept]
    else:
        order = torch.arange(len(features))
    spec = compute.feature_rows(transcoders, features)
    passes = []
    for start in range(0, len(order), batch_size):
        visit = spec.subset(order[start : start + batch_size])
        passes += [(row_pass, visit.subset(row_pass.members)) for row_pass in computer.passes(visit)]
    lengths = sorted({row_pass.length for row_pass, _ in passes})
    timed_lengths = sorted({lengths[0], lengths[len(lengths) // 2], lengths[-1]})
    per_copy_layer, build_per_copy = {}, {}
    for length in timed_lengths:
        sampled, sample = max(
            ((row_pass, part) for row_pass, part in passes if row_pass.length == length),
            key=lambda item: (item[0].copies, len(item[1])),
        )
        started = time.perf_counter()
        graph = computer.graph(length, sampled.copies)
        build_per_copy[length] = (time.perf_counter() - started) / sampled.copies
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            graph.compute(sources, sample)
            timings.append(time.perf_counter() - started)
        per_copy_layer[length] = min(timings) / (_depth(sample) * sampled.copies)
        del computer.graphs[length, sampled.copies]
    known = torch.tensor(timed_lengths, dtype=torch.float64)

    def interpolate(table: dict[int, float], length: int) -> float:
        values = torch.tensor([table[other] for other in timed_lengths], dtype=torch.float64)
        return float(_interpolate(torch.tensor(float(length)), known, values))

    total = sum(
        interpolate(per_copy_layer, row_pass.length) * _depth(part) * row_pass.copies
        for row_pass, part in passes
    )
    graphs = {(row_pass.length, row_pass.copies) for row_pass, _ in passes}
    return total + sum(interpolate(build_per_copy, length) * copies for length, copies in graphs)


def _depth(spec) -> int:
    """How many layers a pass of these rows goes down (a feature of layer l reads the layers below it)."""
    return max(1, int(spec.layer.max()))


def _interpolate(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of the points (xs, ys) at x (xs increasing; constant for one point)."""
    if len(xs) == 1:
        return ys[0]
    segment = int(torch.searchsorted(xs, x).clamp(1, len(xs) - 1))
    left, right = xs[segment - 1], xs[segment]
    weight = (x - left) / (right - left)
    return ys[segment - 1] + weight * (ys[segment] - ys[segment - 1])

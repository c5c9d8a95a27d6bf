"""Streaming statistics of every feature of one layer, updated a batch of contexts at a time.

All updates are tensor operations over the whole ``[batch, positions, features]`` block: the top contexts
and the uniform sample of active contexts are kept by merging the running list with the batch's candidates
through one ``topk`` over the context axis, so no Python code runs per feature or per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HISTOGRAM_LOW = -4.0
HISTOGRAM_HIGH = 4.0
HISTOGRAM_BINS = 160


def histogram_edges() -> list[float]:
    """Bin edges of the activation histogram: log-spaced from 1e-4 to 1e4; the end bins also hold what is
    beyond them."""
    step = (HISTOGRAM_HIGH - HISTOGRAM_LOW) / HISTOGRAM_BINS
    return [10 ** (HISTOGRAM_LOW + i * step) for i in range(HISTOGRAM_BINS + 1)]


@dataclass
class ContextList:
    """The ``size`` best-scoring contexts of each feature, with a window of per-token activations each.

    ``scores`` decide membership (the context's maximum for top lists, a random key for samples); empty slots
    score ``-inf`` and have context ``-1``. ``starts`` is the window's first position in the context.
    """

    scores: torch.Tensor  # [size, F] float32
    maxima: torch.Tensor  # [size, F] float32
    contexts: torch.Tensor  # [size, F] int64
    starts: torch.Tensor  # [size, F] int64
    windows: torch.Tensor  # [size, F, W] float32

    @classmethod
    def empty(cls, size: int, d_features: int, window: int) -> ContextList:
        return cls(
            scores=torch.full((size, d_features), -math.inf),
            maxima=torch.zeros(size, d_features),
            contexts=torch.full((size, d_features), -1, dtype=torch.long),
            starts=torch.zeros(size, d_features, dtype=torch.long),
            windows=torch.zeros(size, d_features, window),
        )

    def merge(
        self,
        scores: torch.Tensor,
        maxima: torch.Tensor,
        peaks: torch.Tensor,
        acts: torch.Tensor,
        context_ids: torch.Tensor,
        before: int,
    ) -> None:
        """Merge a batch: ``scores``/``maxima``/``peaks`` are ``[B, F]`` (score, maximum and its position per
        context and feature; score ``-inf`` where the feature is inactive), ``acts`` the activations
        ``[B, T, F]``, ``context_ids`` ``[B]``.

        Slots are unordered: a context that makes the list takes the slot of one that dropped out, so only
        the entering contexts are written.
        """
        size, d_features = self.scores.shape
        window = self.windows.shape[2]
        _, pick = torch.cat([self.scores, scores]).topk(size, dim=0, sorted=False)
        chosen = torch.zeros(size + scores.shape[0], d_features, dtype=torch.bool).scatter_(0, pick, True)
        entering = chosen[size:] & torch.isfinite(scores)
        enter_feature, row = entering.T.nonzero(as_tuple=True)
        if row.numel() == 0:
            return
        free_feature, free_slot = (~chosen[:size]).T.nonzero(as_tuple=True)
        slot = free_slot[_first_of(free_feature, d_features)[enter_feature] + _rank_in_group(enter_feature)]
        start = (peaks[row, enter_feature] - before).clamp(min=0, max=acts.shape[1] - window)
        positions = start.unsqueeze(1) + torch.arange(window)
        self.scores[slot, enter_feature] = scores[row, enter_feature]
        self.maxima[slot, enter_feature] = maxima[row, enter_feature]
        self.contexts[slot, enter_feature] = context_ids[row]
        self.starts[slot, enter_feature] = start
        self.windows[slot, enter_feature] = acts[row.unsqueeze(1), positions, enter_feature.unsqueeze(1)]

    def ranked(self) -> ContextList:
        """The same list with each feature's slots ordered by maximum, largest first (empty slots last)."""
        order = torch.where(self.contexts >= 0, self.maxima, -math.inf).argsort(dim=0, descending=True)
        window = self.windows.shape[2]
        return ContextList(
            scores=self.scores.gather(0, order),
            maxima=self.maxima.gather(0, order),
            contexts=self.contexts.gather(0, order),
            starts=self.starts.gather(0, order),
            windows=self.windows.gather(0, order.unsqueeze(-1).expand(-1, -1, window)),
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> ContextList:
        return cls(**{name: tensors[f"{prefix}.{name}"] for name in cls.__dataclass_fields__})


def _first_of(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Index of each group's first element in a sorted group vector, ``[n_groups]``."""
    counts = torch.bincount(groups, minlength=n_groups)
    return counts.cumsum(0) - counts


def _rank_in_group(groups: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 … within each run of equal values of a sorted group vector."""
    n_groups = int(groups.max()) + 1
    return torch.arange(groups.numel()) - _first_of(groups, n_groups)[groups]


@dataclass
class LayerStatistics:
    """Everything the dashboards need from the corpus for one layer's features."""

    top: ContextList
    sample: ContextList
    histogram: torch.Tensor  # [F, bins] int64, counts of active tokens by activation
    active: torch.Tensor  # [F] int64, tokens where the feature is active
    total: torch.Tensor  # [F] float64, sum of activations

    @classmethod
    def empty(cls, d_features: int, top: int, samples: int, window: int) -> LayerStatistics:
        return cls(
            top=ContextList.empty(top, d_features, window),
            sample=ContextList.empty(samples, d_features, window),
            histogram=torch.zeros(d_features, HISTOGRAM_BINS, dtype=torch.long),
            active=torch.zeros(d_features, dtype=torch.long),
            total=torch.zeros(d_features, dtype=torch.float64),
        )

    def update(self, acts: torch.Tensor, context_ids: torch.Tensor, keys: torch.Tensor, before: int) -> None:
        """Add a batch of activations ``[B, T, F]`` (zero where a token is not counted) of contexts
        ``context_ids`` ``[B]``; ``keys`` ``[B, F]`` are uniform random numbers that pick the sample."""
        acts = acts.float()
        maxima, peaks = acts.max(dim=1)
        active = maxima > 0
        never = torch.tensor(-math.inf)
        self.top.merge(torch.where(active, maxima, never), maxima, peaks, acts, context_ids, before)
        self.sample.merge(torch.where(active, keys, never), maxima, peaks, acts, context_ids, before)
        token, feature = (acts > 0).flatten(0, 1).nonzero(as_tuple=True)
        values = acts.flatten(0, 1)[token, feature]
        self.active += torch.bincount(feature, minlength=self.active.shape[0])
        self.total.index_add_(0, feature, values.double())
        bins = (
            (values.log10() - HISTOGRAM_LOW) * (HISTOGRAM_BINS / (HISTOGRAM_HIGH - HISTOGRAM_LOW))
        ).floor()
        bins = bins.long().clamp(0, HISTOGRAM_BINS - 1)
        counts = torch.bincount(feature * HISTOGRAM_BINS + bins, minlength=self.histogram.numel())
        self.histogram += counts.view_as(self.histogram)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **self.top.tensors("top"),
            **self.sample.tensors("sample"),
            "histogram": self.histogram,
            "active": self.active,
            "total": self.total,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LayerStatistics:
        return cls(
            top=ContextList.from_tensors(tensors, "top"),
            sample=ContextList.from_tensors(tensors, "sample"),
            histogram=tensors["histogram"],
            active=tensors["active"],
            total=tensors["total"],
        )

"""Streaming statistics of every feature of one layer, updated a batch of contexts at a time.

All updates are tensor operations over the whole ``[batch, positions, features]`` block: the top contexts
and the uniform sample of active contexts are kept by merging the running list with the batch's candidates
through one ranking over the context axis, so no Python code runs per feature or per token.

The statistics of disjoint sets of contexts combine into those of their union, exactly, whatever the order
the contexts came in: lists are ranked by score and, among equal scores, by context id (the lower first),
so which contexts a list keeps depends on the candidates alone; and activations are summed in fixed point
(whole multiples of ``TOTAL_UNIT`` in two 64-bit integers), where addition is associative. Processes that
each read a share of a corpus therefore merge into the statistics of one process reading all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HISTOGRAM_LOW = -4.0
HISTOGRAM_HIGH = 4.0
HISTOGRAM_BINS = 160
TOTAL_UNIT = 2.0**-40
"""Activations are summed as whole multiples of this (their digits below it, under 1e-12, are rounded)."""
_LOW_BITS = 32
"""The low word of a sum holds its multiples of ``TOTAL_UNIT`` below ``2**-8``."""


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
        candidates = torch.cat([self.contexts, context_ids.unsqueeze(1).expand(-1, d_features)])
        pick = _best(torch.cat([self.scores, scores]), candidates, size)
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

    def combine(self, other: ContextList) -> None:
        """Keep the best of this list and ``other``, a list of other contexts: the list that merging their
        contexts one batch at a time would have kept."""
        pool = {name: torch.cat([tensor, getattr(other, name)]) for name, tensor in self._fields().items()}
        for name, tensor in _rows(pool, _best(pool["scores"], pool["contexts"], len(self.scores))).items():
            setattr(self, name, tensor)

    def ranked(self) -> ContextList:
        """The same list with each feature's slots ordered by maximum, largest first, equal maxima by context
        id (empty slots last)."""
        valid_maxima = torch.where(self.contexts >= 0, self.maxima, -math.inf)
        return ContextList(**_rows(self._fields(), _best(valid_maxima, self.contexts, len(self.scores))))

    def _fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": tensor for name, tensor in self._fields().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> ContextList:
        return cls(**{name: tensors[f"{prefix}.{name}"] for name in cls.__dataclass_fields__})


def _best(scores: torch.Tensor, contexts: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of the ``size`` best entries of each column of ``scores`` ``[n, F]``, best first: the highest
    score, and among equal scores the lower context id, so that the choice never depends on the rows' order.
    One ``topk`` over int64 keys: the float32 score's bits made to sort as the score does (negative
    patterns flipped), then the context id (below ``2**32 - 1``) reversed."""
    bits = scores.float().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return ((ordered << 32) | (0xFFFFFFFF - (contexts + 1))).topk(size, dim=0).indices


def _rows(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows ``rows`` ``[size, F]`` of each ``[n, F]`` or ``[n, F, W]`` tensor of ``tensors``."""
    return {
        name: tensor.gather(
            0, rows if tensor.dim() == 2 else rows.unsqueeze(-1).expand(-1, -1, tensor.shape[2])
        )
        for name, tensor in tensors.items()
    }


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
    total_high: torch.Tensor  # [F] int64, sum of activations: its whole multiples of 2**-8 …
    total_low: torch.Tensor  # [F] int64, … and the rest, in multiples of TOTAL_UNIT

    @classmethod
    def empty(cls, d_features: int, top: int, samples: int, window: int) -> LayerStatistics:
        return cls(
            top=ContextList.empty(top, d_features, window),
            sample=ContextList.empty(samples, d_features, window),
            histogram=torch.zeros(d_features, HISTOGRAM_BINS, dtype=torch.long),
            active=torch.zeros(d_features, dtype=torch.long),
            total_high=torch.zeros(d_features, dtype=torch.long),
            total_low=torch.zeros(d_features, dtype=torch.long),
        )

    @property
    def total(self) -> torch.Tensor:
        """The sum of each feature's activations ``[F]`` (float64)."""
        return self.total_high.double() * 2.0**-8 + self.total_low.double() * TOTAL_UNIT

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
        high, low = _fixed_point(values)
        self._add_total(
            torch.zeros_like(self.total_high).index_add_(0, feature, high),
            torch.zeros_like(self.total_low).index_add_(0, feature, low),
        )
        bins = (
            (values.log10() - HISTOGRAM_LOW) * (HISTOGRAM_BINS / (HISTOGRAM_HIGH - HISTOGRAM_LOW))
        ).floor()
        bins = bins.long().clamp(0, HISTOGRAM_BINS - 1)
        counts = torch.bincount(feature * HISTOGRAM_BINS + bins, minlength=self.histogram.numel())
        self.histogram += counts.view_as(self.histogram)

    def combine(self, other: LayerStatistics) -> None:
        """Add the statistics ``other`` of other contexts (none of them counted here)."""
        self.top.combine(other.top)
        self.sample.combine(other.sample)
        self.histogram += other.histogram
        self.active += other.active
        self._add_total(other.total_high, other.total_low)

    def _add_total(self, high: torch.Tensor, low: torch.Tensor) -> None:
        self.total_high, self.total_low = _carried(self.total_high + high, self.total_low + low)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **self.top.tensors("top"),
            **self.sample.tensors("sample"),
            "histogram": self.histogram,
            "active": self.active,
            "total_high": self.total_high,
            "total_low": self.total_low,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LayerStatistics:
        if "total" in tensors:  # saved by a build begun before sums were kept in fixed point
            high, low = _fixed_point(tensors["total"])
        else:
            high, low = tensors["total_high"], tensors["total_low"]
        return cls(
            top=ContextList.from_tensors(tensors, "top"),
            sample=ContextList.from_tensors(tensors, "sample"),
            histogram=tensors["histogram"],
            active=tensors["active"],
            total_high=high,
            total_low=low,
        )


def _fixed_point(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values as whole multiples of ``2**-8`` and the rest in whole multiples of
    ``TOTAL_UNIT`` (int64 each): exact for every float32 of at least ``2**-16``."""
    scaled = values.double() * 2.0**8
    high = scaled.floor()
    return _carried(high.long(), ((scaled - high) * 2.0**_LOW_BITS).round().long())


def _carried(high: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed-point sum with the whole multiples of ``2**-8`` that ``low`` holds carried into ``high``."""
    return high + (low >> _LOW_BITS), low & (2**_LOW_BITS - 1)

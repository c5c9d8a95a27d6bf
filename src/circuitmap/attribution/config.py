"""The settings of one attribution graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError


@dataclass(frozen=True)
class AttributionConfig(Settings):
    """What ``attribute`` explains and how it batches the work."""

    max_n_logits: int = 10
    """Most salient logits explained when no targets are given."""
    desired_logit_prob: float = 0.95
    """Salient logits are taken, most likely first, until their probabilities add up to this, in (0, 1]."""
    max_feature_nodes: int | None = None
    """Cap on feature nodes; the least influential beyond it fold into error nodes (unset: no cap)."""
    batch_size: int | None = None
    """Rows per backward pass (unset: as many as about 4 GiB of gradients hold, at most 512)."""

    def check(self) -> None:
        """A one-line error for a setting out of range."""
        if self.max_n_logits < 1:
            raise CircuitmapError(f"max_n_logits must be at least 1, got {self.max_n_logits}")
        if not (math.isfinite(self.desired_logit_prob) and 0 < self.desired_logit_prob <= 1):
            raise CircuitmapError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise CircuitmapError("max_feature_nodes must be zero or more")
        if self.batch_size is not None and self.batch_size < 1:
            raise CircuitmapError("batch_size must be at least 1")

"""The settings of one attribution graph."""

from __future__ import annotations

from dataclasses import dataclass

from circuitmap.config import Settings
from circuitmap.validation import check_number


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
    """Rows per selection step and progress step, each one or more backward passes (unset: up to 512)."""

    def check(self) -> None:
        """A one-line error for a setting out of range."""
        check_number("max_n_logits", self.max_n_logits, low=1, whole=True)
        check_number("desired_logit_prob", self.desired_logit_prob, low=0, high=1, low_open=True)
        if self.max_feature_nodes is not None:
            check_number("max_feature_nodes", self.max_feature_nodes, low=0, whole=True)
        if self.batch_size is not None:
            check_number("batch_size", self.batch_size, low=1, whole=True)

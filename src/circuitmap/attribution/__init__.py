"""Attribution: the graph of direct effects that explains one prediction on the local replacement model."""

from circuitmap.attribution.compute import attribute
from circuitmap.attribution.config import AttributionConfig
from circuitmap.attribution.estimate import Estimate, available_memory, check_fits, estimate_attribution
from circuitmap.attribution.targets import Direction

__all__ = [
    "AttributionConfig",
    "Direction",
    "Estimate",
    "attribute",
    "available_memory",
    "check_fits",
    "estimate_attribution",
]

"""Attribution: the graph of direct effects that explains one prediction on the local replacement model."""

from circuitmap.attribution.compute import attribute
from circuitmap.attribution.config import AttributionConfig
from circuitmap.attribution.estimate import Estimate, available_memory, check_fits, estimate_attribution
from circuitmap.attribution.heads import HeadLoadings, head_loadings, top_cross_position_edges
from circuitmap.attribution.qk import HeadSite, QKAttribution, qk_attribution, salient_heads
from circuitmap.attribution.targets import Direction

__all__ = [
    "AttributionConfig",
    "Direction",
    "Estimate",
    "HeadLoadings",
    "HeadSite",
    "QKAttribution",
    "attribute",
    "available_memory",
    "check_fits",
    "estimate_attribution",
    "head_loadings",
    "qk_attribution",
    "salient_heads",
    "top_cross_position_edges",
]

"""Attribution: the graph of direct effects that explains one prediction on the local replacement model."""

from circuitmap.attribution.compute import attribute
from circuitmap.attribution.targets import Direction

__all__ = ["Direction", "attribute"]

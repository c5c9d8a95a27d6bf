"""What features mean: dashboards built from a corpus, stored in SQLite, labelled, and their logit lens."""

from circuitmap.features.build import BuildConfig, BuildReport, build_features
from circuitmap.features.logit_lens import Lens, add_logit_lens, logit_lens, output_directions
from circuitmap.features.store import (
    Example,
    FeatureDashboard,
    FeatureStore,
    Label,
    QuantileGroup,
    SearchHit,
)

__all__ = [
    "BuildConfig",
    "BuildReport",
    "Example",
    "FeatureDashboard",
    "FeatureStore",
    "Label",
    "Lens",
    "QuantileGroup",
    "SearchHit",
    "add_logit_lens",
    "build_features",
    "logit_lens",
    "output_directions",
]

"""What features mean: their logit lens (more evidence, such as dashboards, builds on this)."""

from circuitmap.features.logit_lens import Lens, add_logit_lens, feature_of, logit_lens, output_directions

__all__ = ["Lens", "add_logit_lens", "feature_of", "logit_lens", "output_directions"]

"""Model access: loading any supported causal LM and reading or patching its internals."""

from circuitmap.models.adapters import ADAPTERS, Adapter, supported_families
from circuitmap.models.loading import DEFAULT_MODEL, load_model
from circuitmap.models.model import Model

__all__ = ["ADAPTERS", "Adapter", "DEFAULT_MODEL", "Model", "load_model", "supported_families"]

"""Interventions: edit features or the residual stream, run or generate, and check a graph's claims."""

from circuitmap.interventions.edits import FeatureEdit, ResidualEdit, Supernode
from circuitmap.interventions.generate import generate_with
from circuitmap.interventions.intervene import InterventionResult, TokenChange, intervene

__all__ = [
    "FeatureEdit",
    "InterventionResult",
    "ResidualEdit",
    "Supernode",
    "TokenChange",
    "generate_with",
    "intervene",
]

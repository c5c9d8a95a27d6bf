"""Interventions: edit features or the residual stream, run or generate, and check a graph's claims."""

from circuitmap.interventions.apply import EditHandle, apply_edits, patch_edits
from circuitmap.interventions.check import CheckReport, CheckRow, check_graph
from circuitmap.interventions.edits import FeatureEdit, ResidualEdit, Supernode
from circuitmap.interventions.generate import generate_with
from circuitmap.interventions.intervene import InterventionResult, TokenChange, intervene

__all__ = [
    "CheckReport",
    "CheckRow",
    "EditHandle",
    "FeatureEdit",
    "InterventionResult",
    "ResidualEdit",
    "Supernode",
    "TokenChange",
    "apply_edits",
    "check_graph",
    "generate_with",
    "intervene",
    "patch_edits",
]

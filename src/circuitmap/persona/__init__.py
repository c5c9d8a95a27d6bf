"""Persona vectors (Chen et al. 2025): directions in the residual stream that carry a character trait.

A trait file (``traits``) gives pairs of system prompts that elicit a trait and its opposite, and questions.
The model answers every question under both kinds of prompt, a scorer (``scorers``) keeps the answers that
show the trait and those that do not, and the persona vector of a layer is the difference of the two sets'
mean residual activations over the answers' tokens (``extract``). A vector is saved with its provenance and
exported to llama.cpp's control vectors (``vectors``); it steers the model, measures how much a response
carries the trait (its projection), flags training samples that would push a model along it and measures
how far fine-tuning moved a model along it (``steer``). A steering sweep (``sweep``) chooses the layer, and
``features`` relates the vector to transcoder features.
"""

from circuitmap.persona.extract import ExtractConfig, PersonaExtraction, ScoredAnswer, extract_persona_vectors
from circuitmap.persona.features import AlignedFeature, aligned_features, feature_direction, persona_graph
from circuitmap.persona.runs import chat_ids
from circuitmap.persona.scorers import (
    SCORERS,
    EndpointJudge,
    Scorer,
    formality_score,
    french_score,
    get_scorer,
    register_scorer,
    sentiment_score,
)
from circuitmap.persona.steer import (
    Projection,
    SampleProjection,
    SteeringHandle,
    finetune_shift,
    project,
    projection_difference,
    rank_samples,
    steer,
    steering,
    typical_norm,
)
from circuitmap.persona.sweep import Sweep, SweepPoint, sweep_steering, typical_norms
from circuitmap.persona.traits import InstructionPair, ReferenceAnswer, Trait, load_trait, shipped_traits
from circuitmap.persona.vectors import (
    ControlVector,
    PersonaVector,
    export_control_vector,
    load_control_vector,
    load_persona_vector,
)

__all__ = [
    "SCORERS",
    "AlignedFeature",
    "ControlVector",
    "EndpointJudge",
    "ExtractConfig",
    "InstructionPair",
    "PersonaExtraction",
    "PersonaVector",
    "Projection",
    "ReferenceAnswer",
    "SampleProjection",
    "ScoredAnswer",
    "Scorer",
    "SteeringHandle",
    "Sweep",
    "SweepPoint",
    "Trait",
    "aligned_features",
    "chat_ids",
    "export_control_vector",
    "extract_persona_vectors",
    "feature_direction",
    "finetune_shift",
    "formality_score",
    "french_score",
    "get_scorer",
    "load_control_vector",
    "load_persona_vector",
    "load_trait",
    "persona_graph",
    "project",
    "projection_difference",
    "rank_samples",
    "register_scorer",
    "sentiment_score",
    "shipped_traits",
    "steer",
    "steering",
    "sweep_steering",
    "typical_norm",
    "typical_norms",
]

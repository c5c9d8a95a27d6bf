"""What an intervention changes: features (one, or a named group) and the residual stream.

A feature is named by its graph node id ``"{layer}_{index}_{position}"`` or by a ``(layer, position, index)``
tuple, whose position may be ``None`` for every position (generated ones included). A feature edit fixes the
feature's activation: ``set`` to a value, ``scale`` or ``add`` relative to the activation the feature has in
the edited run before the edit (in constrained mode, its clean activation). Resolution checks every edit
against the model and transcoders and turns it into plain ``(layer, index, position)`` records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError

OPERATIONS = ("set", "scale", "add")
_NODE_ID = re.compile(r"^(\d+)_(\d+)_(\d+)$")

FeatureRef = str | tuple[int, int | None, int]


@dataclass(frozen=True)
class Supernode:
    """A named group of features, edited together."""

    name: str
    features: tuple[FeatureRef, ...]

    def __init__(self, name: str, features: Sequence[FeatureRef]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "features", tuple(features))


@dataclass(frozen=True)
class FeatureEdit:
    """Set, scale or add to the activation of a feature or of every feature of a supernode."""

    target: FeatureRef | Supernode
    operation: str
    value: float

    @classmethod
    def set(cls, target: FeatureRef | Supernode, value: float) -> FeatureEdit:
        return cls(target, "set", value)

    @classmethod
    def scale(cls, target: FeatureRef | Supernode, factor: float) -> FeatureEdit:
        return cls(target, "scale", factor)

    @classmethod
    def add(cls, target: FeatureRef | Supernode, amount: float) -> FeatureEdit:
        return cls(target, "add", amount)

    @classmethod
    def ablate(cls, target: FeatureRef | Supernode) -> FeatureEdit:
        """Switch the feature (or group) off: scale by zero."""
        return cls(target, "scale", 0.0)

    def describe(self) -> str:
        name = self.target.name if isinstance(self.target, Supernode) else _ref_text(self.target)
        return f"{self.operation} {name} {self.value:g}"


@dataclass(frozen=True)
class ResidualEdit:
    """Add ``vector`` to the residual stream entering (``resid_pre``) or leaving (``resid_post``) ``layer``,
    at ``positions`` (None: every position, generated ones included)."""

    layer: int
    vector: torch.Tensor
    positions: tuple[int, ...] | None = None
    point: str = "resid_pre"

    def describe(self) -> str:
        where = "all positions" if self.positions is None else f"positions {list(self.positions)}"
        return f"add a vector of norm {float(self.vector.norm()):.3g} at {self.point} {self.layer}, {where}"


Edit = FeatureEdit | ResidualEdit


@dataclass(frozen=True)
class ResolvedFeatureEdit:
    """One feature edit after checks: ``position`` None means every position; ``by_node_id`` tells whether the
    user named the feature by a graph node id (which promises an active feature)."""

    layer: int
    index: int
    position: int | None
    operation: str
    value: float
    source: str
    by_node_id: bool

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if self.operation == "set":
            return torch.full_like(current, self.value)
        if self.operation == "scale":
            return current * self.value
        return current + self.value


def parse_feature(ref: FeatureRef) -> tuple[int, int | None, int]:
    """``(layer, position, index)`` of a node id or tuple; a clear error for anything else."""
    if isinstance(ref, str):
        match = _NODE_ID.match(ref.strip())
        if match is None:
            raise CircuitmapError(
                f"{ref!r} is not a feature node id: expected layer_index_position, e.g. 7_960_4"
            )
        layer, index, position = (int(group) for group in match.groups())
        return layer, position, index
    if isinstance(ref, tuple) and len(ref) == 3:
        layer, position, index = ref
        if all(isinstance(v, int) for v in (layer, index)) and (
            position is None or isinstance(position, int)
        ):
            return layer, position, index
    raise CircuitmapError(f"cannot read {ref!r} as a feature: give a node id or (layer, position, index)")


def _ref_text(ref: FeatureRef) -> str:
    if isinstance(ref, str):
        return ref
    layer, position, index = parse_feature(ref)
    return f"{layer}_{index}_{'all' if position is None else position}"


def resolve_feature_edits(
    edits: Sequence[Edit], n_layers: int, d_features: int, n_tokens: int
) -> list[ResolvedFeatureEdit]:
    """Expand supernodes and check every feature edit: operation, finite value, layer, index and position
    in range (negative positions count from the end of the prompt)."""
    resolved = []
    for edit in edits:
        if isinstance(edit, ResidualEdit):
            continue
        if not isinstance(edit, FeatureEdit):
            raise CircuitmapError(f"cannot apply {edit!r}: edits are FeatureEdit or ResidualEdit")
        if edit.operation not in OPERATIONS:
            raise CircuitmapError(f"unknown edit {edit.operation!r}; use one of {', '.join(OPERATIONS)}")
        if not isinstance(edit.value, (int, float)) or not math.isfinite(edit.value):
            raise CircuitmapError(f"the value of edit '{edit.describe()}' must be a finite number")
        members = edit.target.features if isinstance(edit.target, Supernode) else (edit.target,)
        if isinstance(edit.target, Supernode) and not members:
            raise CircuitmapError(f"supernode {edit.target.name!r} is empty")
        for member in members:
            layer, position, index = parse_feature(member)
            name = _ref_text(member)
            if not 0 <= layer < n_layers:
                raise CircuitmapError(f"feature {name}: layer {layer} is out of range (0..{n_layers - 1})")
            if not 0 <= index < d_features:
                raise CircuitmapError(
                    f"feature {name}: index {index} is out of range (the set has {d_features} per layer)"
                )
            if position is not None:
                if not -n_tokens <= position < n_tokens:
                    raise CircuitmapError(
                        f"feature {name}: position {position} is beyond the {n_tokens}-token prompt"
                    )
                position %= n_tokens
            resolved.append(
                ResolvedFeatureEdit(
                    layer, index, position, edit.operation, float(edit.value), name, isinstance(member, str)
                )
            )
    return resolved


def residual_edits(edits: Sequence[Edit], n_layers: int, d_model: int, n_tokens: int) -> list[ResidualEdit]:
    """The residual edits, checked: layer, point, vector width and finiteness, positions within the prompt
    (negative positions count from its end)."""
    checked = []
    for edit in edits:
        if not isinstance(edit, ResidualEdit):
            continue
        if edit.point not in ("resid_pre", "resid_post"):
            raise CircuitmapError(f"a residual edit acts on resid_pre or resid_post, not {edit.point!r}")
        if not 0 <= edit.layer < n_layers:
            raise CircuitmapError(f"residual edit: layer {edit.layer} is out of range (0..{n_layers - 1})")
        vector = torch.as_tensor(edit.vector).detach().reshape(-1)
        if vector.numel() != d_model:
            raise CircuitmapError(
                f"residual edit: the vector has {vector.numel()} entries; the model's width is {d_model}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise CircuitmapError("residual edit: the vector has NaN or infinite entries")
        positions = None
        if edit.positions is not None:
            positions = tuple(int(p) for p in edit.positions)
            bad = [p for p in positions if not -n_tokens <= p < n_tokens]
            if bad:
                raise CircuitmapError(
                    f"residual edit: position {bad[0]} is beyond the {n_tokens}-token prompt"
                )
            if not positions:
                raise CircuitmapError("residual edit: the list of positions is empty")
            positions = tuple(p % n_tokens for p in positions)
        checked.append(ResidualEdit(edit.layer, vector, positions, edit.point))
    return checked

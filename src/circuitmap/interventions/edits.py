"""What an intervention changes: features (one, or a named group) and the residual stream.

A feature is named by its graph node id ``"{layer}_{index}_{position}"`` (``*`` as the position: every
position) or by a ``(layer, position, index)`` tuple, whose position may be ``None`` for every position
(generated ones included). A feature edit fixes the
feature's activation: ``set`` to a value, ``scale`` or ``add`` relative to the activation the feature has in
the edited run before the edit (in constrained mode, its clean activation). Resolution checks every edit
against the model and transcoders and turns it into plain ``(layer, index, position)`` records.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import feature_id, index_by_id, is_feature_id, parse_feature_id

OPERATIONS = ("set", "scale", "add")

FeatureRef = str | tuple[int, int | None, int]


@dataclass(frozen=True)
class Supernode:
    """A named group of features, edited together."""

    name: str
    features: tuple[FeatureRef, ...]

    def __init__(self, name: str, features: Sequence[FeatureRef]):
        if isinstance(features, str):
            raise CircuitmapError(f"supernode {name!r}: give its features as a list, not one string")
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
        value = f"{self.value:g}" if isinstance(self.value, (int, float)) else repr(self.value)
        return f"{self.operation} {name} {value}"


@dataclass(frozen=True)
class ResidualEdit:
    """Add ``vector`` to the residual stream entering (``resid_pre``) or leaving (``resid_post``) ``layer``,
    at ``positions`` (None: every position, generated ones included)."""

    layer: int
    vector: torch.Tensor
    positions: tuple[int, ...] | None = None
    point: str = "resid_pre"

    def describe(self) -> str:
        positions = [self.positions] if isinstance(self.positions, int) else self.positions
        where = "all positions" if positions is None else f"positions {list(positions)}"
        norm = float(torch.as_tensor(self.vector, dtype=torch.float64).norm())
        return f"add a vector of norm {norm:.3g} at {self.point} {self.layer}, {where}"


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

    @property
    def needs_active(self) -> bool:
        """Whether the feature must be active at its position: a graph node id promises it, and scaling an
        inactive feature would do nothing."""
        return self.position is not None and (self.by_node_id or self.operation == "scale")

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if self.operation == "set":
            return torch.full_like(current, self.value)
        if self.operation == "scale":
            return current * self.value
        return current + self.value


def feature_supernodes(
    graph: Graph, saved: Sequence[tuple[str, Sequence[str]]]
) -> tuple[dict[str, Supernode], dict[str, int]]:
    """Supernodes saved with a graph (``GraphFolder.saved_supernodes``) as ``Supernode``s of their members
    that are feature nodes of ``graph`` (the explorer also groups error, token and logit nodes), by name;
    and, by name, how many members each left out. A group with no feature member is left out whole."""
    index_of = index_by_id(graph)
    groups, left_out = {}, {}
    for name, members in saved:
        features = [m for m in members if m in index_of and graph.kind[index_of[m]] == NodeKind.FEATURE]
        if len(features) < len(members):
            left_out[name] = len(members) - len(features)
        if features:
            groups[name] = Supernode(name, features)
    return groups, left_out


def parse_feature(ref: FeatureRef) -> tuple[int, int | None, int]:
    """``(layer, position, index)`` of a node id or tuple; a clear error for anything else."""
    if isinstance(ref, str):
        if not is_feature_id(ref):
            raise CircuitmapError(
                f"{ref!r} is not a feature node id: expected layer_index_position (e.g. 7_960_4), "
                "or layer_index_* for every position"
            )
        layer, index, position = parse_feature_id(ref)
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
    return feature_id(layer, index, position)


def _finite(edit: FeatureEdit) -> float:
    """The edit's value as a float: any real number (NumPy and 0-d tensors included) that is finite."""
    value = edit.value
    try:
        number = float(value) if not isinstance(value, (bool, str)) and value is not None else math.nan
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not math.isfinite(number):
        raise CircuitmapError(f"the value of edit '{edit.describe()}' must be a finite number")
    return number


def resolve_feature_edits(
    edits: Sequence[Edit], n_layers: int, d_features: int, n_tokens: int | None
) -> list[ResolvedFeatureEdit]:
    """Expand supernodes and check every feature edit: operation, finite value, layer, index and position
    in range (negative positions count from the end of the prompt; without a prompt, ``n_tokens`` None,
    positions must be absolute), no feature twice in one edit."""
    resolved = []
    for edit in edits:
        if isinstance(edit, ResidualEdit):
            continue
        if not isinstance(edit, FeatureEdit):
            raise CircuitmapError(f"cannot apply {edit!r}: edits are FeatureEdit or ResidualEdit")
        if edit.operation not in OPERATIONS:
            raise CircuitmapError(f"unknown edit {edit.operation!r}; use one of {', '.join(OPERATIONS)}")
        value = _finite(edit)
        members = edit.target.features if isinstance(edit.target, Supernode) else (edit.target,)
        if isinstance(edit.target, Supernode) and not members:
            raise CircuitmapError(f"supernode {edit.target.name!r} is empty")
        seen: dict[tuple[int, int], set[int | None]] = {}
        for member in members:
            layer, position, index = parse_feature(member)
            name = _ref_text(member)
            if layer == n_layers + 1:
                raise CircuitmapError(f"{name} is an output (logit) node id; only features can be edited")
            if not 0 <= layer < n_layers:
                raise CircuitmapError(f"feature {name}: layer {layer} is out of range (0..{n_layers - 1})")
            if not 0 <= index < d_features:
                raise CircuitmapError(
                    f"feature {name}: index {index} is out of range (the set has {d_features} per layer)"
                )
            if position is not None:
                position = _absolute(position, n_tokens, f"feature {name}")
            positions = seen.setdefault((layer, index), set())
            if position in positions or None in positions or (position is None and positions):
                raise CircuitmapError(f"edit '{edit.describe()}' names feature {name} twice")
            positions.add(position)
            by_node_id = isinstance(member, str) and position is not None
            resolved.append(
                ResolvedFeatureEdit(layer, index, position, edit.operation, value, name, by_node_id)
            )
    return resolved


def residual_edits(
    edits: Sequence[Edit], n_layers: int, d_model: int, n_tokens: int | None
) -> list[ResidualEdit]:
    """The residual edits, checked: layer, point, vector width and finiteness, positions within the prompt
    (negative positions count from its end; without a prompt, ``n_tokens`` None, they must be absolute)."""
    checked = []
    for edit in edits:
        if not isinstance(edit, ResidualEdit):
            continue
        if edit.point not in ("resid_pre", "resid_post"):
            raise CircuitmapError(f"a residual edit acts on resid_pre or resid_post, not {edit.point!r}")
        if not 0 <= edit.layer < n_layers:
            raise CircuitmapError(f"residual edit: layer {edit.layer} is out of range (0..{n_layers - 1})")
        try:
            vector = torch.as_tensor(edit.vector).detach().reshape(-1).to(torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise CircuitmapError("residual edit: the vector must be a tensor or a list of numbers") from None
        if vector.numel() != d_model:
            raise CircuitmapError(
                f"residual edit: the vector has {vector.numel()} entries; the model's width is {d_model}"
            )
        if not bool(torch.isfinite(vector).all()):
            raise CircuitmapError("residual edit: the vector has NaN or infinite entries")
        positions = None
        if edit.positions is not None:
            given = (edit.positions,) if isinstance(edit.positions, int) else edit.positions
            try:
                positions = tuple(operator.index(p) for p in given)
            except TypeError:
                raise CircuitmapError(
                    "residual edit: positions are None (every position) or integers"
                ) from None
            if not positions:
                raise CircuitmapError("residual edit: the list of positions is empty")
            positions = tuple(_absolute(p, n_tokens, "residual edit") for p in positions)
        checked.append(ResidualEdit(edit.layer, vector, positions, edit.point))
    return checked


def _absolute(position: int, n_tokens: int | None, what: str) -> int:
    """A position within the prompt as a non-negative index (negative ones count from the prompt's end)."""
    if n_tokens is None:
        if position < 0:
            raise CircuitmapError(
                f"{what}: position {position} counts from the end of a prompt; give the prompt"
            )
        return position
    if not -n_tokens <= position < n_tokens:
        raise CircuitmapError(f"{what}: position {position} is beyond the {n_tokens}-token prompt")
    return position % n_tokens

"""Two graphs side by side: which features and supernodes both use, what appears or disappears, and how the
influence of each shared node changes from graph A to graph B.

1. **Influence.** Every node of each graph gets its influence on that graph's targets,
   ``pruning.node_influence`` on the full graph (``graph.safetensors``): the part of the targets' weight that
   flows through the node. The targets' weights sum to one in every graph, so influences of two graphs are
   on one scale.
2. **Kept features.** Only the feature nodes kept in each graph's viewer document (``graph.json``) take
   part: those pruning kept, and any the user pinned or grouped.
3. **Matching features.** A feature is keyed by (layer, feature index, position counted from the end of the
   prompt: 0 for the last token), so prompts of different lengths align on their last tokens. In "The
   capital of France is" and "The capital of Germany is" the features on " is" match, and so do those on
   " France" and " Germany". A key kept in both graphs is shared, with change = influence in B − influence
   in A; the others are only in A (they disappear in B) or only in B (they appear in B).
4. **Matching supernodes.** A saved supernode (``qParams.supernodes``) stands for the keys of its kept
   feature members; its other members (error nodes, tokens) are left out. Every pair of a supernode of A and
   one of B with at least one key in common is scored by the Jaccard overlap of their keys (common keys over
   the keys of either); pairs are taken greedily, best overlap first (ties: more common keys, then the
   supernodes' saved order), each supernode at most once. The supernodes left over are unmatched. A
   supernode's influence is the sum of its members' influences in its own graph.
5. **Order.** Shared features and matched supernodes come most influential first (the larger of the two
   influences), the others by their influence in their graph; ties by key (features) or in the saved order
   of A, then B (supernodes).

Both graphs must come from one model and one transcoder set (the documents' ``model`` and ``transcoders``,
and the transcoder fingerprint when both record one): a feature index of another set names another feature.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from circuitmap.errors import CircuitmapError
from circuitmap.graphs.export import FEATURE_TYPES
from circuitmap.graphs.folder import DOCUMENT_FILE, GRAPH_FILE, GraphFolder, document_supernodes
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.graphs.pruning import node_influence

FeatureKey = tuple[int, int, int]
"""(layer, feature index, position counted from the end of the prompt: 0 for the last token)."""
_FEATURE_TYPE = FEATURE_TYPES[NodeKind.FEATURE]
_LABEL_WIDTH = 40
_NAME_WIDTH = 28


@dataclass(frozen=True)
class LoadedGraph:
    """One graph to compare: its name, full graph and viewer document."""

    name: str
    graph: Graph
    document: dict

    @classmethod
    def read(cls, folder: str | Path | GraphFolder) -> LoadedGraph:
        """Read a graph folder (named by its path); a one-line error when there is none at ``folder`` or
        it lacks its document or its full graph."""
        folder = folder if isinstance(folder, GraphFolder) else GraphFolder(folder)
        if not folder.path.exists():
            raise CircuitmapError(f"no graph folder at {folder.path}")
        if not folder.path.is_dir():
            raise CircuitmapError(f"{folder.path} is not a graph folder (give the folder, not a file in it)")
        missing = [
            name
            for name, there in ((DOCUMENT_FILE, folder.has_document()), (GRAPH_FILE, folder.has_graph()))
            if not there
        ]
        if missing:
            raise CircuitmapError(
                f"{folder.path} is not a graph folder: it has no {' and no '.join(missing)} "
                "(`circuitmap attribute --out` writes both)"
            )
        return cls(str(folder.path), folder.read_graph(), folder.read_document())


@dataclass(frozen=True)
class GraphSide:
    """What a comparison shows of one of its graphs."""

    name: str
    prompt: str
    tokens: list[str]
    top_target: str | None
    """The target with the largest weight (None for a graph without targets)."""
    top_target_probability: float | None
    """Its probability (None where it has none, e.g. a logit difference)."""
    n_features: int
    """Feature nodes kept in the graph's document."""


@dataclass(frozen=True)
class ComparedFeature:
    """A feature kept in A, in B, or in both; the fields of a graph it is absent from are None."""

    layer: int
    feature: int
    from_end: int
    """Its position counted from the end of the prompt (0: the last token)."""
    label: str
    """Its label in A, else in B ("" when neither has one)."""
    node_a: str | None
    node_b: str | None
    token_a: str | None
    token_b: str | None
    influence_a: float | None
    influence_b: float | None

    @property
    def change(self) -> float | None:
        """Influence in B − influence in A, for a shared feature."""
        return _change(self.influence_a, self.influence_b)

    def as_json(self) -> dict:
        return {**asdict(self), "change": self.change}


@dataclass(frozen=True)
class ComparedSupernode:
    """A supernode of A matched with one of B, or one left unmatched (the other side None)."""

    name_a: str | None
    name_b: str | None
    members_a: list[str]
    """Node ids of its kept feature members in A (empty for a supernode only in B)."""
    members_b: list[str]
    common_members: int
    """Members with the same key in both."""
    overlap: float
    """Jaccard overlap of the two member key sets (0 when unmatched)."""
    influence_a: float | None
    influence_b: float | None

    @property
    def change(self) -> float | None:
        """Influence in B − influence in A, for a matched pair."""
        return _change(self.influence_a, self.influence_b)

    def as_json(self) -> dict:
        return {**asdict(self), "change": self.change}


@dataclass
class GraphComparison:
    """Two graphs compared (see the module docstring)."""

    a: GraphSide
    b: GraphSide
    model: str | None
    transcoders: str | None
    shared_features: list[ComparedFeature]
    features_only_in_a: list[ComparedFeature]
    features_only_in_b: list[ComparedFeature]
    matched_supernodes: list[ComparedSupernode]
    supernodes_only_in_a: list[ComparedSupernode]
    supernodes_only_in_b: list[ComparedSupernode]

    def as_json(self) -> dict:
        """The whole comparison as strict JSON values (an unknown number is null)."""
        return {
            "a": asdict(self.a),
            "b": asdict(self.b),
            "model": self.model,
            "transcoders": self.transcoders,
            "features": {
                "shared": [feature.as_json() for feature in self.shared_features],
                "only_in_a": [feature.as_json() for feature in self.features_only_in_a],
                "only_in_b": [feature.as_json() for feature in self.features_only_in_b],
            },
            "supernodes": {
                "matched": [group.as_json() for group in self.matched_supernodes],
                "only_in_a": [group.as_json() for group in self.supernodes_only_in_a],
                "only_in_b": [group.as_json() for group in self.supernodes_only_in_b],
            },
        }

    def table(self, top: int = 10) -> str:
        """A plain-text report: both graphs, then the supernodes and the features, at most ``top`` rows of
        each list."""
        lines = [
            f"A  {_side_line(self.a)}",
            f"B  {_side_line(self.b)}",
            "influence: on each graph's targets; change = B - A; features are layer/index at a position "
            "counted from the end (0: the last token)",
            "",
            f"supernodes: {len(self.matched_supernodes)} matched, "
            f"{len(self.supernodes_only_in_a)} only in A, {len(self.supernodes_only_in_b)} only in B",
        ]
        groups = [*self.matched_supernodes, *self.supernodes_only_in_a, *self.supernodes_only_in_b]
        if groups:
            lines.append(
                f"  {'in A':<{_NAME_WIDTH}} {'in B':<{_NAME_WIDTH}} {'common':>9} {'infl A':>8} "
                f"{'infl B':>8} {'change':>8}"
            )
            for part in (self.matched_supernodes, self.supernodes_only_in_a, self.supernodes_only_in_b):
                lines += _limited([_supernode_row(group) for group in part], top)
        lines += [
            "",
            f"features: {len(self.shared_features)} shared, {len(self.features_only_in_a)} only in A, "
            f"{len(self.features_only_in_b)} only in B",
        ]
        sections = (
            ("shared, most influential first", self.shared_features),
            ("only in A (gone in B)", self.features_only_in_a),
            ("only in B (new in B)", self.features_only_in_b),
        )
        for title, features in sections:
            if not features:
                continue
            lines += [
                f"{title}:",
                f"  {'feature':<12} {'end':>3} {'token in A':<16} {'token in B':<16} {'infl A':>8} "
                f"{'infl B':>8} {'change':>8}  label",
            ]
            lines += _limited([_feature_row(feature) for feature in features], top)
        return "\n".join(lines)


def compare_graphs(a: str | Path | GraphFolder, b: str | Path | GraphFolder) -> GraphComparison:
    """Compare the graph folders ``a`` and ``b`` (see the module docstring); each needs its viewer document
    and its full graph."""
    return compare_loaded(LoadedGraph.read(a), LoadedGraph.read(b))


def compare_loaded(a: LoadedGraph, b: LoadedGraph) -> GraphComparison:
    """Compare two graphs already read (see the module docstring)."""
    model, transcoders = _same_set(a, b)
    kept_a, kept_b = _kept_features(a), _kept_features(b)
    shared = [_feature(key, kept_a[key], kept_b[key], a, b) for key in kept_a.keys() & kept_b.keys()]
    only_a = [_feature(key, kept_a[key], None, a, b) for key in kept_a.keys() - kept_b.keys()]
    only_b = [_feature(key, None, kept_b[key], a, b) for key in kept_b.keys() - kept_a.keys()]
    groups_a, groups_b = _supernodes(a, kept_a), _supernodes(b, kept_b)
    pairs = _greedy_pairs(groups_a, groups_b)
    matched = [_matched(groups_a[i], groups_b[j]) for i, j in sorted(pairs)]
    paired_a, paired_b = {i for i, _ in pairs}, {j for _, j in pairs}
    return GraphComparison(
        a=_side(a, len(kept_a)),
        b=_side(b, len(kept_b)),
        model=model,
        transcoders=transcoders,
        shared_features=sorted(shared, key=_feature_order),
        features_only_in_a=sorted(only_a, key=_feature_order),
        features_only_in_b=sorted(only_b, key=_feature_order),
        matched_supernodes=sorted(matched, key=_supernode_order),
        supernodes_only_in_a=sorted(
            (_unmatched(group, None) for i, group in enumerate(groups_a) if i not in paired_a),
            key=_supernode_order,
        ),
        supernodes_only_in_b=sorted(
            (_unmatched(None, group) for j, group in enumerate(groups_b) if j not in paired_b),
            key=_supernode_order,
        ),
    )


@dataclass(frozen=True)
class _KeptFeature:
    """A feature node kept in a graph's document."""

    node_id: str
    position: int
    label: str
    influence: float


@dataclass(frozen=True)
class _Supernode:
    """A saved supernode as the keys of its kept feature members, with their summed influence."""

    name: str
    members: dict[FeatureKey, str]
    """Node id of each member, by key, most influential first."""
    influence: float


def _same_set(a: LoadedGraph, b: LoadedGraph) -> tuple[str | None, str | None]:
    """The model and transcoder set both graphs come from; a one-line error when they differ."""
    metadata_a, metadata_b = _metadata(a), _metadata(b)
    for field, what in (("model", "models"), ("transcoders", "transcoder sets")):
        if metadata_a.get(field) != metadata_b.get(field):
            raise CircuitmapError(
                f"{a.name} and {b.name} come from different {what} ({metadata_a.get(field)!r} and "
                f"{metadata_b.get(field)!r}): only graphs of one model and transcoder set can be compared"
            )
    fingerprints = [graph.graph.info.get("transcoders_fingerprint") for graph in (a, b)]
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise CircuitmapError(
            f"{a.name} and {b.name} were computed with different transcoder sets (their fingerprints "
            "differ): only graphs of one transcoder set can be compared"
        )
    return metadata_a.get("model"), metadata_a.get("transcoders")


def _metadata(loaded: LoadedGraph) -> dict:
    metadata = loaded.document.get("metadata")
    if not isinstance(metadata, dict):
        raise CircuitmapError(f"{loaded.name}: its {DOCUMENT_FILE} is not a viewer document (no metadata)")
    return metadata


def _kept_features(loaded: LoadedGraph) -> dict[FeatureKey, _KeptFeature]:
    """The feature nodes kept in the document, by key, with their influence in the full graph."""
    graph = loaded.graph
    nodes = loaded.document.get("nodes")
    if not isinstance(nodes, list) or not all(
        isinstance(node, dict) and isinstance(node.get("node_id"), str) for node in nodes
    ):
        raise CircuitmapError(f"{loaded.name}: its {DOCUMENT_FILE} is not a viewer document (bad nodes)")
    features = graph.nodes_of(NodeKind.FEATURE)
    node_of = {
        (layer, index, position): node
        for node, layer, index, position in zip(
            features.tolist(),
            graph.layer[features].tolist(),
            graph.index[features].tolist(),
            graph.position[features].tolist(),
            strict=True,
        )
    }
    influence = node_influence(graph)
    last = len(graph.tokens) - 1
    kept = {}
    for node in nodes:
        if node.get("feature_type") != _FEATURE_TYPE:
            continue
        layer, index, position = parse_feature_id(node["node_id"])
        found = node_of.get((layer, index, position))
        if found is None:
            raise CircuitmapError(
                f"{loaded.name}: feature {node['node_id']} of its {DOCUMENT_FILE} is not in its "
                f"{GRAPH_FILE}: the two files come from different graphs"
            )
        label = node.get("clerp") if isinstance(node.get("clerp"), str) else ""
        kept[(layer, index, last - position)] = _KeptFeature(
            node["node_id"], position, label, float(influence[found])
        )
    return kept


def _feature(
    key: FeatureKey, in_a: _KeptFeature | None, in_b: _KeptFeature | None, a: LoadedGraph, b: LoadedGraph
) -> ComparedFeature:
    layer, index, from_end = key
    return ComparedFeature(
        layer=layer,
        feature=index,
        from_end=from_end,
        label=(in_a.label if in_a else "") or (in_b.label if in_b else ""),
        node_a=in_a.node_id if in_a else None,
        node_b=in_b.node_id if in_b else None,
        token_a=a.graph.token_strings[in_a.position] if in_a else None,
        token_b=b.graph.token_strings[in_b.position] if in_b else None,
        influence_a=in_a.influence if in_a else None,
        influence_b=in_b.influence if in_b else None,
    )


def _supernodes(loaded: LoadedGraph, kept: dict[FeatureKey, _KeptFeature]) -> list[_Supernode]:
    """The document's saved supernodes, each as the keys of its kept feature members."""
    key_of = {feature.node_id: key for key, feature in kept.items()}
    groups = []
    for name, members in document_supernodes(loaded.document):
        keys = dict.fromkeys(key_of[member] for member in members if member in key_of)
        ranked = sorted(keys, key=lambda key: -kept[key].influence)
        groups.append(
            _Supernode(
                name=name,
                members={key: kept[key].node_id for key in ranked},
                influence=sum(kept[key].influence for key in ranked),
            )
        )
    return groups


def _greedy_pairs(groups_a: list[_Supernode], groups_b: list[_Supernode]) -> list[tuple[int, int]]:
    """Pairs (index in A, index in B) of supernodes with common keys, best Jaccard overlap first, each
    supernode in at most one pair."""
    candidates = []
    for i, group_a in enumerate(groups_a):
        for j, group_b in enumerate(groups_b):
            common = len(group_a.members.keys() & group_b.members.keys())
            if common:
                either = len(group_a.members.keys() | group_b.members.keys())
                candidates.append((-common / either, -common, i, j))
    taken_a, taken_b, pairs = set(), set(), []
    for _, _, i, j in sorted(candidates):
        if i not in taken_a and j not in taken_b:
            taken_a.add(i)
            taken_b.add(j)
            pairs.append((i, j))
    return pairs


def _matched(group_a: _Supernode, group_b: _Supernode) -> ComparedSupernode:
    common = len(group_a.members.keys() & group_b.members.keys())
    return ComparedSupernode(
        name_a=group_a.name,
        name_b=group_b.name,
        members_a=list(group_a.members.values()),
        members_b=list(group_b.members.values()),
        common_members=common,
        overlap=common / len(group_a.members.keys() | group_b.members.keys()),
        influence_a=group_a.influence,
        influence_b=group_b.influence,
    )


def _unmatched(group_a: _Supernode | None, group_b: _Supernode | None) -> ComparedSupernode:
    return ComparedSupernode(
        name_a=group_a.name if group_a else None,
        name_b=group_b.name if group_b else None,
        members_a=list(group_a.members.values()) if group_a else [],
        members_b=list(group_b.members.values()) if group_b else [],
        common_members=0,
        overlap=0.0,
        influence_a=group_a.influence if group_a else None,
        influence_b=group_b.influence if group_b else None,
    )


def _side(loaded: LoadedGraph, n_features: int) -> GraphSide:
    graph = loaded.graph
    targets = graph.nodes_of(NodeKind.TARGET)
    top_target = probability = None
    if len(targets):
        ordinal = int(np.argmax(graph.target_weight[targets]))
        top_target = graph.target_names[ordinal]
        value = float(graph.target_probs[ordinal])
        probability = value if math.isfinite(value) else None
    return GraphSide(
        name=loaded.name,
        prompt=graph.prompt,
        tokens=list(graph.token_strings),
        top_target=top_target,
        top_target_probability=probability,
        n_features=n_features,
    )


def _change(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _largest(first: float | None, second: float | None) -> float:
    return max(value for value in (first, second, 0.0) if value is not None)


def _feature_order(feature: ComparedFeature) -> tuple:
    return (
        -_largest(feature.influence_a, feature.influence_b),
        feature.layer,
        feature.feature,
        feature.from_end,
    )


def _supernode_order(group: ComparedSupernode) -> float:
    return -_largest(group.influence_a, group.influence_b)


def _side_line(side: GraphSide) -> str:
    target = "no target" if side.top_target is None else repr(side.top_target)
    if side.top_target_probability is not None:
        target += f" (p={side.top_target_probability:.3f})"
    return f"{side.name}: {side.prompt!r} -> {target}; {side.n_features} kept features"


def _limited(rows: list[str], top: int) -> list[str]:
    """The first ``top`` rows, and a line saying how many were left out."""
    return rows[:top] + ([f"  … and {len(rows) - top} more"] if len(rows) > top else [])


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _text(value: str | None, width: int) -> str:
    """A name or label cut to ``width`` characters ("-" for none)."""
    text = "-" if value is None else " ".join(value.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _supernode_row(group: ComparedSupernode) -> str:
    common = f"{group.common_members} ({group.overlap:.2f})" if group.common_members else "-"
    name_a, name_b = _text(group.name_a, _NAME_WIDTH), _text(group.name_b, _NAME_WIDTH)
    return (
        f"  {name_a:<{_NAME_WIDTH}} {name_b:<{_NAME_WIDTH}} "
        f"{common:>9} {_number(group.influence_a):>8} {_number(group.influence_b):>8} "
        f"{_number(group.change, signed=True):>8}"
    )


def _feature_row(feature: ComparedFeature) -> str:
    name = f"{feature.layer}/{feature.feature}"
    token_a = "-" if feature.token_a is None else _text(repr(feature.token_a), 16)
    token_b = "-" if feature.token_b is None else _text(repr(feature.token_b), 16)
    return (
        f"  {name:<12} {feature.from_end:>3} {token_a:<16} {token_b:<16} {_number(feature.influence_a):>8} "
        f"{_number(feature.influence_b):>8} {_number(feature.change, signed=True):>8}  "
        f"{_text(feature.label, _LABEL_WIDTH) if feature.label else ''}"
    ).rstrip()

"""Case studies: explain a prompt by its graph, choose groups of features by a stated rule, test them by
editing the model, and draw what was found.

These are the building blocks of the generated reports (``docs/interventions.md``, ``docs/biology.md``) and
of notebooks that walk through one case:

1. ``Study.explain`` computes a prompt's graph (at most ``max_feature_nodes`` features) and every node's
   influence on the targets;
2. ``Explained.top_features`` ranks the feature nodes of one position by influence: the usual rule for a
   supernode;
3. ``Study.transplant`` turns another prompt's group into edits (add its features at a chosen position, at a
   multiple of their activations there), so that ``swap`` can replace one concept by another;
4. ``draw_graph`` draws the core of a pruned graph with its supernodes coloured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from circuitmap.attribution import attribute
from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.features.logit_lens import logit_lens
from circuitmap.graphs import Graph, NodeKind, PruneResult, prune
from circuitmap.graphs.ids import parse_feature_id
from circuitmap.interventions import FeatureEdit, InterventionResult, Supernode
from circuitmap.interventions.apply import clean_run
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders

GROUP_SIZE = 20
"""Features in a group chosen by influence at one position, unless a study says otherwise."""
GROUP_COLOURS = ["#d35400", "#2471a3", "#1e8449", "#8e44ad", "#b7950b"]
"""Colours of the supernodes in ``draw_graph``, in the order of the groups."""


@dataclass
class Explained:
    """A prompt's graph, the influence of its nodes on the targets and the groups (supernodes) found in it."""

    prompt: str
    """The text the graph explains."""
    graph: Graph
    """Its attribution graph."""
    influence: np.ndarray
    """Each node's influence on the targets (``prune(graph).influence``)."""
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Named groups of feature node ids, filled by the study's rules."""

    def top_features(self, position: int, count: int = GROUP_SIZE) -> list[str]:
        """The ``count`` most influential feature nodes at ``position`` (negative counts from the end)."""
        graph = self.graph
        if position < 0:
            position += len(graph.tokens)
        features = graph.nodes_of(NodeKind.FEATURE)
        here = features[graph.position[features] == position]
        ranked = here[np.argsort(-self.influence[here], kind="stable")][:count]
        return [graph.node_id(int(node)) for node in ranked]

    def ranked_features(self, count: int) -> list[str]:
        """The ``count`` most influential feature nodes of the whole graph."""
        features = self.graph.nodes_of(NodeKind.FEATURE)
        ranked = features[np.argsort(-self.influence[features], kind="stable")][:count]
        return [self.graph.node_id(int(node)) for node in ranked]

    def influence_by_position(
        self, kinds: Iterable[NodeKind] = (NodeKind.FEATURE, NodeKind.ERROR)
    ) -> np.ndarray:
        """The summed influence of the nodes of ``kinds`` at each position of the prompt."""
        graph = self.graph
        chosen = np.isin(graph.kind, list(kinds))
        totals = np.zeros(len(graph.tokens))
        np.add.at(totals, graph.position[chosen], self.influence[chosen])
        return totals

    def supernode(self, name: str) -> Supernode:
        """The group ``name`` as a supernode for edits and checks."""
        return Supernode(name, self.groups[name])


@dataclass
class Study:
    """The model and transcoders a study runs on, and the feature database that labels their features."""

    model: Model
    """The model whose behaviour is studied."""
    transcoders: Transcoders
    """The transcoders that replace its MLPs in the graphs and the edits."""
    store: FeatureStore | None
    """Labels for the features, when the set's feature database exists."""
    max_feature_nodes: int = 4096
    """Each graph keeps this many features; the others are folded into error nodes."""
    _activations: dict[str, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def label(self, node_id: str) -> str:
        """The feature's label in the database, or an empty string."""
        if self.store is None:
            return ""
        layer, index, _ = parse_feature_id(node_id)
        label = self.store.label(layer, index)
        return label.text if label is not None else ""

    def explain(self, prompt: str, targets: Sequence[str] | None = None) -> Explained:
        """The graph of ``prompt`` (its salient logits, or the given target tokens) and its influences."""
        graph = attribute(
            self.model,
            self.transcoders,
            prompt,
            targets=targets,
            max_feature_nodes=self.max_feature_nodes,
            progress=False,
        )
        return Explained(prompt, graph, prune(graph).influence)

    def feature_activations(self, prompt: str) -> list[torch.Tensor]:
        """Every feature's activation at every position of ``prompt`` (one ``[T, d_features]`` tensor per
        layer), from one clean run; kept for the study's later questions about the same prompt."""
        if prompt not in self._activations:
            self._activations[prompt] = clean_run(self.model, self.transcoders, self.model.encode(prompt))[
                1
            ].acts
        return self._activations[prompt]

    def activations(self, prompt: str, position: int) -> dict[tuple[int, int], float]:
        """Every active feature's activation at ``position`` of ``prompt``, by (layer, index)."""
        found = {}
        for layer, acts in enumerate(self.feature_activations(prompt)):
            for index in acts[position].nonzero().flatten().tolist():
                found[(layer, index)] = float(acts[position, index])
        return found

    def transplant(self, donor: Explained, position: int, factor: float, at: int) -> list[FeatureEdit]:
        """Add the donor prompt's group at ``position`` (its most influential features there, ``factor`` ×
        their donor activations) at the position ``at`` of the prompt being edited."""
        return self.transplant_features(donor.prompt, donor.top_features(position), factor, at)

    def transplant_features(
        self, donor_prompt: str, node_ids: Sequence[str], factor: float, at: int | None = None
    ) -> list[FeatureEdit]:
        """Add the donor's features ``node_ids`` at ``factor`` × their activations in ``donor_prompt``, each
        at position ``at`` (or at the same distance from the end as in the donor, when ``at`` is None)."""
        n_donor = len(self.model.encode(donor_prompt)[0])
        by_position: dict[int, dict[tuple[int, int], float]] = {}
        edits = []
        for node_id in node_ids:
            layer, index, position = parse_feature_id(node_id)
            if position is None:
                raise CircuitmapError(f"feature {node_id} has no position to take its activation from")
            if position not in by_position:
                by_position[position] = self.activations(donor_prompt, position)
            where = at if at is not None else position - n_donor
            edits.append(
                FeatureEdit.add((layer, where, index), factor * by_position[position][(layer, index)])
            )
        return edits

    def token_id(self, token: str) -> int:
        """The id of ``token``, which must be a single token of the model's vocabulary."""
        ids = self.model.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise CircuitmapError(f"{token!r} is {len(ids)} tokens for this model, not one")
        return ids[0]

    def probability(self, result: InterventionResult, token: str, after: bool = True) -> float:
        """The next-token probability of ``token`` after (or before) the result's edits."""
        logits = result.logits_after if after else result.logits_before
        return float(logits.double().softmax(-1)[self.token_id(token)])

    def mass(self, result: InterventionResult, tokens: Iterable[str], after: bool = True) -> float:
        """The summed next-token probability of ``tokens`` after (or before) the result's edits."""
        logits = result.logits_after if after else result.logits_before
        probs = logits.double().softmax(-1)
        return float(sum(probs[self.token_id(token)] for token in set(tokens)))

    def promotes(self, node_ids: Sequence[str], tokens: Iterable[str], k: int = 10) -> list[str]:
        """The features among ``node_ids`` whose logit lens has one of ``tokens`` among its ``k`` most
        promoted output tokens, in the order given."""
        wanted = set(tokens)
        keys = [parse_feature_id(node_id)[:2] for node_id in node_ids]
        lenses = logit_lens(self.model, self.transcoders, keys, k=k)
        return [
            node_id
            for node_id, lens in zip(node_ids, lenses, strict=True)
            if wanted & {token for token, _ in lens.top}
        ]


def quote(text: str) -> str:
    """``text`` in curly quotes for a Markdown table cell: line breaks shown as ⏎, pipes escaped."""
    return "“" + text.replace("\n", "⏎").replace("|", "\\|") + "”"


def swap(group: Supernode, transplanted: list[FeatureEdit]) -> list[FeatureEdit]:
    """Replace a group by another prompt's: the group × −1, the other group added (see ``transplant``)."""
    return [FeatureEdit.scale(group, -1.0), *transplanted]


def describe_transcoders(transcoders: Transcoders, quick: bool) -> str:
    """The set in words: kind, width, activation, and whether it is the project's quick set."""
    kind = "cross-layer" if transcoders.kind == "clt" else "per-layer"
    activation = {"topk": "TopK", "jumprelu": "JumpReLU", "relu": "ReLU"}[transcoders.activation_name]
    if transcoders.k is not None:
        activation += f" (k = {transcoders.k})"
    origin = "the project's quick set (`make demo` trains it), " if quick else ""
    return f"{origin}{kind} {activation}, {transcoders.d_features:,} features per layer"


def draw_graph(
    graph: Graph, pruned: PruneResult, groups: dict[str, list[str]], path: Path, shown: int = 60
) -> None:
    """Save a drawing of the core of the pruned graph: its ``shown`` most influential features and error
    nodes, the supernode members, tokens and targets; tokens along x, layers up y, size by influence,
    supernodes coloured."""
    from matplotlib import pyplot as plt

    members = {member for group in groups.values() for member in group}
    candidates = np.flatnonzero(pruned.node_mask & np.isin(graph.kind, [NodeKind.FEATURE, NodeKind.ERROR]))
    top = candidates[np.argsort(-pruned.influence[candidates], kind="stable")][:shown]
    keep = set(top.tolist()) | {node for node in range(graph.n_nodes) if graph.node_id(node) in members}
    keep |= set(np.flatnonzero(np.isin(graph.kind, [NodeKind.TOKEN, NodeKind.TARGET])).tolist())
    keep = np.array(sorted(keep))
    kind = graph.kind[keep]
    layer = np.where(kind == NodeKind.TOKEN, -1, graph.layer[keep]).astype(float)
    x = graph.position[keep].astype(float)
    offset = np.zeros(len(keep))
    for cell in set(zip(x.tolist(), layer.tolist(), strict=True)):
        same = np.flatnonzero((x == cell[0]) & (layer == cell[1]))
        if len(same) > 1:
            offset[same] = np.linspace(-0.35, 0.35, len(same))
    xy = {int(node): (x[i] + offset[i], layer[i]) for i, node in enumerate(keep)}
    figure, axes = plt.subplots(figsize=(max(10, 0.45 * len(graph.tokens)), 6.5), dpi=110)
    live = pruned.edge_mask & np.isin(graph.indices, keep) & np.isin(graph.target_indices(), keep)
    rows, sources, weights = graph.target_indices()[live], graph.indices[live], graph.weights[live]
    strongest = np.argsort(-np.abs(weights))[:300]
    scale = float(np.abs(weights[strongest]).max()) if len(strongest) else 1.0
    for edge in strongest:
        (x0, y0), (x1, y1) = xy[int(sources[edge])], xy[int(rows[edge])]
        colour = "#c0392b" if weights[edge] > 0 else "#2e86c1"
        alpha = min(0.7, 0.08 + abs(float(weights[edge])) / scale)
        axes.plot([x0, x1], [y0, y1], color=colour, alpha=alpha, lw=0.7, zorder=1)
    colour_of = {}
    for number, group in enumerate(groups.values()):
        for member in group:
            colour_of[member] = GROUP_COLOURS[number % len(GROUP_COLOURS)]
    influence = pruned.influence[keep]
    sizes = 10 + 300 * influence / max(float(influence[kind != NodeKind.TARGET].max()), 1e-12)
    sizes = np.where(kind == NodeKind.TARGET, 60, sizes)
    colours = [
        "#34495e" if graph.kind[n] == NodeKind.TARGET else colour_of.get(graph.node_id(int(n)), "#95a5a6")
        for n in keep
    ]
    markers = np.where(kind == NodeKind.ERROR, "s", "o")
    for marker in ("o", "s"):
        chosen = markers == marker
        axes.scatter(
            [xy[int(n)][0] for n in keep[chosen]],
            [xy[int(n)][1] for n in keep[chosen]],
            s=sizes[chosen],
            c=[c for c, m in zip(colours, chosen, strict=True) if m],
            marker=marker,
            zorder=3,
        )
    targets = graph.nodes_of(NodeKind.TARGET)
    for number, node in enumerate(targets[:5]):
        axes.annotate(
            repr(graph.target_names[number])[1:-1],
            xy[int(node)],
            fontsize=7,
            xytext=(4, 3 + 8 * number),
            textcoords="offset points",
        )
    axes.set_xticks(range(len(graph.tokens)), [repr(t)[1:-1] for t in graph.token_strings], rotation=40)
    axes.set_ylabel("layer (tokens at −1, logits at the top)")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=GROUP_COLOURS[i % len(GROUP_COLOURS)])
        for i in range(len(groups))
    ]
    handles.append(plt.Line2D([], [], marker="s", ls="", color="#95a5a6"))
    axes.legend(handles, [*groups, "error node"], loc="upper left", fontsize=8)
    title = graph.prompt if len(graph.prompt) <= 70 else "…" + graph.prompt[-69:]
    axes.set_title(
        f"{title!r}: the {shown} most influential nodes of the pruned graph, the supernodes, "
        "tokens and logits\nedges: the strongest among them (red excites, blue inhibits)",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

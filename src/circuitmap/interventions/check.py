"""``check_graph``: test what a graph claims against the real model, one ablation at a time.

For the graph's most influential features (and any named supernodes), the graph predicts the effect of
ablating each on a target's de-meaned logit: the node's edges carry ``activation × direct effect``, and a
change ``Δa`` of a node propagates through every path to the target, each feature passing on its change of
pre-activation as a change of activation (the linearisation the graph itself makes). The real model is then
run open loop with the node ablated, and the observed change of the same de-meaned logit is compared with the
prediction: sign agreement and Spearman rank correlation over the nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError
from circuitmap.graphs.graph import Graph, NodeKind
from circuitmap.graphs.ids import index_by_id
from circuitmap.graphs.pruning import node_influence
from circuitmap.interventions.apply import clean_run
from circuitmap.interventions.edits import FeatureEdit, Supernode
from circuitmap.interventions.intervene import intervene
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders


@dataclass
class CheckRow:
    """One ablated node or supernode: what the graph predicts (all paths, and the direct edge alone) for the
    target's de-meaned logit, and what the model does."""

    name: str
    kind: str
    members: list[str]
    influence: float
    predicted: float
    direct: float
    observed: float


@dataclass
class CheckReport:
    """The rows of a check and their agreement."""

    prompt: str
    target: str
    rows: list[CheckRow]
    transcoders_fingerprint: str | None = None

    @property
    def sign_agreement(self) -> float:
        """Share of rows whose predicted and observed effects have the same sign."""
        if not self.rows:
            return float("nan")
        return float(np.mean([np.sign(r.predicted) == np.sign(r.observed) for r in self.rows]))

    @property
    def rank_correlation(self) -> float:
        """Spearman correlation of predicted and observed effects (NaN with fewer than 3 rows)."""
        if len(self.rows) < 3:
            return float("nan")
        predicted = _ranks(np.array([r.predicted for r in self.rows]))
        observed = _ranks(np.array([r.observed for r in self.rows]))
        if predicted.std() == 0 or observed.std() == 0:
            return float("nan")
        return float(np.corrcoef(predicted, observed)[0, 1])

    def table(self) -> str:
        """A plain-text table, one row per ablation, then the agreement."""
        lines = [
            f"prompt: {self.prompt!r}; target: {self.target!r}; effect of ablating each node on its logit",
            f"{'node':<24} {'kind':<9} {'influence':>9} {'predicted':>10} {'direct':>9} "
            f"{'observed':>9}  sign",
        ]
        for r in self.rows:
            sign = "ok" if np.sign(r.predicted) == np.sign(r.observed) else "WRONG"
            lines.append(
                f"{r.name[:24]:<24} {r.kind:<9} {r.influence:>9.4f} {r.predicted:>10.3f} {r.direct:>9.3f} "
                f"{r.observed:>9.3f}  {sign}"
            )
        lines.append(
            f"sign agreement {self.sign_agreement:.2f} ({len(self.rows)} nodes), "
            f"rank correlation {self.rank_correlation:.2f}"
        )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """In a notebook: the rows and the agreement as an HTML table."""
        from circuitmap.notebook import check_html

        return check_html(self)

    def as_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "transcoders_fingerprint": self.transcoders_fingerprint,
            "sign_agreement": _finite_or_none(self.sign_agreement),
            "rank_correlation": _finite_or_none(self.rank_correlation),
            "rows": [vars(row) for row in self.rows],
        }

    def save_plot(self, path: str | Path) -> Path:
        """A PNG scatter of observed against predicted effects, one labelled point per node."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        path = Path(path)
        figure, axes = plt.subplots(figsize=(6.4, 5.2), dpi=120)
        predicted = np.array([r.predicted for r in self.rows])
        observed = np.array([r.observed for r in self.rows])
        colours = ["#c0392b" if r.kind == "supernode" else "#2c6fbb" for r in self.rows]
        axes.scatter(predicted, observed, c=colours, s=28, zorder=3)
        for r in self.rows:
            axes.annotate(
                r.name, (r.predicted, r.observed), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        low = float(min(predicted.min(initial=0), observed.min(initial=0)))
        high = float(max(predicted.max(initial=0), observed.max(initial=0)))
        axes.plot([low, high], [low, high], color="#999999", linewidth=0.8, linestyle="--", zorder=1)
        axes.axhline(0, color="#cccccc", linewidth=0.6, zorder=0)
        axes.axvline(0, color="#cccccc", linewidth=0.6, zorder=0)
        axes.set_xlabel("predicted by the graph (Δ de-meaned logit)")
        axes.set_ylabel("observed on the model (Δ de-meaned logit)")
        axes.set_title(
            f"{self.prompt[:48]!r} → {self.target!r}\nsign agreement {self.sign_agreement:.2f}, "
            f"rank correlation {self.rank_correlation:.2f}",
            fontsize=9,
        )
        figure.tight_layout()
        try:
            atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
        finally:
            plt.close(figure)
        return path


def _finite_or_none(value: float) -> float | None:
    """A statistic as JSON can hold it: undefined (NaN) becomes null."""
    return value if math.isfinite(value) else None


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's correlation)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


class GraphEffects:
    """The graph's linear prediction of what changing some feature nodes does to every row."""

    def __init__(self, graph: Graph):
        self.graph = graph
        order = np.argsort(graph.indices, kind="stable")
        self.rows = graph.target_indices()[order]
        self.weights = graph.weights[order].astype(np.float64)
        self.starts = np.searchsorted(graph.indices[order], np.arange(graph.n_nodes + 1))
        self.features = [int(node) for node in graph.nodes_of(NodeKind.FEATURE)]

    def __call__(self, pinned: Sequence[int], deltas: Sequence[float]) -> np.ndarray:
        """Change of every row's value (feature pre-activations, target values) when the ``pinned`` feature
        nodes' activations change by ``deltas`` and every other feature passes its pre-activation change on
        as an activation change; error and token nodes stay fixed. Graph order is topological (a row's
        sources are in lower layers), so one pass in that order is exact for the linear model."""
        change = np.zeros(self.graph.n_nodes)
        fixed = dict(zip((int(n) for n in pinned), (float(d) for d in deltas), strict=True))
        for node in self.features:
            delta = fixed.get(node, change[node])
            if delta == 0:
                continue
            start, stop = self.starts[node], self.starts[node + 1]
            change[self.rows[start:stop]] += self.weights[start:stop] * (
                delta / float(self.graph.activation[node])
            )
        return change


def _target_node(graph: Graph, target: str | int | None) -> int:
    """The target row to check: the named token's, else the heaviest logit target."""
    targets = graph.nodes_of(NodeKind.TARGET)
    logits = [int(t) for t in targets if graph.index[t] >= 0]
    if not logits:
        raise CircuitmapError(
            "check needs a graph with a logit target (its targets are all other directions)"
        )
    if target is None:
        return max(logits, key=lambda t: graph.target_weight[t])
    for node in logits:
        name = graph.target_names[node - int(targets[0])]
        token = int(graph.index[node])
        if target in (name, name.strip(), token) or (isinstance(target, str) and target == str(token)):
            return node
    names = ", ".join(repr(graph.target_names[t - int(targets[0])]) for t in logits)
    raise CircuitmapError(f"target {target!r} is not one of the graph's logit targets ({names})")


def _check_match(graph: Graph, model: Model, transcoders: Transcoders, nodes: Sequence[int]) -> None:
    """A clear error when the graph was not computed with this model and transcoders: its feature nodes must
    have the activations they have now (to float32 precision)."""
    if graph.n_layers != model.n_layers:
        raise CircuitmapError(f"the graph has {graph.n_layers} layers but the model has {model.n_layers}")
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.check_fingerprint(graph.info.get("transcoders_fingerprint"), "the graph")
    if max(graph.tokens) >= model.d_vocab:
        raise CircuitmapError("the graph's token ids are outside the model's vocabulary: another model")
    transcoders.follow(model.layer_devices(), model.dtype)
    _, clean = clean_run(model, transcoders, torch.tensor([graph.tokens], device=model.device))
    for node in nodes:
        layer, position, index = int(graph.layer[node]), int(graph.position[node]), int(graph.index[node])
        now = float(clean.acts[layer][position, index])
        then = float(graph.activation[node])
        if not math.isclose(now, then, rel_tol=1e-3, abs_tol=1e-4):
            raise CircuitmapError(
                f"feature {graph.node_id(node)} has activation {then:.4g} in the graph but {now:.4g} here: "
                "the graph was computed with another model or transcoder set"
            )


def check_graph(
    model: Model,
    transcoders: Transcoders,
    graph: Graph,
    *,
    n_features: int = 10,
    supernodes: Sequence[Supernode] = (),
    target: str | int | None = None,
    freeze_attention: bool = True,
) -> CheckReport:
    """Ablate the ``n_features`` most influential feature nodes and each supernode, open loop (attention
    frozen to the clean run unless ``freeze_attention`` is False), and compare the observed change of the
    target's de-meaned logit, read like the graph's target (the final norm's output through the unembedding,
    before any soft-capping), with the graph's prediction."""
    if n_features < 0:
        raise CircuitmapError("n_features must be zero or more")
    target_node = _target_node(graph, target)
    token = int(graph.index[target_node])
    ids = torch.tensor([graph.tokens], device=model.device)
    influence = node_influence(graph)
    features = graph.nodes_of(NodeKind.FEATURE)
    ranked = features[np.argsort(-influence[features], kind="stable")][:n_features]
    index_of = index_by_id(graph)
    groups = [(graph.node_id(int(n)), "feature", [int(n)]) for n in ranked]
    for group in supernodes:
        if not group.features:
            raise CircuitmapError(f"supernode {group.name!r} is empty")
        members = []
        for member in group.features:
            node = index_of.get(member) if isinstance(member, str) else None
            if node is None or graph.kind[node] != NodeKind.FEATURE:
                raise CircuitmapError(
                    f"supernode {group.name!r}: {member!r} is not a feature node of the graph"
                )
            members.append(node)
        groups.append((group.name, "supernode", members))
    if not groups:
        reason = "no features were asked for" if n_features == 0 else "the graph has no feature nodes"
        raise CircuitmapError(f"nothing to check: {reason} and no supernodes were given")
    _check_match(graph, model, transcoders, [node for _, _, members in groups for node in members])
    unembedding = model.unembedding.detach().double().cpu()
    effects = GraphEffects(graph)
    rows = []
    for name, kind, members in groups:
        deltas = [-float(graph.activation[n]) for n in members]
        predicted = effects(members, deltas)[target_node]
        direct = float(sum(_edge(graph, target_node, n) for n in members)) * -1.0
        edits = FeatureEdit.ablate(Supernode(name, [graph.node_id(n) for n in members]))
        result = intervene(model, transcoders, ids, edits, freeze_attention=freeze_attention, top_k=1)
        change = unembedding @ (result.readout_after - result.readout_before)
        observed = float(change[token] - change.mean())
        rows.append(
            CheckRow(
                name=name,
                kind=kind,
                members=[graph.node_id(n) for n in members],
                influence=float(influence[members].sum()),
                predicted=float(predicted),
                direct=direct,
                observed=observed,
            )
        )
    prompt = graph.prompt
    target_name = graph.target_names[target_node - int(graph.nodes_of(NodeKind.TARGET)[0])]
    return CheckReport(prompt, target_name, rows, transcoders.fingerprint())


def _edge(graph: Graph, target: int, source: int) -> float:
    """The weight of the edge ``source → target`` (0 when there is none)."""
    sources, weights = graph.row(target)
    hits = weights[sources == source]
    return float(hits.sum()) if len(hits) else 0.0

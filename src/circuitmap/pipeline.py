"""Prompt → graph folder: the one pipeline behind ``attribute``, ``demo`` and the explorer's graph jobs.

1. attribute the prompt on the local replacement model (``AttributionConfig``), after checking that its
   estimated peak memory fits when asked to;
2. prune the graph into its viewer document, with the scores of the full and the pruned graph
   (``PruneConfig``);
3. give each kept feature its logit lens (the tokens its decoder promotes and suppresses);
4. label the feature nodes from a feature database, when one is given;
5. group the kept features into named supernodes (``circuitmap.group_features``), saved in the document
   as ordinary supernodes that the user can edit, split or merge;
6. write the graph folder (``graph.safetensors`` and ``graph.json``) as one unit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from circuitmap.attribution import AttributionConfig, attribute, check_fits, estimate_attribution
from circuitmap.attribution.progress import Progress
from circuitmap.attribution.targets import TargetSpec
from circuitmap.features import FeatureStore, add_logit_lens
from circuitmap.features.graph_labels import add_feature_labels, unlabelled_features
from circuitmap.features.labels import model_namer, name_stored_concepts
from circuitmap.graphs import Graph, NodeKind, node_influence
from circuitmap.graphs.export import FEATURE_TYPES, graph_json
from circuitmap.graphs.folder import GraphFolder
from circuitmap.graphs.grouping import group_features, with_groups
from circuitmap.graphs.ids import feature_id
from circuitmap.graphs.pruning import PruneConfig, prune
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders

LENS_TOKENS = 10
"""Tokens listed in each feature's logit lens, on each side."""
PRUNING_STAGE = "pruning, scores and logit lens"
"""The stage a progress callback hears of after attribution."""


@dataclass
class ComputedGraph:
    """A graph, its viewer document and how long each part took (seconds)."""

    graph: Graph
    document: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, top: int = 10) -> str:
        """Counts before and after pruning, both scores, the ``top`` most influential features (with their
        labels) and the time taken."""
        graph, document = self.graph, self.document
        metadata = document["metadata"]
        full, kept = metadata["scores"]["full"], metadata["scores"]["exported"]
        influence = node_influence(graph)
        kinds = {kind: int(np.count_nonzero(graph.kind == kind)) for kind in NodeKind}
        kept_features = sum(
            node["feature_type"] == FEATURE_TYPES[NodeKind.FEATURE] for node in document["nodes"]
        )
        targets = ", ".join(
            f"{name!r} (p={prob:.3f})" if np.isfinite(prob) else repr(name)
            for name, prob in zip(graph.target_names, graph.target_probs, strict=True)
        )
        lines = [
            f"prompt: {graph.prompt!r} ({len(graph.tokens)} tokens); targets: {targets}",
            f"graph: {kinds[NodeKind.FEATURE]:,} features, {kinds[NodeKind.ERROR]:,} error nodes, "
            f"{kinds[NodeKind.TOKEN]:,} tokens, {kinds[NodeKind.TARGET]:,} targets; {graph.n_edges:,} edges",
            f"pruned ({metadata['node_threshold']} / {metadata['edge_threshold']}): "
            f"{metadata['n_nodes']['exported']:,} nodes ({kept_features:,} features), "
            f"{metadata['n_edges'].get('pruned', metadata['n_edges']['exported']):,} edges",
            f"replacement score: {_score(full['replacement'])} full, {_score(kept['replacement'])} pruned; "
            f"completeness: {_score(full['completeness'])} full, {_score(kept['completeness'])} pruned",
            "most influential features:",
        ]
        labels = {node["node_id"]: node["clerp"] for node in document["nodes"] if node.get("clerp")}
        features = graph.nodes_of(NodeKind.FEATURE)
        for node in features[np.argsort(-influence[features], kind="stable")[:top]]:
            layer, index, position = int(graph.layer[node]), int(graph.index[node]), int(graph.position[node])
            label = labels.get(feature_id(layer, index, position))
            token = graph.token_strings[position]
            lines.append(
                f"  layer {layer:>2} feature {index:>6} at {position:>3} ({token!r}): "
                f"influence {influence[node]:.4f}, activation {graph.activation[node]:.3f}"
                + (f", label {label!r}" if label else "")
            )
        lines.append(
            f"time: attribution {self.seconds['attribution']:.1f} s, pruning and scores "
            f"{self.seconds['pruning']:.1f} s"
        )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """In a notebook: the explorer's read-only view of the document (``circuitmap.show``)."""
        from circuitmap.notebook import show

        return show(self)._repr_html_()


def _score(value: float | None) -> str:
    """A score as printed: three decimals, or "n/a" where it is undefined (written as null in JSON)."""
    return "n/a" if value is None else f"{value:.3f}"


def compute_graph(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    attribution: AttributionConfig | None = None,
    pruning: PruneConfig | None = None,
    *,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    features: FeatureStore | None = None,
    slug: str | None = None,
    groups: bool = True,
    check_memory: bool = False,
    progress: Progress = True,
    stop: threading.Event | None = None,
) -> ComputedGraph:
    """Steps 1–5 of the module docstring: the graph of ``prompt`` and its labelled viewer document.

    ``features``: the feature database whose labels name the feature nodes (its set must be
    ``transcoders``). ``slug`` names the document (default: made from the prompt). ``groups``: add the
    automatic supernodes. ``check_memory``: refuse
    a run whose estimated peak memory exceeds the free memory. ``progress`` and ``stop`` are ``attribute``'s;
    a progress callback also hears of the stage after attribution.
    """
    if check_memory:
        n_targets = None if targets is None else len(targets) if isinstance(targets, list) else 1
        estimate = estimate_attribution(
            model, transcoders, prompt, attribution, n_targets=n_targets, timed=False
        )
        check_fits(estimate, model.device)
    graph = attribute(model, transcoders, prompt, attribution, targets=targets, progress=progress, stop=stop)
    started = time.perf_counter()
    if callable(progress):
        progress(PRUNING_STAGE, 0, 1)
    kept = prune(graph, pruning)
    document = graph_json(graph, pruning, slug=slug, kept=kept)
    add_logit_lens(document, model, transcoders, LENS_TOKENS)
    if features is not None:
        nodes = [key for _, key in unlabelled_features(document)]
        name_stored_concepts(features, nodes, model_namer(model))
        add_feature_labels(document, features)
    if groups:
        labels = {node["node_id"]: node["clerp"] for node in document["nodes"]}
        with_groups(document, group_features(graph, kept, labels=labels))
    if callable(progress):
        progress(PRUNING_STAGE, 1, 1)
    seconds = {"attribution": float(graph.info["seconds"]), "pruning": time.perf_counter() - started}
    return ComputedGraph(graph, document, seconds)


def compute_graph_folder(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    out: str | Path,
    attribution: AttributionConfig | None = None,
    pruning: PruneConfig | None = None,
    *,
    targets: Sequence[TargetSpec] | TargetSpec | None = None,
    features: FeatureStore | None = None,
    groups: bool = True,
    check_memory: bool = False,
    progress: Progress = True,
    stop: threading.Event | None = None,
) -> ComputedGraph:
    """The whole pipeline: ``compute_graph``, then the graph folder ``out`` written as one unit."""
    computed = compute_graph(
        model,
        transcoders,
        prompt,
        attribution,
        pruning,
        targets=targets,
        features=features,
        groups=groups,
        check_memory=check_memory,
        progress=progress,
        stop=stop,
    )
    GraphFolder(out).write(computed.graph, computed.document)
    return computed

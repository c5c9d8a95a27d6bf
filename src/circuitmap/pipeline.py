"""Prompt → graph folder: the one pipeline behind ``attribute``, ``demo`` and the explorer's graph jobs.

1. attribute the prompt on the local replacement model (``AttributionConfig``), after checking that its
   estimated peak memory fits when asked to;
2. prune the graph into its viewer document, with the scores of the full and the pruned graph
   (``PruneConfig``);
3. give each kept feature its logit lens (the tokens its decoder promotes and suppresses);
4. label the feature nodes from a feature database, when one is given;
5. group the kept features into named supernodes (``circuitmap.group_features``), saved in the document
   as ordinary supernodes that the user can edit, split or merge;
6. when asked to, split the graph's N most influential cross-position edges over the attention heads that
   carry them (``attribution.heads.head_loadings``; the cost grows with the number of edges' targets);
7. write the graph folder (``graph.safetensors``, ``graph.json`` and, from step 6, ``heads.safetensors``) as
   one unit.
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
from circuitmap.attribution.heads import HeadLoadings, head_loadings, top_cross_position_edges
from circuitmap.attribution.progress import Progress
from circuitmap.attribution.targets import TargetSpec
from circuitmap.errors import CircuitmapError, Interrupted
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
HEADS_STAGE = "head loadings"
"""The stage a progress callback hears of while edges are split over heads."""


@dataclass
class ComputedGraph:
    """A graph, its viewer document and how long each part took (seconds)."""

    graph: Graph
    """The full graph."""
    document: dict
    """Its pruned viewer document."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds taken by attribution, pruning and (when computed) head loadings."""
    heads: HeadLoadings | None = None
    """The head loadings of the graph's most influential cross-position edges, when asked for."""

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
        if self.heads is not None:
            lines.append(
                f"head loadings: {len(self.heads.edges):,} cross-position edges split over "
                f"{self.heads.n_layers} layers of {self.heads.n_heads} heads"
            )
        timed = f", head loadings {self.seconds['heads']:.1f} s" if "heads" in self.seconds else ""
        lines.append(
            f"time: attribution {self.seconds['attribution']:.1f} s, pruning and scores "
            f"{self.seconds['pruning']:.1f} s{timed}"
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
    head_edges: int = 0,
    check_memory: bool = False,
    progress: Progress = True,
    stop: threading.Event | None = None,
) -> ComputedGraph:
    """Steps 1–6 of the module docstring: the graph of ``prompt``, its labelled viewer document and, with
    ``head_edges`` above 0, the head loadings of its ``head_edges`` most influential cross-position edges
    (none when the graph has no such edge).

    ``features``: the feature database whose labels name the feature nodes (its set must be
    ``transcoders``). ``slug`` names the document (default: made from the prompt). ``groups``: add the
    automatic supernodes. ``check_memory``: refuse
    a run whose estimated peak memory exceeds the free memory. ``progress`` and ``stop`` are ``attribute``'s;
    a progress callback also hears of the stages after attribution.
    """
    if head_edges < 0:
        raise CircuitmapError(f"the number of edges to split over heads must be 0 or more, got {head_edges}")
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
    heads = None
    edges = top_cross_position_edges(graph, head_edges, by="influence") if head_edges else []
    if len(edges):
        if stop is not None and stop.is_set():
            raise Interrupted("stopped before the head loadings: nothing was written")
        started = time.perf_counter()
        if callable(progress):
            progress(HEADS_STAGE, 0, 1)
        batch_size = (attribution or AttributionConfig()).batch_size
        heads = head_loadings(model, transcoders, graph, edges, targets=targets, batch_size=batch_size)
        if callable(progress):
            progress(HEADS_STAGE, 1, 1)
        seconds["heads"] = time.perf_counter() - started
    return ComputedGraph(graph, document, seconds, heads)


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
    head_edges: int = 0,
    check_memory: bool = False,
    progress: Progress = True,
    stop: threading.Event | None = None,
) -> ComputedGraph:
    """The whole pipeline: ``compute_graph``, then the graph folder ``out`` written as one unit (with
    ``heads.safetensors`` when ``head_edges`` is above 0)."""
    computed = compute_graph(
        model,
        transcoders,
        prompt,
        attribution,
        pruning,
        targets=targets,
        features=features,
        groups=groups,
        head_edges=head_edges,
        check_memory=check_memory,
        progress=progress,
        stop=stop,
    )
    GraphFolder(out).write(computed.graph, computed.document, computed.heads)
    return computed

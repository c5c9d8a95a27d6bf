"""Attention in the graph, on SmolLM2-135M: writes docs/attention.md and its figures from scratch.

An attribution graph freezes attention: an edge between two positions says how much one node moves another
through the heads, not through which heads, nor why they look where they do. On the indirect-object prompt
"When Mary and John went to the store, John gave a drink to" (→ Mary) this report

1. computes the graph, splits its most influential cross-position edges into the last position over the heads
   of their last position-changing step (``head_loadings``), and splits the leading heads further by the
   position they read: the heads that read ` Mary` and write at the last position;
2. explains where the top heads look with QK attribution: each head's score at (last position, ` Mary`) and
   at (last position, the first ` John`) as a sum over pairs of query-side and key-side nodes;
3. tests the explanation on the real model with attention recomputed: the features that carry the score (at
   ` Mary` on the key side, at the last position on the query side) are ablated or negated; the change of
   the score is predicted first, then the head's real scores, its pattern and the model's answer are read.

The time and memory these steps cost are measured by ``benchmarks/attention.py``, not here, so that the
report is the same byte for byte at every run of ``python examples/attention_report.py`` (on one machine).
It uses the model's quick transcoder set (trained on first use) and, when it exists, the set's feature
database for labels.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")

from circuitmap import (  # noqa: E402
    FeatureEdit,
    InterventionResult,
    Supernode,
    generate_with,
    intervene,
    load_model,
    load_transcoders,
)
from circuitmap.attribution import (  # noqa: E402
    HeadLoadings,
    QKAttribution,
    head_loadings,
    qk_attribution,
    top_cross_position_edges,
)
from circuitmap.attribution.heads import AttentionCall, attention_tap, edge_targets  # noqa: E402
from circuitmap.cache import ensure_quick_transcoders  # noqa: E402
from circuitmap.features import FeatureStore  # noqa: E402
from circuitmap.graphs import Graph, NodeKind, PruneConfig, graph_scores, prune  # noqa: E402
from circuitmap.graphs.ids import is_feature_id  # noqa: E402
from circuitmap.graphs.pruning import normalized_weights  # noqa: E402
from circuitmap.studies import GROUP_SIZE, Explained, Study, describe_transcoders, quote  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "When Mary and John went to the store, John gave a drink to"
ANSWER, OTHER = " Mary", " John"
MAX_FEATURE_NODES = 4096
THREADS = 2
N_EDGES = 64
"""Cross-position edges into the last position whose loadings are computed: the most influential."""
SHOWN_HEADS = 12
"""Heads listed, and split by the position they read: the largest shares of the edges' influence."""
N_QK_HEADS = 3
"""Heads explained by QK attribution and tested: the largest shares read at the answer's position."""
SHOWN_FEATURES = 8
CONTINUATION_TOKENS = 12
KINDS = ("feature", "error", "head", "token", "bias")
EDITS = (("ablated", 0.0), ("× −1", -1.0))
"""The two edits of a group: its features' activations times 0, or times −1."""


@dataclass
class Report(Study):
    """A study of the model and transcoders, and the report being written about it."""

    figures: Path = field(kw_only=True)
    lines: list[str] = field(default_factory=list, kw_only=True)
    summary: list[str] = field(default_factory=list, kw_only=True)


@dataclass
class Positions:
    """Where the names sit in the prompt."""

    answer: int
    """The name the model should say (the indirect object)."""
    other: int
    """The first mention of the other name (the subject)."""
    repeated: int
    """The second mention of the subject."""
    last: int
    """The last position, where the answer is predicted."""


@dataclass
class Reading:
    """One run of the prompt: every head's attention row and pre-softmax scores at the last position
    (``[n_layers, n_heads, T]``), and the run's result (probabilities before and after its edits)."""

    pattern: np.ndarray
    score: np.ndarray
    result: InterventionResult


@dataclass
class HeadRow:
    """One head's part in moving information into the last position."""

    layer: int
    head: int
    share: float
    """Its share of the influence of the chosen edges."""
    read_at: dict[int, float]
    """The part of that share read at each key position."""
    into_answer: float
    """Its summed loading of the chosen edges into the answer's logit, read at the answer's position."""

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.head}"


@dataclass
class Trial:
    """An edit of one group of features for one head, and what the head's QK attribution predicts."""

    head: HeadRow
    side: str
    """``key``: features at the answer's position; ``query``: features at the last position."""
    edit: str
    factor: float
    group: list[str]
    predicted_answer: float
    """The predicted change of the head's score at the answer's position."""
    predicted_gap: float
    """The predicted change of that score minus the score at the other name's first position."""

    @property
    def name(self) -> str:
        return f"{self.side} side of {self.head.name} {self.edit}"

    def edits(self) -> list[FeatureEdit]:
        return [FeatureEdit.scale(Supernode(self.name, self.group), self.factor)]


def read_attention(ctx: Report, edits: list[FeatureEdit], mode: str = "open_loop") -> Reading:
    """Run the prompt with ``edits`` and read every head's attention and scores at the last position: on the
    real model with attention recomputed (``open_loop``), or on the local replacement model
    (``constrained``: attention patterns and norms frozen, MLPs replaced by the transcoders). The tap keeps
    the last call of each layer: ``intervene`` runs the clean prompt first and the edited one last."""
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def tap(call: AttentionCall) -> None:
        query = call.query[0, :, -1].detach().double()
        shared = call.query.shape[1] // call.key.shape[1]
        keys = call.key[0].detach().double().repeat_interleave(shared, 0)
        scores = call.scaling * torch.einsum("hd,htd->ht", query, keys)
        rows[call.layer] = (call.pattern[0, :, -1].detach().double().cpu().numpy(), scores.cpu().numpy())

    frozen = mode == "constrained"
    with attention_tap(ctx.model, tap):
        result = intervene(
            ctx.model, ctx.transcoders, PROMPT, edits, mode=mode, freeze_attention=frozen, top_k=1
        )
    layers = range(ctx.model.n_layers)
    return Reading(np.stack([rows[i][0] for i in layers]), np.stack([rows[i][1] for i in layers]), result)


def softmax_at(scores: np.ndarray, position: int) -> float:
    """The softmax of ``scores`` at ``position``."""
    weights = np.exp(scores - scores.max())
    return float(weights[position] / weights.sum())


def locate(graph: Graph) -> Positions:
    strings = graph.token_strings
    others = [i for i, token in enumerate(strings) if token == OTHER]
    return Positions(strings.index(ANSWER), others[0], others[1], len(strings) - 1)


def node_kind(node: str) -> str:
    if is_feature_id(node):
        return "feature"
    return {"E": "token", "err": "error", "attn": "head", "bias": "bias"}[node.split("_")[0]]


def node_name(ctx: Report, graph: Graph, node: str) -> str:
    """A QK node in words: a feature's id and label, or what the node is and where (`@position`)."""
    if is_feature_id(node):
        label = ctx.label(node)
        return f"`{node}`" + (f" {label}" if label else "")
    parts = node.split("_")
    if parts[0] == "E":
        return f"token `{graph.token_strings[int(parts[2])]!r}`@{parts[2]}"
    if parts[0] == "err":
        return f"error of layer {parts[1]}@{parts[2]}"
    if parts[0] == "attn":
        return f"head {parts[1]}.{parts[2]}@{parts[3]}"
    return f"bias@{parts[1]}"


def where(graph: Graph, position: int) -> str:
    return f"`{graph.token_strings[position]!r}`@{position}"


def describe_graph(ctx: Report, explained: Explained) -> None:
    graph = explained.graph
    settings = PruneConfig()
    pruned = prune(graph, settings)
    full = graph_scores(graph)
    targets = ", ".join(
        f"`{name!r}` ({prob:.2f})" for name, prob in zip(graph.target_names, graph.target_probs, strict=True)
    )
    tokens = " ".join(where(graph, i) for i in range(len(graph.tokens)))
    ctx.lines += [
        "## 1. The graph, and the heads that move ` Mary` to the last position",
        "",
        f"Tokens: {tokens}.",
        "",
        f"Graph: {graph.n_features:,} feature nodes, {graph.n_edges:,} edges; targets {targets}. "
        f"Replacement score {full.replacement:.2f}, completeness {full.completeness:.2f}; pruned (node "
        f"threshold {settings.node_threshold:g}, edge threshold {settings.edge_threshold:g}): "
        f"{int(pruned.node_mask.sum()):,} nodes, {int(pruned.edge_mask.sum()):,} edges.",
        "",
    ]


def head_shares(loadings: HeadLoadings, edge_share: dict[int, float]) -> dict[tuple[int, int, int], float]:
    """Each edge's share of influence split over its heads in proportion to ``|loading|``, by
    ``(edge, layer, head)``."""
    magnitude = np.abs(loadings.value).tolist()
    total: dict[int, float] = defaultdict(float)
    for edge, value in zip(loadings.edge.tolist(), magnitude, strict=True):
        total[edge] += value
    keys = zip(loadings.edge.tolist(), loadings.layer.tolist(), loadings.head.tolist(), strict=True)
    return {
        (edge, layer, head): edge_share[edge] * value / total[edge]
        for (edge, layer, head), value in zip(keys, magnitude, strict=True)
        if total[edge] > 0
    }


def site_shares(split: HeadLoadings, head_share: dict[tuple[int, int, int], float]) -> dict:
    """Each (edge, head) share split over the key positions the head reads, in proportion to ``|loading|``,
    summed by ``(layer, head, key position)``."""
    magnitude = np.abs(split.value).tolist()
    groups = list(zip(split.edge.tolist(), split.layer.tolist(), split.head.tolist(), strict=True))
    total: dict[tuple[int, int, int], float] = defaultdict(float)
    for group, value in zip(groups, magnitude, strict=True):
        total[group] += value
    shares: dict[tuple[int, int, int], float] = defaultdict(float)
    for (edge, layer, head), key, value in zip(groups, split.key_position.tolist(), magnitude, strict=True):
        if total[edge, layer, head] > 0:
            shares[layer, head, key] += head_share[edge, layer, head] * value / total[edge, layer, head]
    return shares


def heads_into_last_position(
    ctx: Report, explained: Explained, at: Positions, clean: Reading
) -> list[HeadRow]:
    """Section 1: the chosen edges, their loadings by head and by key position, the table and the heat map.
    Returns the listed heads, largest share first."""
    graph = explained.graph
    edge_influence = normalized_weights(graph) * explained.influence[graph.target_indices()]
    ranked = top_cross_position_edges(graph, graph.n_edges, by="influence")
    into_last = ranked[graph.position[edge_targets(graph, ranked)] == at.last]
    edges = into_last[:N_EDGES]
    targets = edge_targets(graph, edges)
    answer_node = int(graph.nodes_of(NodeKind.TARGET)[graph.target_names.index(ANSWER)])
    chosen = edge_influence[edges]
    edge_share = dict(zip(edges.tolist(), (chosen / chosen.sum()).tolist(), strict=True))

    loadings = head_loadings(ctx.model, ctx.transcoders, graph, edges)
    per_edge_head = head_shares(loadings, edge_share)
    share = np.zeros((loadings.n_layers, loadings.n_heads))
    for (_, layer, head), value in per_edge_head.items():
        share[layer, head] += value
    into_answer = sum(loadings.matrix(edge) for edge in edges[targets == answer_node].tolist())
    order = np.argsort(-share, axis=None, kind="stable")[:SHOWN_HEADS]
    leading = [(int(flat) // share.shape[1], int(flat) % share.shape[1]) for flat in order]
    split = head_loadings(ctx.model, ctx.transcoders, graph, edges, heads=leading, split_key_positions=True)
    by_site = site_shares(split, per_edge_head)
    read_answer: dict[tuple[int, int], float] = defaultdict(float)
    split_targets = edge_targets(graph, split.edge).tolist()
    entries = zip(
        split_targets, split.layer.tolist(), split.head.tolist(), split.key_position.tolist(), strict=True
    )
    for (target, layer, head, key), value in zip(entries, split.value.tolist(), strict=True):
        if target == answer_node and key == at.answer:
            read_answer[layer, head] += value
    rows = [
        HeadRow(
            layer,
            head,
            float(share[layer, head]),
            {key: by_site[layer, head, key] for key in range(at.last)},
            read_answer[layer, head],
        )
        for layer, head in leading
    ]

    loading_targets = edge_targets(graph, loadings.edge).tolist()
    n_rows = len(set(zip(loading_targets, loadings.layer.tolist(), loadings.head.tolist(), strict=True)))
    ends = ", ".join(f"`{graph.node_id(int(node))}`" for node in np.unique(targets))
    from_answer = int((graph.position[graph.indices[edges]] == at.answer).sum())
    ctx.lines += [
        f"**Edges.** The {N_EDGES} cross-position edges into the last position with the largest influence "
        "(the pruning score: normalised weight times the target's influence on the logits) carry "
        f"{chosen.sum() / edge_influence[into_last].sum():.0%} of the influence of all "
        f"{len(into_last):,} cross-position edges into it. They end at {ends} "
        f"(`{graph.node_id(answer_node)}` is the `{ANSWER!r}` logit, the others are features) and "
        f"{from_answer} of them start at {where(graph, at.answer)}.",
        "",
        "**Loadings.** Each edge is split over the heads of its last position-changing step "
        f"(`head_loadings`: {n_rows:,} backward rows); the loadings add up to the edges' weights to within "
        f"{np.abs(loadings.remainder).max():.0e} (the graph stores float32). A head's *share* is the edges' "
        "influence split over heads in proportion to |loading|; the shares of the leading heads are split "
        "further by the position the head reads at that step (`split_key_positions`). *Into the logit* is "
        f"the head's summed loading of the chosen edges into the `{ANSWER!r}` logit, read at "
        f"{where(graph, at.answer)}: positive, the head moves Mary into the answer; negative, it works "
        "against it. *Attention* is the real pattern from the last position (clean run).",
        "",
        f"| head | share | read at {where(graph, at.answer)} | at {where(graph, at.other)} | at "
        f"{where(graph, at.repeated)} | into the logit | attention → {where(graph, at.answer)} | → "
        f"{where(graph, at.other)} | → {where(graph, at.repeated)} | most attended |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        attention = clean.pattern[row.layer, row.head]
        top = int(np.argmax(attention))
        ctx.lines.append(
            f"| {row.name} | {row.share:.3f} | {row.read_at[at.answer]:.3f} | {row.read_at[at.other]:.3f} | "
            f"{row.read_at[at.repeated]:.3f} | {row.into_answer:+.3f} | {attention[at.answer]:.3f} | "
            f"{attention[at.other]:.3f} | {attention[at.repeated]:.3f} | {where(graph, top)} "
            f"({attention[top]:.2f}) |"
        )
    draw_heads(share, into_answer, ctx.figures / "ioi-heads.png")
    ctx.lines += [
        "",
        "![heads](attention/ioi-heads.png)",
        "",
        f"Left: each head's share of the {N_EDGES} edges' influence. Right: the heads' summed loadings of "
        f"those of the edges that end at the `{ANSWER!r}` logit (logit units, summed over the positions the "
        "heads read; red raises the logit).",
        "",
    ]
    return rows


def draw_heads(share: np.ndarray, into_answer: np.ndarray, path: Path) -> None:
    """Two heat maps, layers up and heads across: the heads' shares and their loadings into the logit."""
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 6.5), dpi=110)
    image = axes[0].imshow(share, cmap="Greys", aspect="auto", origin="lower")
    figure.colorbar(image, ax=axes[0], label="share of the edges' influence")
    limit = float(np.abs(into_answer).max())
    image = axes[1].imshow(into_answer, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    figure.colorbar(image, ax=axes[1], label=f"summed loading into the {ANSWER.strip()} logit")
    titles = ("share of influence", f"loadings into the {ANSWER.strip()} logit")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_xticks(range(share.shape[1]))
        axis.set_title(title, fontsize=10)
    figure.suptitle(
        f"The {N_EDGES} most influential cross-position edges into the last position, split by head",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def parts_by_kind(result: QKAttribution) -> tuple[np.ndarray, np.ndarray]:
    """The score split by the kind of the query-side node and by the kind of the key-side node."""
    query = np.zeros(len(KINDS))
    key = np.zeros(len(KINDS))
    np.add.at(query, [KINDS.index(node_kind(n)) for n in result.query_nodes], result.query_totals)
    np.add.at(key, [KINDS.index(node_kind(n)) for n in result.key_nodes], result.key_totals)
    return query, key


def share_of_pairs(result: QKAttribution, kind: str) -> float:
    """The share of ``Σ|pairs|`` in pairs that have a node of ``kind`` on either side."""
    query = np.array([node_kind(n) == kind for n in result.query_nodes])
    key = np.array([node_kind(n) == kind for n in result.key_nodes])
    magnitude = np.abs(result.pairs)
    return float(magnitude[query[:, None] | key[None, :]].sum() / magnitude.sum())


def explain_scores(ctx: Report, graph: Graph, at: Positions, row: HeadRow, clean: Reading) -> list[Trial]:
    """Section 2 for one head: its QK attributions at the answer and at the other name, the parts by kind, the
    largest pairs and the two groups of features; returns the trials of section 3, predictions included."""
    at_answer = qk_attribution(ctx.model, ctx.transcoders, graph, row.layer, row.head, at.last, at.answer)
    at_other = qk_attribution(ctx.model, ctx.transcoders, graph, row.layer, row.head, at.last, at.other)
    attention = clean.pattern[row.layer, row.head]
    config = ctx.model.hf_model.config.get_text_config()
    per_key = config.num_attention_heads // config.num_key_value_heads
    shared = [
        f"{row.layer}.{head}"
        for head in range(config.num_attention_heads)
        if head != row.head and head // per_key == row.head // per_key
    ]
    ctx.lines += [
        f"### Head {row.name}",
        "",
        f"Score (`scaling · query · key`, before the softmax) at ({where(graph, at.last)}, "
        f"{where(graph, at.answer)}): **{at_answer.score:.3f}**, attention {attention[at.answer]:.3f}; at "
        f"({where(graph, at.last)}, {where(graph, at.other)}): **{at_other.score:.3f}**, attention "
        f"{attention[at.other]:.3f}. Into the logit: {row.into_answer:+.3f}. Its keys are shared with "
        f"{' and '.join(shared)} (grouped-query attention).",
        "",
        "The score split by the kind of node on each side (each column sums to the score):",
        "",
        f"| nodes | query side, key {where(graph, at.answer)} | key side at {where(graph, at.answer)} | "
        f"query side, key {where(graph, at.other)} | key side at {where(graph, at.other)} |",
        "|---|---:|---:|---:|---:|",
    ]
    answer_query, answer_key = parts_by_kind(at_answer)
    other_query, other_key = parts_by_kind(at_other)
    for i, kind in enumerate(KINDS):
        ctx.lines.append(
            f"| {kind} | {answer_query[i]:+.3f} | {answer_key[i]:+.3f} | {other_query[i]:+.3f} | "
            f"{other_key[i]:+.3f} |"
        )
    ctx.lines += [
        f"| **score** | {at_answer.score:+.3f} | {at_answer.score:+.3f} | {at_other.score:+.3f} | "
        f"{at_other.score:+.3f} |",
        "",
        f"Pairs with the bias on either side hold {share_of_pairs(at_answer, 'bias'):.0%} of Σ|pairs| at "
        f"{where(graph, at.answer)} ({share_of_pairs(at_other, 'bias'):.0%} at {where(graph, at.other)}); "
        f"pairs with an error node {share_of_pairs(at_answer, 'error'):.0%} "
        f"({share_of_pairs(at_other, 'error'):.0%}); pairs of two features "
        f"{_feature_pairs(at_answer):.1%} ({_feature_pairs(at_other):.1%}).",
        "",
        f"Largest pairs at {where(graph, at.answer)}:",
        "",
        "| query side | key side | part of the score |",
        "|---|---|---:|",
    ]
    for query, key, value in at_answer.top_pairs(SHOWN_FEATURES):
        ctx.lines.append(f"| {node_name(ctx, graph, query)} | {node_name(ctx, graph, key)} | {value:+.3f} |")
    ctx.lines += [
        "",
        f"Largest pairs of two features at {where(graph, at.answer)}:",
        "",
        "| query-side feature | key-side feature | part of the score |",
        "|---|---|---:|",
    ]
    for query, key, value in feature_pairs(at_answer, SHOWN_FEATURES // 2):
        ctx.lines.append(f"| {node_name(ctx, graph, query)} | {node_name(ctx, graph, key)} | {value:+.3f} |")

    key_totals = dict(zip(at_answer.key_nodes, at_answer.key_totals.tolist(), strict=True))
    key_group = _largest(key_totals, GROUP_SIZE)
    answer_totals = dict(zip(at_answer.query_nodes, at_answer.query_totals.tolist(), strict=True))
    other_totals = dict(zip(at_other.query_nodes, at_other.query_totals.tolist(), strict=True))
    gap = {node: answer_totals[node] - other_totals[node] for node in answer_totals}
    query_group = _largest(gap, GROUP_SIZE)
    key_sum = sum(key_totals[node] for node in key_group)
    query_answer = sum(answer_totals[node] for node in query_group)
    query_gap = sum(gap[node] for node in query_group)
    ctx.lines += [
        "",
        f"**Key-side group**: the {len(key_group)} features at {where(graph, at.answer)} with the largest "
        f"parts of the score there (together {key_sum:+.3f}; the first {SHOWN_FEATURES}):",
        "",
        "| feature | part of the score |",
        "|---|---:|",
        *(
            f"| {node_name(ctx, graph, node)} | {key_totals[node]:+.3f} |"
            for node in key_group[:SHOWN_FEATURES]
        ),
        "",
        f"**Query-side group**: the {len(query_group)} features at {where(graph, at.last)} whose part of the "
        f"score at {where(graph, at.answer)} most exceeds their part at {where(graph, at.other)} (together "
        f"{query_answer:+.3f} at {where(graph, at.answer)}, {query_gap:+.3f} of the difference; the first "
        f"{SHOWN_FEATURES}):",
        "",
        f"| feature | part at {where(graph, at.answer)} | part at {where(graph, at.other)} | difference |",
        "|---|---:|---:|---:|",
        *(
            f"| {node_name(ctx, graph, node)} | {answer_totals[node]:+.3f} | {other_totals[node]:+.3f} | "
            f"{gap[node]:+.3f} |"
            for node in query_group[:SHOWN_FEATURES]
        ),
        "",
    ]
    trials = []
    for edit, factor in EDITS:
        change = factor - 1
        trials += [
            Trial(row, "key", edit, factor, key_group, change * key_sum, change * key_sum),
            Trial(row, "query", edit, factor, query_group, change * query_answer, change * query_gap),
        ]
    return trials


def _largest(totals: dict[str, float], count: int) -> list[str]:
    """The ``count`` features with the largest positive totals, largest first (ties in node order)."""
    features = [(node, value) for node, value in totals.items() if is_feature_id(node) and value > 0]
    features.sort(key=lambda item: -item[1])
    return [node for node, _ in features[:count]]


def _feature_masks(result: QKAttribution) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([is_feature_id(n) for n in result.query_nodes]),
        np.array([is_feature_id(n) for n in result.key_nodes]),
    )


def _feature_pairs(result: QKAttribution) -> float:
    """The share of ``Σ|pairs|`` in pairs of two features."""
    magnitude = np.abs(result.pairs)
    return float(magnitude[np.ix_(*_feature_masks(result))].sum() / magnitude.sum())


def feature_pairs(result: QKAttribution, count: int) -> list[tuple[str, str, float]]:
    """The ``count`` pairs of two features with the largest ``|contribution|``."""
    rows, columns = (np.flatnonzero(mask) for mask in _feature_masks(result))
    block = result.pairs[np.ix_(rows, columns)]
    flat = np.argsort(-np.abs(block), axis=None, kind="stable")[:count]
    return [
        (result.query_nodes[rows[i]], result.key_nodes[columns[j]], float(block[i, j]))
        for i, j in zip(*np.unravel_index(flat, block.shape), strict=True)
    ]


def run_trials(
    ctx: Report, graph: Graph, at: Positions, heads: list[HeadRow], trials: list[Trial], clean: Reading
) -> dict[str, Reading]:
    """Section 3: the rule, then every trial on the real model (attention recomputed), with verdicts."""
    names = ", ".join(head.name for head in heads)
    mary, john = where(graph, at.answer), where(graph, at.other)
    ctx.lines += [
        "## 3. Editing the features that carry the scores",
        "",
        "Each group above is edited on the real model, open loop and **with attention recomputed** "
        "(`intervene(..., freeze_attention=False)`; `generate_with` for the continuation): its features' "
        "activations are multiplied by 0 (*ablated*) or by −1. The heads' scores and patterns are read by "
        "tapping the model's attention function (`attention_tap`) in the same run.",
        "",
        "**The rule, stated before measuring.** QK attribution is bilinear: multiplying the activations of a "
        "group by *f* changes the head's score at (last, key) by (*f* − 1) × the group's summed part of that "
        f"score. So the key-side group changes the score at {mary} by (*f* − 1) × its total and leaves the "
        f"score at {john} alone; the query-side group changes the gap *score at {mary} − score at {john}* by "
        "(*f* − 1) × its summed difference. This is exact in the local replacement model with every other "
        "node held; the real model also recomputes the features, heads and norms downstream of the edit. "
        "*Attention as predicted*: the measured change of the gap has the predicted sign and lies between "
        f"half and twice the prediction, and the head's attention to {mary} moves the same way. *Answer as "
        f"predicted*: P(`{ANSWER!r}`) moves the way the head's loading into the logit says: with the "
        "attention when the loading is positive, against it when it is negative. The predicted attention "
        "(key side) is the softmax of the clean scores with only the score at Mary changed.",
        "",
        "The *replacement model* columns measure the same changes in the local replacement model "
        '(`intervene(..., mode="constrained")`: attention patterns and norm scales frozen, MLP outputs '
        "held at their clean values plus the edited features' decoder outputs), where the prediction differs "
        "only by the paths through the outputs of the heads below, which the attribution holds as nodes and "
        "which are recomputed here through their values. The *real model* columns are the test. A group "
        "edits the residual stream at its position for every head, not only for the head it was chosen for: "
        "the second table shows the three heads' attention after each edit.",
        "",
        "| head | edited group | predicted Δ score at Mary | predicted Δ gap | replacement model: Δ score "
        "at Mary | Δ gap | real model: Δ score at Mary | Δ gap | attention → Mary: clean → edited "
        "(predicted) | attention as predicted |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    readings, answers = {}, []
    for trial in trials:
        reading = read_attention(ctx, trial.edits())
        local = read_attention(ctx, trial.edits(), mode="constrained")
        readings[trial.name] = reading
        layer, head = trial.head.layer, trial.head.head
        before = clean.score[layer, head]
        changes = []
        for run in (local, reading):
            answer = run.score[layer, head, at.answer] - before[at.answer]
            changes.append((answer, answer - (run.score[layer, head, at.other] - before[at.other])))
        (local_answer, local_gap), (measured_answer, measured_gap) = changes
        attention_before = clean.pattern[layer, head, at.answer]
        attention_after = reading.pattern[layer, head, at.answer]
        predicted = ""
        if trial.side == "key":
            shifted = before.copy()
            shifted[at.answer] += trial.predicted_answer
            predicted = f" ({softmax_at(shifted, at.answer):.3f})"
        ratio = measured_gap / trial.predicted_gap
        moved = np.sign(attention_after - attention_before) == np.sign(trial.predicted_gap)
        attention_held = 0.5 <= ratio <= 2 and bool(moved)
        ctx.lines.append(
            f"| {trial.head.name} | {trial.side} side {trial.edit} | {trial.predicted_answer:+.3f} | "
            f"{trial.predicted_gap:+.3f} | {local_answer:+.3f} | {local_gap:+.3f} | {measured_answer:+.3f} | "
            f"{measured_gap:+.3f} | {attention_before:.3f} → {attention_after:.3f}{predicted} | "
            f"{_verdict(attention_held)} |"
        )
        expected = np.sign(trial.predicted_gap) * np.sign(trial.head.into_answer)
        p_before = ctx.probability(reading.result, ANSWER, after=False)
        p_after = ctx.probability(reading.result, ANSWER)
        answer_held = bool(np.sign(p_after - p_before) == expected)
        answers.append((trial, reading, answer_held))
        ctx.summary.append(
            f"| {trial.head.name} | {trial.side} side {trial.edit} | {trial.predicted_gap:+.3f} | "
            f"{measured_gap:+.3f} | {attention_before:.3f} → {attention_after:.3f} | "
            f"{_verdict(attention_held)} | {p_before:.3f} → {p_after:.3f} | {_verdict(answer_held)} |"
        )
    heads_header = " | ".join(f"{head.name} → Mary" for head in heads)
    ctx.lines += [
        "",
        f"What the model says (attention of the heads {names} to Mary; greedy continuation of "
        f"{CONTINUATION_TOKENS} tokens with the edit in place):",
        "",
        f"| head | edited group | {heads_header} | P(`{ANSWER!r}`) | P(`{OTHER!r}`) | top next token | "
        "greedy continuation | answer as predicted |",
        "|---|---|" + "---:|" * len(heads) + "---:|---:|---|---|---|",
    ]
    continuation = generate_with(ctx.model, ctx.transcoders, PROMPT, [], CONTINUATION_TOKENS)
    cells = " | ".join(f"{clean.pattern[head.layer, head.head, at.answer]:.3f}" for head in heads)
    top, p = clean.result.top_before[0]
    ctx.lines.append(
        f"| — | none | {cells} | {ctx.probability(clean.result, ANSWER, after=False):.3f} | "
        f"{ctx.probability(clean.result, OTHER, after=False):.3f} | `{top!r}` ({p:.2f}) | "
        f"{quote(continuation)} | |"
    )
    for trial, reading, held in answers:
        continuation = generate_with(ctx.model, ctx.transcoders, PROMPT, trial.edits(), CONTINUATION_TOKENS)
        cells = " | ".join(f"{reading.pattern[head.layer, head.head, at.answer]:.3f}" for head in heads)
        top, p = reading.result.top_after[0]
        ctx.lines.append(
            f"| {trial.head.name} | {trial.side} side {trial.edit} | {cells} | "
            f"{ctx.probability(reading.result, ANSWER):.3f} | {ctx.probability(reading.result, OTHER):.3f} | "
            f"`{top!r}` ({p:.2f}) | {quote(continuation)} | {_verdict(held)} |"
        )
    ctx.lines.append("")
    return readings


def _verdict(held: bool) -> str:
    return "yes" if held else "**no**"


def draw_patterns(
    graph: Graph,
    heads: list[HeadRow],
    clean: Reading,
    readings: dict[str, Reading],
    trials: list[Trial],
    path: Path,
) -> None:
    """Each tested head's attention from the last position, clean and under each of its own edits."""
    from matplotlib import pyplot as plt

    positions = np.arange(len(graph.tokens))
    figure, axes = plt.subplots(len(heads), 1, figsize=(11, 3 * len(heads)), dpi=110, squeeze=False)
    for axis, head in zip(axes[:, 0], heads, strict=True):
        own = [trial for trial in trials if trial.head is head]
        series = [("clean", clean), *((trial.name, readings[trial.name]) for trial in own)]
        width = 0.8 / len(series)
        for number, (name, reading) in enumerate(series):
            axis.bar(
                positions + (number - (len(series) - 1) / 2) * width,
                reading.pattern[head.layer, head.head],
                width,
                label=name.replace(f" of {head.name}", ""),
            )
        axis.set_xticks(positions, [repr(t)[1:-1] for t in graph.token_strings], rotation=30, fontsize=8)
        axis.set_ylabel("attention")
        axis.set_title(f"head {head.name}: attention from the last position", fontsize=9)
        axis.legend(fontsize=7, ncols=len(series))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def describe_cost(ctx: Report, graph: Graph) -> None:
    recomputed = int(graph.info.get("recomputed_rows", 0))
    d_head = ctx.model.hf_model.config.get_text_config().head_dim
    ctx.lines += [
        "## 4. Cost",
        "",
        f"The graph took {graph.n_features + len(graph.target_names) + recomputed:,} backward rows (feature "
        "and logit rows, and rows recomputed for the cap). Head loadings take two runs of the replacement "
        "model and one backward row per (distinct target, layer, head) the edges can cross at, whatever the "
        "number of edges (times the number of key positions when split); a QK attribution takes one run "
        f"and 2 × d_head = {2 * d_head} rows. Their time and peak memory, beside the attribution's, on this "
        "graph and on “The capital of France is”, are measured by `python benchmarks/attention.py` "
        "(timings vary with the machine, so they are not part of this generated page).",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcoders", help="transcoder set (default: the model's quick set)")
    parser.add_argument("--features", help="feature database for labels (default: the set's own, if built)")
    parser.add_argument("--out", default="docs", help="folder for attention.md and its figures")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = load_model(MODEL)
    source = args.transcoders or ensure_quick_transcoders(model, MODEL)
    transcoders = load_transcoders(source)
    store = FeatureStore.open_for(transcoders, args.features)
    out = Path(args.out)
    figures = out / "attention"
    figures.mkdir(parents=True, exist_ok=True)
    ctx = Report(model, transcoders, store, MAX_FEATURE_NODES, figures=figures)

    explained = ctx.explain(PROMPT)
    graph = explained.graph
    at = locate(graph)
    print(f"graph done after {time.perf_counter() - started:.0f} s")
    clean = read_attention(ctx, [])
    describe_graph(ctx, explained)
    rows = heads_into_last_position(ctx, explained, at, clean)
    print(f"head loadings done after {time.perf_counter() - started:.0f} s")
    heads = sorted(rows, key=lambda row: -row.read_at[at.answer])[:N_QK_HEADS]
    ctx.lines += [
        "## 2. Why the heads look at ` Mary`: QK attribution",
        "",
        f"The {N_QK_HEADS} heads of the table with the largest share read at {where(graph, at.answer)}: "
        f"{', '.join(head.name for head in heads)}. For each, the score at (last position, "
        f"{where(graph, at.answer)}) and, for contrast, at (last position, {where(graph, at.other)}) are "
        "split over pairs of a query-side node (at the last position) and a key-side node (at the key's "
        "position): features, error nodes, the token, the output of each head of a lower layer at that "
        "position (a node of its own: paths through attention end there) and the bias (what no node accounts "
        "for: the transcoders' decoder biases, among others). The pairs sum to the score exactly.",
        "",
    ]
    trials = [trial for head in heads for trial in explain_scores(ctx, graph, at, head, clean)]
    print(f"QK attributions done after {time.perf_counter() - started:.0f} s")
    readings = run_trials(ctx, graph, at, heads, trials, clean)
    draw_patterns(graph, heads, clean, readings, trials, figures / "ioi-patterns.png")
    ctx.lines += ["![patterns](attention/ioi-patterns.png)", ""]
    print(f"interventions done after {time.perf_counter() - started:.0f} s")
    describe_cost(ctx, graph)

    dtype, device = str(model.dtype).removeprefix("torch."), model.device.type.upper()
    header = [
        "# Attention in the graph",
        "",
        "Generated by `python examples/attention_report.py`; every number below comes from that run. Model: "
        f"SmolLM2-135M-Instruct ({dtype}, {device}, {THREADS} threads). Transcoders: "
        f"{describe_transcoders(transcoders, quick=args.transcoders is None)}. "
        + ("Labels: the set's feature database (automatic labels). " if store else "No labels. ")
        + f"The graph keeps its {MAX_FEATURE_NODES:,} most influential features (the others are folded into "
        f"error nodes). Prompt: “{PROMPT}” → `{ANSWER!r}`.",
        "",
        "An attribution graph freezes attention, so an edge between two positions does not say which heads "
        "carry it, nor why they look where they do. Head loadings split a cross-position edge over the heads "
        "of its last position-changing step; QK attribution splits one head's score at a (query, key) pair "
        "over pairs of nodes at the two positions. Both are exact on the local replacement model; the "
        "edits of section 3 test them on the real model.",
        "",
        "## Summary",
        "",
        "| head | edited group | predicted Δ gap | measured Δ gap | attention → Mary | attention as "
        f"predicted | P(`{ANSWER!r}`) | answer as predicted |",
        "|---|---|---:|---:|---|---|---|---|",
        *ctx.summary,
        "",
        "The gap is the head's score at ` Mary` minus its score at the first ` John`; the rule and the "
        "details are in section 3.",
        "",
    ]
    (out / "attention.md").write_text("\n".join(header + ctx.lines) + "\n")
    print(f"wrote {out / 'attention.md'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

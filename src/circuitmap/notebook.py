"""Graphs, feature dashboards and intervention results inside Jupyter (and any notebook front end that shows
HTML outputs: JupyterLab, Notebook, VS Code, Colab).

A graph displays as the explorer's read-only view: the same self-contained page ``circuitmap export-html``
writes, in an ``<iframe srcdoc>`` sized to the cell, so it needs no server and loads nothing from the
network. ``Graph``, ``GraphFolder`` and ``ComputedGraph`` display that way on their own (their
``_repr_html_``); ``show`` gives the options: supernodes, pins, pruning thresholds, labels from a feature
database, height. Feature dashboards (``FeatureDashboard``), intervention results (``InterventionResult``)
and checks (``CheckReport``) display as compact HTML tables built here.
"""

from __future__ import annotations

import copy
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from circuitmap.errors import CircuitmapError, GraphExportError
from circuitmap.graphs import Graph, GraphFolder, PruneConfig
from circuitmap.graphs.export import graph_json
from circuitmap.graphs.folder import viewer_document
from circuitmap.graphs.grouping import Grouping, group_features
from circuitmap.graphs.pruning import prune
from circuitmap.validation import check_number

if TYPE_CHECKING:
    from circuitmap.features import FeatureStore
    from circuitmap.features.store import FeatureDashboard
    from circuitmap.interventions import InterventionResult
    from circuitmap.interventions.check import CheckReport
    from circuitmap.pipeline import ComputedGraph

DEFAULT_HEIGHT = 720
"""Height of a graph's frame in the notebook, in pixels (its width follows the cell)."""
SHOWN_CONTEXTS = 5
"""Top contexts listed in a feature dashboard's table."""
SHOWN_TOKENS = 8
"""Tokens listed per logit-lens row of a feature dashboard's table."""

_TABLE_STYLE = (
    "border-collapse:collapse;font-size:12px;font-family:ui-sans-serif,system-ui,sans-serif;margin:4px 0"
)
_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top"
_MONO = "font-family:ui-monospace,monospace"
_NUMBER = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:right;font-variant-numeric:tabular-nums"


@dataclass
class GraphView:
    """A graph's viewer document, shown by a notebook as the explorer's read-only view."""

    document: dict
    """The viewer document (``graph_json``'s layout) with the supernodes and pins to show."""
    height: int = DEFAULT_HEIGHT
    """Height of the frame in pixels."""

    def html(self) -> str:
        """The whole self-contained page, as ``circuitmap export-html`` writes it."""
        from circuitmap.server.export_html import render_html

        return render_html(self.document)

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (an ``.html`` file that opens offline in any browser)."""
        from circuitmap.server.export_html import export_html

        return export_html(self.document, path)

    def _repr_html_(self) -> str:
        # In a single-quoted attribute only "&" and "'" need escaping: the page's many double quotes stay
        # as they are, which keeps the output about 40% smaller than escaping everything.
        page = self.html().replace("&", "&amp;").replace("'", "&#39;")
        title = html.escape(str(self.document["metadata"].get("slug", "graph")), quote=True)
        return (
            f"<iframe srcdoc='{page}' title=\"circuitmap graph {title}\" "
            f'style="width:100%;height:{self.height}px;border:1px solid #ddd;border-radius:4px" '
            'loading="eager"></iframe>'
        )


def show(
    graph: Graph | GraphFolder | ComputedGraph | dict | str | Path,
    *,
    supernodes: Grouping | Sequence[Sequence[str]] | None = None,
    pinned: Sequence[str] = (),
    pruning: PruneConfig | None = None,
    features: FeatureStore | None = None,
    height: int = DEFAULT_HEIGHT,
) -> GraphView:
    """A graph as the explorer's read-only view, for a notebook cell (see the module docstring).

    ``graph``: a ``Graph`` (pruned here with ``pruning``, every supernode member and pinned node kept), a
    ``ComputedGraph``, a ``GraphFolder`` or its path,
    a ``graph.json`` or ``.safetensors`` file, or a viewer document. ``supernodes``: the groups to show, as
    ``group_features`` returns them or as ``[label, node id, …]`` lists; they replace the document's own
    (``[]`` shows none). ``None`` keeps the document's, or groups a ``Graph``'s features automatically.
    ``pinned``: node ids to pin besides the supernodes' members. ``features``: a feature database whose
    labels name unlabelled features. The source is never modified.
    """
    check_number("height", height, low=100, high=10_000, whole=True)
    groups = None if supernodes is None else _supernode_lists(supernodes)
    if isinstance(graph, Graph):
        document = _graph_document(graph, pruning, groups, list(pinned))
    else:
        document = _document(graph, pruning)
        if groups is not None:
            _set_supernodes(document, groups)
        if pinned:
            _pin(document, list(pinned))
    if features is not None:
        from circuitmap.features.graph_labels import add_feature_labels

        add_feature_labels(document, features)
    return GraphView(document, height)


def _graph_document(
    graph: Graph, pruning: PruneConfig | None, groups: list[list[str]] | None, pinned: list[str]
) -> dict:
    """A graph's viewer document, pruned, with ``groups`` (automatic ones when None) and ``pinned`` kept
    even where pruning would drop them."""
    kept = prune(graph, pruning)
    if groups is None:
        groups = [group.as_supernode() for group in group_features(graph, kept).groups]
    try:
        return graph_json(graph, pruning, kept=kept, pinned=pinned, supernodes=groups)
    except GraphExportError as error:
        raise CircuitmapError(f"cannot show the graph: {error}") from None


def _document(source, pruning: PruneConfig | None) -> dict:
    """A fresh viewer document of ``source`` (a copy: showing never changes what the caller holds)."""
    from circuitmap.pipeline import ComputedGraph

    if isinstance(source, ComputedGraph):
        return copy.deepcopy(source.document)
    if isinstance(source, GraphFolder):
        return viewer_document(source.path, pruning)
    if isinstance(source, dict):
        if not {"metadata", "qParams", "nodes", "links"} <= set(source):
            raise CircuitmapError("a viewer document needs metadata, qParams, nodes and links (graph_json's)")
        return copy.deepcopy(source)
    if isinstance(source, str | Path):
        return viewer_document(source, pruning)
    raise CircuitmapError(
        f"cannot show a {type(source).__name__}: give a Graph, a ComputedGraph, a GraphFolder, a path or a "
        "viewer document"
    )


def _supernode_lists(supernodes: Grouping | Sequence[Sequence[str]]) -> list[list[str]]:
    """Supernodes as ``[label, node id, …]`` lists, each checked for its form."""
    groups = (
        [group.as_supernode() for group in supernodes.groups]
        if isinstance(supernodes, Grouping)
        else [list(group) for group in supernodes]
    )
    for group in groups:
        if len(group) < 2 or not all(isinstance(part, str) for part in group):
            raise CircuitmapError(
                f"a supernode is [label, node id, …] with at least one member, not {group!r}"
            )
    return groups


def _set_supernodes(document: dict, groups: list[list[str]]) -> None:
    """Replace a document's supernodes by ``groups`` (whose members must be nodes of it), members pinned."""
    known = {node["node_id"] for node in document["nodes"]}
    for group in groups:
        missing = [member for member in group[1:] if member not in known]
        if missing:
            raise CircuitmapError(
                f"supernode {group[0]!r}: {missing[0]} is not a node of the shown graph (pruned away? show "
                "the Graph itself, which keeps every member)"
            )
    params = document["qParams"]
    grouped = {member for group in params["supernodes"] for member in group[1:]}
    members = [member for group in groups for member in group[1:]]
    params["pinnedIds"] = list(
        dict.fromkeys([*[i for i in params["pinnedIds"] if i not in grouped], *members])
    )
    params["supernodes"] = groups


def _pin(document: dict, ids: list[str]) -> None:
    known = {node["node_id"] for node in document["nodes"]}
    missing = [identifier for identifier in ids if identifier not in known]
    if missing:
        raise CircuitmapError(f"cannot pin {missing[0]}: it is not a node of the shown graph")
    params = document["qParams"]
    params["pinnedIds"] = list(dict.fromkeys([*params["pinnedIds"], *ids]))


def dashboard_html(dashboard: FeatureDashboard, contexts: int = SHOWN_CONTEXTS) -> str:
    """A feature dashboard as a compact HTML table: label, statistics, logit lens, input tokens and the top
    ``contexts`` contexts with the peak token in bold."""
    label = dashboard.label
    title = "(no label)" if label is None else label.text
    source = (
        ""
        if label is None
        else f" [{label.source}"
        + (f", confidence {label.confidence:.2f}]" if label.confidence is not None else "]")
    )
    rows = [
        ("density", f"{dashboard.density:.3e} ({dashboard.active_tokens:,} tokens)"),
        (
            "activation",
            f"max {dashboard.max_activation:.4g}, mean when active {dashboard.mean_activation:.4g}",
        ),
        ("promotes", _tokens(dashboard.output_top)),
        ("suppresses", _tokens(dashboard.output_bottom)),
        ("input tokens", _tokens(dashboard.input_top)),
    ]
    body = "".join(
        f'<tr><th style="{_CELL}">{name}</th><td style="{_CELL}">{value}</td></tr>' for name, value in rows
    )
    examples = "".join(
        f'<tr><td style="{_NUMBER}">{example.max_activation:.4g}</td>'
        f'<td style="{_CELL};{_MONO}">{_context(example.tokens, example.peak)}</td></tr>'
        for example in dashboard.top_examples[:contexts]
    )
    return (
        f"<div><b>layer {dashboard.layer} feature {dashboard.feature}</b>: {html.escape(title)}"
        f'<span style="color:#777">{html.escape(source)}</span>'
        f'<table style="{_TABLE_STYLE}">{body}</table>'
        f'<table style="{_TABLE_STYLE}"><tr><th style="{_NUMBER}">max</th>'
        f'<th style="{_CELL}">top contexts</th></tr>{examples}</table></div>'
    )


def intervention_html(result: InterventionResult) -> str:
    """An intervention result as HTML tables: the edits, the target tokens before and after, the top next
    tokens before and after, and the features whose activation changed most."""
    edits = "".join(f"<li>{html.escape(edit)}</li>" for edit in result.edits[:10])
    if len(result.edits) > 10:
        edits += f"<li>… and {len(result.edits) - 10} more</li>"
    parts = [
        f"<div><b>{html.escape(repr(result.prompt))}</b> ({html.escape(result.mode.replace('_', '-'))})",
        f'<ul style="margin:2px 0;font-size:12px">{edits}</ul>' if edits else "",
    ]
    if result.targets:
        parts.append(
            _table(
                ["token", "logit before", "after", "prob before", "after"],
                [
                    [
                        repr(t.token),
                        f"{t.logit_before:.3f}",
                        f"{t.logit_after:.3f}",
                        f"{t.prob_before:.4f}",
                        f"{t.prob_after:.4f}",
                    ]
                    for t in result.targets
                ],
            )
        )
    parts.append(
        _table(
            ["top before", "prob", "top after", "prob"],
            [
                [repr(before), f"{p_before:.4f}", repr(after), f"{p_after:.4f}"]
                for (before, p_before), (after, p_after) in zip(
                    result.top_before, result.top_after, strict=True
                )
            ],
        )
    )
    changes = result.feature_changes(SHOWN_CONTEXTS)
    if changes:
        parts.append(
            _table(
                ["feature (layer, index)", "position", "activation before", "after"],
                [
                    [
                        f"{layer}, {index}",
                        f"{position} {result.token_strings[position]!r}",
                        f"{before:.4g}",
                        f"{after:.4g}",
                    ]
                    for layer, position, index, before, after in changes
                ],
            )
        )
    return "".join(parts) + "</div>"


def check_html(report: CheckReport) -> str:
    """A check as an HTML table, one row per ablated node or supernode, and its agreement."""
    rows = [
        [
            row.name,
            row.kind,
            f"{row.influence:.4f}",
            f"{row.predicted:.3f}",
            f"{row.direct:.3f}",
            f"{row.observed:.3f}",
            "ok" if np.sign(row.predicted) == np.sign(row.observed) else "WRONG",
        ]
        for row in report.rows
    ]
    return (
        f"<div><b>{html.escape(repr(report.prompt))}</b> → {html.escape(repr(report.target))}: effect of "
        "ablating each node on the target's de-meaned logit"
        + _table(["node", "kind", "influence", "predicted", "direct", "observed", "sign"], rows)
        + f"sign agreement {report.sign_agreement:.2f} ({len(report.rows)} nodes), rank correlation "
        f"{report.rank_correlation:.2f}</div>"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f'<th style="{_CELL}">{html.escape(name)}</th>' for name in header)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_CELL}">{html.escape(value)}</td>' for value in row) + "</tr>"
        for row in rows
    )
    return f'<table style="{_TABLE_STYLE}"><tr>{head}</tr>{body}</table>'


def _tokens(pairs: list[tuple[str, float]]) -> str:
    return ", ".join(
        f"<code>{html.escape(repr(token))}</code> {value:+.2f}" for token, value in pairs[:SHOWN_TOKENS]
    )


def _context(tokens: list[str], peak: int) -> str:
    return "".join(
        f"<b>{html.escape(token)}</b>" if i == peak else html.escape(token) for i, token in enumerate(tokens)
    ).replace("\n", "⏎")

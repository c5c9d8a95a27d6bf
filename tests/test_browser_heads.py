"""Attention heads in a real browser: select a cross-position edge in the node panel, see the heads that carry
it as the library splits them, click one and see its attention pattern and strongest QK pairs as the server
computes them; the exported page shows stored loadings offline and says that QK needs the server.

Skipped like tests/test_browser.py when Chromium or playwright is missing (a failure in CI).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.browser import READY, Served, click_node, expect, open_graph, skip_without_browser
from helpers.graphs import write_graph_folder

from circuitmap.attribution import attribute
from circuitmap.attribution.heads import edge_targets, head_loadings, top_cross_position_edges
from circuitmap.attribution.qk import qk_attribution
from circuitmap.graphs import GraphFolder
from circuitmap.graphs.export import graph_json
from circuitmap.graphs.ids import index_by_id
from circuitmap.server import create_app, export_html
from circuitmap.server.heads import folder_heads

skip_without_browser()

PROMPT = "The cat sat"


@pytest.fixture(scope="module")
def tiny_graph(engine):
    return attribute(engine.model, engine.transcoders, PROMPT, progress=False)


@pytest.fixture(scope="module")
def document(tiny_graph) -> dict:
    return graph_json(tiny_graph, slug="cat")


def crossing_into_logit(graph, document: dict, edges: np.ndarray) -> int:
    """The first of ``edges`` that the document lists and whose target is a logit (always drawn)."""
    logits = {node["node_id"] for node in document["nodes"] if node["feature_type"] == "logit"}
    listed = {(link["source"], link["target"]) for link in document["links"]}
    ids = {node: identifier for identifier, node in index_by_id(graph).items()}
    for edge in edges.tolist():
        source, target = ids[int(graph.indices[edge])], ids[int(edge_targets(graph, np.array([edge]))[0])]
        if target in logits and (source, target) in listed:
            return edge
    raise AssertionError("no listed cross-position edge into a logit")


def open_edge(page, graph, edge: int) -> None:
    """Select the edge's target on the canvas, then the edge's heads button in its incoming edges."""
    ids = {node: identifier for identifier, node in index_by_id(graph).items()}
    click_node(page, ids[int(edge_targets(graph, np.array([edge]))[0])])
    source = ids[int(graph.indices[edge])]
    page.get_by_test_id("incoming-edges").locator(
        f'[data-testid="edge-heads"][data-node-id="{source}"]'
    ).click()


def test_select_an_edge_see_its_heads_and_explain_one(page, tmp_path, engine, tiny_graph, document):
    graph = tiny_graph
    edge = crossing_into_logit(graph, document, top_cross_position_edges(graph, 50))
    loadings = head_loadings(engine.model, engine.transcoders, graph, [edge]).matrix(edge)
    layer, head = (int(k) for k in np.unravel_index(np.abs(loadings).argmax(), loadings.shape))
    with Served(create_app(write_graph_folder(tmp_path, document, graph), engine)) as base:
        open_graph(page, base + "/graph/cat")
        open_edge(page, graph, edge)
        panel = page.get_by_test_id("heads")
        expect(panel).to_have_attribute("data-state", "done")
        rows = panel.get_by_test_id("head")
        expect(rows).to_have_count(min(12, int(np.count_nonzero(loadings))))
        expect(rows.first).to_have_attribute("data-layer", str(layer))
        expect(rows.first).to_have_attribute("data-head", str(head))
        expect(panel.get_by_test_id("heads-note")).to_contain_text("computed now")

        rows.first.click()
        view = panel.get_by_test_id("head-view")
        expect(view).to_have_attribute("data-state", "done")
        query = int(graph.position[edge_targets(graph, np.array([edge]))[0]])
        key = int(graph.position[graph.indices[edge]])
        n = len(graph.tokens)
        expect(view.locator("rect.pattern-cell")).to_have_count(n * (n + 1) // 2)
        expect(view.get_by_test_id("pattern-row")).to_contain_text(f"Query {query} ")
        with engine.lock:
            result = qk_attribution(engine.model, engine.transcoders, graph, layer, head, query, key)
        pairs = view.get_by_test_id("qk-pair")
        expect(pairs).to_have_count(12)
        expect(pairs.first).to_contain_text(f"{result.top_pairs(1)[0][2]:.4f}")
        expect(view.get_by_test_id("qk-score")).to_contain_text(f"score {result.score:.4f}")


def test_the_exported_page_shows_stored_heads_offline(page, tmp_path, engine, tiny_graph, document):
    graph = tiny_graph
    edges = top_cross_position_edges(graph, 6, by="influence")
    folder = GraphFolder(tmp_path / "cat")
    folder.write(graph, document, head_loadings(engine.model, engine.transcoders, graph, edges))
    edge = crossing_into_logit(graph, document, edges)
    page.goto(export_html(document, tmp_path / "cat.html", folder_heads(folder.path)).as_uri())
    page.wait_for_function(READY)
    open_edge(page, graph, edge)
    panel = page.get_by_test_id("heads")
    expect(panel).to_have_attribute("data-state", "done")
    expect(panel.get_by_test_id("heads-note")).to_contain_text("stored with the graph")
    panel.get_by_test_id("head").first.click()
    view = panel.get_by_test_id("head-view")
    expect(view).to_have_attribute("data-state", "unavailable")
    expect(view.get_by_test_id("head-note")).to_contain_text("--model and --transcoders")

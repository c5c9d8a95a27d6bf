"""The compare page (/compare/A/B) in a real browser (headless Chromium through Playwright): both graphs, the
prompts aligned on their last tokens, the supernode and feature tables with their bars, and errors.

Needs Debian's Chromium at /usr/bin/chromium and the playwright package; without them the module is skipped,
except in CI (CI=true), where a missing browser is a failure. Screenshots go to $CIRCUITMAP_TEST_ARTIFACTS,
or test-artifacts/screenshots in the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.browser import Served, artifacts_folder, expect, open_graph, skip_without_browser
from helpers.graphs import edited_graph, random_graph, with_first_tokens, write_graph_folder

from circuitmap.graphs import NodeKind, compare_graphs, node_influence
from circuitmap.graphs.export import graph_json
from circuitmap.server import create_app

skip_without_browser()

LONGER_PROMPT = "Well, the capital of Texas is"


@pytest.fixture
def graphs(tmp_path) -> Path:
    """Graphs ``a`` and ``b`` with saved supernodes: B is A behind a longer prompt, with A's most influential
    feature renamed and the edges out of its second one tripled."""
    graph_a = random_graph(2, n_layers=4, n_positions=5)
    features = graph_a.nodes_of(NodeKind.FEATURE)
    ranked = features[np.argsort(-node_influence(graph_a)[features], kind="stable")].tolist()
    graph_b = with_first_tokens(
        edited_graph(graph_a, ranked[0], 99, ranked[1], 3.0), ["Well", ","], LONGER_PROMPT
    )
    ids_a = [graph_a.node_id(node) for node in ranked[:6]]
    ids_b = [graph_b.node_id(node) for node in ranked[:6]]
    groups_a = [["capital", *ids_a[1:3]], ["state", ids_a[3]], ["lost", ids_a[0]]]
    groups_b = [["capital city", *ids_b[1:4]], ["new group", ids_b[5]]]
    write_graph_folder(tmp_path, graph_json(graph_a, slug="a", supernodes=groups_a), graph_a, "a")
    return write_graph_folder(tmp_path, graph_json(graph_b, slug="b", supernodes=groups_b), graph_b, "b")


def signed(value: float) -> str:
    """A change as the page writes it."""
    return f"{'+' if value >= 0 else '−'}{abs(value):.4f}"


def test_the_page_shows_both_graphs_their_supernodes_and_features(page, graphs):
    comparison = compare_graphs(graphs / "a", graphs / "b")
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/compare/a/b")
        expect(page.get_by_test_id("message")).to_be_hidden()
        expect(page.get_by_test_id("compare-title")).to_have_text("a vs b")
        for side, graph in (("a", comparison.a), ("b", comparison.b)):
            expect(page.get_by_test_id(f"graph-link-{side}")).to_have_attribute("href", f"/graph/{side}")
            expect(page.get_by_test_id(f"prompt-{side}")).to_have_text(graph.prompt)
            expect(page.get_by_test_id(f"target-{side}")).to_have_text('" Austin" (p=0.600)')
        alignment = page.get_by_test_id("token-alignment")
        expect(alignment.locator("tr")).to_have_count(3)
        expect(alignment.locator("tr").nth(2)).to_contain_text('"Well"')

        rows = page.get_by_test_id("supernode-row")
        matched = comparison.matched_supernodes
        assert [group.name_a for group in matched] == ["capital"]
        expect(rows).to_have_count(
            len(matched) + len(comparison.supernodes_only_in_a) + len(comparison.supernodes_only_in_b)
        )
        first = rows.first
        expect(first).to_have_attribute("data-status", "matched")
        expect(first).to_contain_text("capital city")
        expect(first).to_contain_text(signed(matched[0].change))
        expect(page.locator('[data-status="only-a"]')).to_have_count(len(comparison.supernodes_only_in_a))
        expect(page.locator('[data-status="only-b"]')).to_have_count(len(comparison.supernodes_only_in_b))
        width = first.locator(".bar.a").evaluate("bar => bar.getBoundingClientRect().width")
        assert width > 1

        tables = {
            "shared-features": comparison.shared_features,
            "features-only-in-a": comparison.features_only_in_a,
            "features-only-in-b": comparison.features_only_in_b,
        }
        for testid, features in tables.items():
            assert features
            rows = page.get_by_test_id(testid).get_by_test_id("feature-row")
            expect(rows).to_have_count(min(50, len(features)))
            expect(rows.first).to_contain_text(f"{features[0].layer}/{features[0].feature}")
        top_shared = comparison.shared_features[0]
        expect(page.get_by_test_id("shared-features").get_by_test_id("feature-row").first).to_contain_text(
            signed(top_shared.change)
        )
        renamed = next(feature for feature in comparison.features_only_in_b if feature.feature == 99)
        expect(page.get_by_test_id("features-only-in-b")).to_contain_text(f"{renamed.layer}/99")
        page.screenshot(path=str(artifacts_folder() / "compare.png"), full_page=True)


def test_the_page_shows_why_two_graphs_cannot_be_compared(page, graphs):
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/compare/a/nothing")
        expect(page.get_by_test_id("message")).to_contain_text("no graph named 'nothing'")
        expect(page.get_by_test_id("compare-view")).to_be_hidden()
        expect(page.get_by_test_id("home-link")).to_have_attribute("href", "/")
        page.screenshot(path=str(artifacts_folder() / "compare-error.png"))

"""The grouped default view in a real browser (headless Chromium through Playwright): the page opens on the
automatic supernodes with tokens and targets, labels drawn, the strongest summed links; a group expands into
its members; the full graph is one toggle away and loads every link on request; the document stays light.

Needs Debian's Chromium at /usr/bin/chromium and the playwright package; without them the module is skipped,
except in CI (CI=true), where a missing browser is a failure. Screenshots go to $CIRCUITMAP_TEST_ARTIFACTS,
or test-artifacts/screenshots in the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.browser import Served, artifacts_folder, expect, open_graph, skip_without_browser

from circuitmap.attribution import AttributionConfig
from circuitmap.graphs import PruneConfig
from circuitmap.graphs.folder import GraphFolder
from circuitmap.pipeline import compute_graph_folder
from circuitmap.server import create_app

skip_without_browser()

PROMPT = "The cat sat on the mat"
GROUPED_TARGETS = 3  # the grouped view's heaviest targets
GROUPED_LINKS = 60  # the grouped view's strongest summed links
EXPANDED_MEMBERS = 10  # members shown when a group opens


@pytest.fixture(scope="module")
def graphs(engine, tmp_path_factory) -> Path:
    """A graph folder with ``cat``: computed by the pipeline (automatic supernodes), its document limited to
    a few links so that the rest are served on request."""
    root = tmp_path_factory.mktemp("graphs")
    compute_graph_folder(
        engine.model,
        engine.transcoders,
        PROMPT,
        root / "cat",
        AttributionConfig(max_feature_nodes=80),
        PruneConfig(document_links=150),
        progress=False,
    )
    return root


def shot(page, name: str) -> None:
    page.screenshot(path=str(artifacts_folder() / f"{name}.png"))


def grouped_items(page):
    return page.locator('[data-testid="grouped-svg"] [data-testid="subgraph-node"]')


def test_the_page_opens_on_the_labelled_groups(page, graphs):
    document = GraphFolder(graphs / "cat").read_document()
    groups = document["qParams"]["supernodes"]
    assert 0 < len(groups) <= 30
    tokens = [n for n in document["nodes"] if n["feature_type"] == "embedding"]
    targets = [n for n in document["nodes"] if n["feature_type"] == "logit"]
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        expect(page.get_by_test_id("grouped-view")).to_be_visible()
        expect(page.get_by_test_id("graph-canvas")).to_be_hidden()
        expect(page.get_by_test_id("mode-grouped")).to_have_attribute("aria-pressed", "true")
        shown = len(groups) + len(tokens) + min(GROUPED_TARGETS, len(targets))
        expect(grouped_items(page)).to_have_count(shown)
        names = grouped_items(page).locator("text:not(.sg-count)").all_text_contents()
        for name, *_ in groups:
            assert any(name.startswith(text.rstrip("…")) for text in names), name
        links = page.locator('[data-testid="grouped-svg"] path.sg-edge').count()
        assert 0 < links <= GROUPED_LINKS
        expect(page.get_by_test_id("shown-counts")).to_contain_text(f"{len(groups)} supernodes")
        shot(page, "grouped-view")


def test_a_group_opens_into_its_members_and_the_full_graph_is_one_toggle_away(page, graphs):
    document = GraphFolder(graphs / "cat").read_document()
    name, *members = max(document["qParams"]["supernodes"], key=len)
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        before = grouped_items(page).count()
        box = grouped_items(page).filter(has_text=f"×{len(members)}").first
        box.click()
        opened = min(len(members), EXPANDED_MEMBERS) + (len(members) > EXPANDED_MEMBERS)
        expect(grouped_items(page)).to_have_count(before - 1 + opened)
        expect(page.get_by_test_id("supernode-title")).to_have_text(f"“{name}”")
        expect(page.get_by_test_id("shown-counts")).to_contain_text("1 expanded")
        shot(page, "grouped-view-expanded")
        page.get_by_test_id("mode-full").click()
        expect(page.get_by_test_id("graph-canvas")).to_be_visible()
        expect(page.get_by_test_id("grouped-view")).to_be_hidden()
        expect(page.get_by_test_id("node-threshold")).to_be_visible()
        expect(page.get_by_test_id("shown-counts")).to_contain_text("nodes")
        shot(page, "full-view")


def test_every_link_loads_on_request(page, graphs):
    document = GraphFolder(graphs / "cat").read_document()
    counts = document["metadata"]["n_edges"]
    assert counts["exported"] == len(document["links"]) == 150 < counts["pruned"]
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        page.get_by_test_id("mode-full").click()
        button = page.get_by_test_id("all-links-button")
        expect(button).to_have_text(f"All {counts['pruned']:,} links")
        expect(page.get_by_test_id("shown-counts")).to_contain_text("of 150 links")
        button.click()
        expect(button).to_be_hidden()
        expect(page.get_by_test_id("shown-counts")).to_contain_text(f"of {counts['pruned']:,} links")

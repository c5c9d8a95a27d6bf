"""Feature dashboards in a real browser: a feature node's dashboard (label, statistics, histogram with this
prompt's activation, contexts shaded by activation), editing its label, feature search, and the pages
without a database (a server without one, and the offline export).

Skipped like tests/test_browser.py when Chromium or playwright is missing (a failure in CI). Screenshots go
to the same artifacts folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.browser import (
    READY,
    Served,
    artifacts_folder,
    click_node,
    expect,
    open_graph,
    skip_without_browser,
    top_features,
    write_exported_html,
)
from helpers.features import build_engine_database
from helpers.graphs import write_graph_folder
from starlette.testclient import TestClient

from circuitmap.attribution import attribute
from circuitmap.features import FeatureStore
from circuitmap.graphs.export import graph_json
from circuitmap.server import create_app

skip_without_browser()

PROMPT = "The cat sat"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(engine, tmp_path_factory) -> Path:
    return build_engine_database(engine, tmp_path_factory.mktemp("features"))


@pytest.fixture
def features(built, tmp_path, engine):
    """A fresh copy of the database, opened as the server opens it."""
    path = tmp_path / "features.sqlite"
    path.write_bytes(built.read_bytes())
    with FeatureStore(path, transcoders=engine.transcoders) as store:
        yield store


@pytest.fixture(scope="module")
def document(engine) -> dict:
    graph = attribute(engine.model, engine.transcoders, PROMPT, progress=False)
    return graph_json(graph, slug="cat")


@pytest.fixture
def graphs(tmp_path, document) -> Path:
    return write_graph_folder(tmp_path, document)


@pytest.fixture
def screenshot():
    """``screenshot(target, name)`` saves a PNG of a page or an element into the artifacts folder."""
    folder = artifacts_folder()

    def take(target, name: str) -> Path:
        path = folder / f"{name}.png"
        target.screenshot(path=str(path))
        return path

    return take


# ---------------------------------------------------------------- helpers


def key_of(node_id: str) -> tuple[int, int]:
    layer, feature, _ = node_id.split("_")
    return int(layer), int(feature)


def shown_feature(document: dict, store: FeatureStore) -> dict:
    """An influential feature node of the graph whose feature has top contexts and a label."""
    for node_id in top_features(document, 20):
        layer, feature = key_of(node_id)
        if store.get(layer, feature).top_examples and store.label(layer, feature) is not None:
            return next(node for node in document["nodes"] if node["node_id"] == node_id)
    raise AssertionError("no feature of the graph has top contexts")


def absent_feature(document: dict, store: FeatureStore) -> tuple[int, int]:
    """A labelled feature of the database that the graph does not hold."""
    nodes = document["nodes"]
    present = {key_of(n["node_id"]) for n in nodes if n["feature_type"] == "cross layer transcoder"}
    for layer in range(store.n_layers):
        for feature in range(store.d_features):
            if (layer, feature) not in present and store.label(layer, feature) is not None:
                return layer, feature
    raise AssertionError("every labelled feature is in the graph")


def wait_for_dashboard(page, layer: int, feature: int):
    """The dashboard element, once it shows (layer, feature) fully."""
    dashboard = page.get_by_test_id("feature-dashboard")
    expect(dashboard).to_have_attribute("data-state", "ready")
    expect(dashboard).to_have_attribute("data-layer", str(layer))
    expect(dashboard).to_have_attribute("data-feature", str(feature))
    return dashboard


# ---------------------------------------------------------------- tests


def test_a_feature_node_shows_its_dashboard(page, graphs, document, features, screenshot):
    node = shown_feature(document, features)
    layer, feature = key_of(node["node_id"])
    expected = features.get(layer, feature)
    with Served(create_app(graphs, features=features)) as base:
        open_graph(page, base + "/graph/cat")
        expect(page.get_by_test_id("feature-search")).to_be_visible()
        click_node(page, node["node_id"])
        dashboard = wait_for_dashboard(page, layer, feature)

        expect(page.get_by_test_id("node-label")).to_have_value(expected.label.text)
        expect(dashboard.get_by_test_id("feature-label-text")).to_have_text(expected.label.text)
        expect(dashboard.get_by_test_id("feature-label-source")).to_contain_text("auto")
        expect(dashboard.get_by_test_id("feature-label-source")).to_contain_text("confidence")
        stats = dashboard.get_by_test_id("feature-stats")
        for fact in ("Density", "Max activation", "Mean activation", "This prompt"):
            expect(stats).to_contain_text(fact)

        marker = dashboard.get_by_test_id("histogram-marker")
        expect(marker).to_have_count(1)
        assert float(marker.get_attribute("data-value")) == pytest.approx(node["activation"])
        bars = dashboard.locator(".fd-bar")
        assert bars.count() == sum(1 for count in expected.histogram if count)

        contexts = dashboard.get_by_test_id("feature-top-contexts").get_by_test_id("feature-context")
        expect(contexts).to_have_count(len(expected.top_examples))
        first = expected.top_examples[0]
        peak = contexts.first.locator(".tok.peak")
        expect(peak).to_have_count(1)
        assert float(peak.get_attribute("data-value")) == pytest.approx(first.max_activation, rel=1e-6)
        assert re.fullmatch(r'".*": \d+\.\d{3}', peak.get_attribute("title"), re.DOTALL)
        assert peak.evaluate("element => element.style.backgroundColor").startswith("rgb")
        quiet = [k for k, value in enumerate(first.activations) if value == 0]
        if quiet:
            silent = contexts.first.locator(".tok").nth(quiet[0])
            assert silent.evaluate("element => element.style.backgroundColor") == ""
        groups = dashboard.get_by_test_id("feature-quantile")
        expect(groups).to_have_count(len(expected.quantile_groups))
        expect(groups.last).to_contain_text("100%")
        expect(dashboard.get_by_test_id("feature-lens")).to_contain_text("input tokens")
        expect(page.get_by_test_id("lens-section")).to_be_hidden()

        dashboard.scroll_into_view_if_needed()
        screenshot(page, "feature-dashboard")
        panel = page.get_by_test_id("node-panel")
        screenshot(panel, "feature-dashboard-panel")
        contexts.first.scroll_into_view_if_needed()
        screenshot(panel, "feature-dashboard-contexts")


def test_a_label_edit_is_saved_in_the_database(page, graphs, document, features, screenshot):
    node = shown_feature(document, features)
    layer, feature = key_of(node["node_id"])
    with Served(create_app(graphs, features=features)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, node["node_id"])
        dashboard = wait_for_dashboard(page, layer, feature)
        dashboard.get_by_test_id("feature-label-input").fill("sitting cats")
        dashboard.get_by_test_id("feature-label-author").fill("Ada")
        dashboard.get_by_test_id("feature-label-save").click()
        expect(dashboard.get_by_test_id("feature-label-status")).to_have_text("saved")
        expect(dashboard.get_by_test_id("feature-label-text")).to_have_text("sitting cats")
        source = dashboard.get_by_test_id("feature-label-source")
        expect(source).to_contain_text("manual")
        expect(source).to_contain_text("by Ada")
        expect(source).to_contain_text("UTC")
        expect(page.get_by_test_id("node-label")).to_have_value("sitting cats")
        screenshot(page, "feature-label-saved")

        with FeatureStore(features.path) as fresh:
            label = fresh.label(layer, feature)
            assert (label.text, label.source, label.author) == ("sitting cats", "manual", "Ada")

        open_graph(page, base + "/graph/cat")
        click_node(page, node["node_id"])
        expect(page.get_by_test_id("node-label")).to_have_value("sitting cats")
        dashboard = wait_for_dashboard(page, layer, feature)
        expect(dashboard.get_by_test_id("feature-label-author")).to_have_value("Ada")
    assert "sitting cats" not in (graphs / "cat" / "graph.json").read_text()


def test_search_opens_features_in_and_out_of_the_graph(page, graphs, document, features, screenshot):
    node = shown_feature(document, features)
    layer, feature = key_of(node["node_id"])
    elsewhere = absent_feature(document, features)
    with Served(create_app(graphs, features=features)) as base:
        open_graph(page, base + "/graph/cat")
        box = page.get_by_test_id("feature-search-input")
        box.fill(f"{layer}/{feature}")
        hit = page.get_by_test_id("feature-hit")
        expect(hit).to_have_count(1)
        expect(hit).to_contain_text("in graph")
        hit.click()
        expect(page.get_by_test_id("node-id")).to_have_text(re.compile(rf"^{layer}_{feature}_\d+$"))
        wait_for_dashboard(page, layer, feature)

        box.fill(f"L{elsewhere[0]}:{elsewhere[1]}")
        expect(hit).to_have_count(1)
        expect(hit).not_to_contain_text("in graph")
        hit.click()
        dashboard = wait_for_dashboard(page, *elsewhere)
        expect(dashboard.get_by_test_id("feature-heading")).to_contain_text("not in this graph")
        expect(page.get_by_test_id("node-id")).to_be_hidden()
        expect(dashboard.get_by_test_id("histogram-marker")).to_have_count(0)
        expect(dashboard.get_by_test_id("feature-label-text")).to_have_text(features.label(*elsewhere).text)
        screenshot(page, "feature-search-absent")

        word = features.label(layer, feature).text.split()[0]
        box.fill(word)
        box.press("Enter")
        expect(page.get_by_test_id("feature-hit").first).to_be_visible()
        expect(page.get_by_test_id("feature-dashboard")).to_have_attribute("data-state", "ready")
        box.blur()
        page.keyboard.press("Escape")
        expect(page.get_by_test_id("feature-dashboard")).to_be_empty()
        expect(page.get_by_test_id("panel-body")).to_be_hidden()


def test_without_a_database_the_dashboard_says_so(page, graphs, document):
    feature = top_features(document, 1)[0]
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        expect(page.get_by_test_id("feature-search")).to_be_hidden()
        click_node(page, feature)
        expect(page.get_by_test_id("feature-dashboard")).to_contain_text("No feature database")
        expect(page.get_by_test_id("lens-section")).to_be_visible()


def test_the_exported_page_shows_the_lens_and_no_dashboard(page, graphs, features, tmp_path):
    with TestClient(create_app(graphs, features=features), base_url="http://localhost") as client:
        served = client.get("/api/graphs/cat").json()
    assert any("label_source" in node for node in served["nodes"])
    served["nodes"] = [
        {**node, "lens": {"top": [[" up", 1.5]], "bottom": [[" down", -1.5]]}}
        if node["feature_type"] == "cross layer transcoder"
        else node
        for node in served["nodes"]
    ]
    html = write_exported_html(served, tmp_path / "cat.html")
    page.goto(html.as_uri())
    page.wait_for_function(READY)
    expect(page.get_by_test_id("feature-search")).to_be_hidden()
    feature = top_features(served, 1)[0]
    click_node(page, feature)
    expect(page.get_by_test_id("lens-body")).to_contain_text("up")
    expect(page.get_by_test_id("feature-dashboard")).to_be_empty()
    label = next(node["clerp"] for node in served["nodes"] if node["node_id"] == feature)
    expect(page.get_by_test_id("node-label")).to_have_value(label)

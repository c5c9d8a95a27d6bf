"""Interventions in a real browser: ablate a feature node and scale a supernode from the node panel, see the
original and edited next tokens and continuations side by side (as the library computes them), errors
inline, and the pages that cannot intervene (a server without a model, the offline export).

Skipped like tests/test_browser.py when Chromium or playwright is missing (a failure in CI).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.browser import (
    READY,
    Served,
    click_node,
    expect,
    open_graph,
    skip_without_browser,
    top_features,
    write_exported_html,
)
from helpers.graphs import write_graph_folder

from circuitmap.attribution import attribute
from circuitmap.graphs.export import graph_json
from circuitmap.interventions import FeatureEdit, Supernode, generate_with, intervene
from circuitmap.server import create_app

skip_without_browser()

PROMPT = "The cat sat"
GROUP = "cat pair"


@pytest.fixture(scope="module")
def tiny_graph(engine):
    return attribute(engine.model, engine.transcoders, PROMPT, progress=False)


@pytest.fixture(scope="module")
def document(tiny_graph) -> dict:
    """The graph's document with a saved supernode of two features and an error node."""
    plain = graph_json(tiny_graph, slug="cat")
    error = next(n["node_id"] for n in plain["nodes"] if n["feature_type"] == "mlp reconstruction error")
    members = [*top_features(plain, 2), error]
    return graph_json(tiny_graph, slug="cat", pinned=members, supernodes=[[GROUP, *members]])


@pytest.fixture
def graphs(tmp_path, document, tiny_graph) -> Path:
    return write_graph_folder(tmp_path, document, tiny_graph)


def shown_tokens(column) -> list[str]:
    """The tokens of a result column, as written (spaces shown as ␣)."""
    return [code.text_content() for code in column.locator("code").all()]


def expect_result(panel, engine, edit) -> None:
    """The panel shows the original and edited runs of ``edit`` as the library gives them (computed under
    the engine's lock: the model's hooks are shared with the server)."""
    model, transcoders = engine.model, engine.transcoders
    expect(panel).to_have_attribute("data-state", "done")
    with engine.lock:
        result = intervene(model, transcoders, PROMPT, edit, freeze_attention=False)
        before = model.generate(PROMPT, 20)
        after = generate_with(model, transcoders, PROMPT, edit, 20)
    expect(panel.get_by_test_id("intervention-edits")).to_have_text("; ".join(result.edits))
    for testid, top, continuation in (
        ("intervention-original", result.top_before, before),
        ("intervention-edited", result.top_after, after),
    ):
        column = panel.get_by_test_id(testid)
        expect(column.get_by_test_id("intervention-token")).to_have_count(len(top))
        visible = [token.replace(" ", "\u2423").replace("\n", "\u21b5") for token, _ in top]
        assert shown_tokens(column) == visible
        shown = column.get_by_test_id("intervention-continuation").text_content()
        assert shown == f"\u2026{continuation}"


def test_ablate_a_feature_node(page, graphs, document, engine):
    feature = top_features(document, 1)[0]
    with Served(create_app(graphs, engine)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, feature)
        panel = page.get_by_test_id("intervention")
        expect(panel).to_have_attribute("data-state", "idle")
        expect(panel.get_by_test_id("intervention-factor")).to_have_value("0")
        with engine.lock:
            panel.get_by_test_id("intervention-ablate").click()
            expect(panel.get_by_test_id("intervention-busy")).to_be_visible()
            expect(panel.get_by_test_id("intervention-scale")).to_be_disabled()
        expect_result(panel, engine, FeatureEdit.ablate(feature))
        expect(panel.get_by_test_id("intervention-busy")).to_be_hidden()

        other = top_features(document, 2)[1]
        click_node(page, other)
        expect(panel).to_have_attribute("data-state", "idle")
        expect(panel.get_by_test_id("intervention-result")).to_be_empty()
        click_node(page, feature)
        expect(panel).to_have_attribute("data-state", "done")

        panel.get_by_test_id("intervention-factor").fill("1e300")
        panel.get_by_test_id("intervention-scale").click()
        expect(panel.get_by_test_id("intervention-error")).to_contain_text("NaN or infinite")
        expect(panel.get_by_test_id("intervention-result")).to_be_empty()
        panel.get_by_test_id("intervention-factor").fill("")
        panel.get_by_test_id("intervention-factor").press("Enter")
        expect(panel.get_by_test_id("intervention-error")).to_contain_text("Type a number")


def test_scale_a_supernode(page, graphs, document, engine):
    label, *members = document["qParams"]["supernodes"][0]
    features = members[:2]
    with Served(create_app(graphs, engine)) as base:
        open_graph(page, base + "/graph/cat")
        page.get_by_test_id("supernode-label").click()
        expect(page.get_by_test_id("supernode-details")).to_be_visible()
        expect(page.get_by_test_id("supernode-title")).to_contain_text(GROUP)
        expect(page.get_by_test_id("supernode-members").locator("button")).to_have_count(len(members))
        expect(page.get_by_test_id("node-details")).to_be_hidden()
        panel = page.get_by_test_id("intervention")
        expect(panel).to_contain_text(GROUP)
        expect(panel).to_contain_text("1 member(s) that are not features stay as they are")
        panel.get_by_test_id("intervention-factor").fill("0.5")
        panel.get_by_test_id("intervention-scale").click()
        expect_result(panel, engine, FeatureEdit.scale(Supernode(label, features), 0.5))

        page.get_by_test_id("supernode-members").locator("button").first.click()
        expect(page.get_by_test_id("node-id")).to_have_text(members[0])
        expect(page.get_by_test_id("supernode-details")).to_be_hidden()


def test_without_a_model_the_control_explains_why(page, graphs, document, tmp_path):
    feature = top_features(document, 1)[0]
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, feature)
        panel = page.get_by_test_id("intervention")
        expect(panel).to_have_attribute("data-state", "unavailable")
        expect(panel.get_by_test_id("intervention-note")).to_contain_text("--model and --transcoders")
        expect(panel.get_by_test_id("intervention-ablate")).to_be_disabled()
        expect(panel.get_by_test_id("intervention-scale")).to_be_disabled()

    page.goto(write_exported_html(document, tmp_path / "cat.html").as_uri())
    page.wait_for_function(READY)
    click_node(page, feature)
    pin = page.get_by_test_id("pin-button")
    before = pin.text_content()
    page.keyboard.press("p")
    expect(pin).not_to_have_text(before)
    expect(page.get_by_test_id("intervention")).to_be_empty()
    expect(page.get_by_test_id("intervention")).to_be_hidden()

"""The persona panel in a real browser: it appears when the server has vectors, shows the selected feature
node's projection at the chosen vector and layer, projects a prompt and a response token by token and steers
a continuation beside the unsteered one, as the library computes them; hidden without vectors and in the
exported page.

Skipped like tests/test_browser.py when Chromium or playwright is missing (a failure in CI).
"""

from __future__ import annotations

import pytest
from helpers.browser import (
    READY,
    Served,
    click_node,
    expect,
    open_graph,
    skip_without_browser,
    write_exported_html,
)
from helpers.persona_explorer import GRAPH_PROMPT, persona_engine, write_persona_graph, write_vector

from circuitmap.graphs.ids import parse_feature_id
from circuitmap.persona import chat_ids, project, steer
from circuitmap.server import create_app
from circuitmap.server.personas import load_personas

skip_without_browser()

FEATURE_TYPE = "cross layer transcoder"
RESPONSE = "Yes, gladly."


@pytest.fixture(scope="module")
def chat_engine():
    return persona_engine()


@pytest.fixture(scope="module")
def served(tmp_path_factory, chat_engine):
    """The graph folder (graph ``cat``, pruned), its document, and two vectors: ``glad`` (default layer 3)
    and ``sad`` (default layer 2)."""
    root = tmp_path_factory.mktemp("persona")
    graphs, document = write_persona_graph(root, chat_engine, prune=True)
    paths = [
        write_vector(root, "glad", chat_engine.model, seed=1, best_layer=3),
        write_vector(root, "sad", chat_engine.model, seed=2),
    ]
    return graphs, document, load_personas(paths, chat_engine.model)


def feature_of_layer(document: dict, layer: int) -> dict:
    """The most influential feature node of ``layer``."""
    nodes = [n for n in document["nodes"] if n["feature_type"] == FEATURE_TYPE and n["layer"] == str(layer)]
    return min(nodes, key=lambda node: node["influence"])


def node_projection(engine, vector, node: dict, layer: int) -> float:
    """The node's activation times its decoder row dotted with the vector's unit direction at ``layer``."""
    source, feature, _ = parse_feature_id(node["node_id"])
    direction = vector.layer(layer).double()
    decoder = engine.transcoders.decoder_vectors(source, [feature])[0].double()
    return node["activation"] * float(decoder @ (direction / direction.norm()))


def test_the_selected_node_shows_its_projection(page, served, chat_engine):
    graphs, document, vectors = served
    with Served(create_app(graphs, chat_engine, personas=vectors)) as base:
        open_graph(page, base + "/graph/cat")
        panel = page.get_by_test_id("persona")
        expect(panel).to_be_visible()
        expect(panel.get_by_test_id("persona-vector").locator("option")).to_have_count(2)
        expect(panel.get_by_test_id("persona-vector")).to_have_value("glad")
        expect(panel.get_by_test_id("persona-layer")).to_have_value("3")
        shown = panel.get_by_test_id("persona-node")
        expect(shown).to_contain_text("Select a feature node")

        node = feature_of_layer(document, 1)
        click_node(page, node["node_id"])
        expected = node_projection(chat_engine, vectors["glad"], node, 3)
        expect(shown).to_have_attribute("data-state", "done")
        assert float(shown.get_attribute("data-value")) == pytest.approx(expected, rel=1e-9)
        expect(shown).to_have_text(f"projection at layer 3: {expected:+.3f}")
        expect(shown).to_have_class(f"pv-node {'positive' if expected >= 0 else 'negative'}")

        panel.get_by_test_id("persona-vector").select_option("sad")
        expect(panel.get_by_test_id("persona-layer")).to_have_value("2")
        expected = node_projection(chat_engine, vectors["sad"], node, 2)
        expect(shown).to_have_text(f"projection at layer 2: {expected:+.3f}")

        later = feature_of_layer(document, 3)
        click_node(page, later["node_id"])
        expect(shown).to_have_text("A feature of layer 3 writes after the residual entering layer 2.")
        panel.get_by_test_id("persona-layer").fill("9")
        panel.get_by_test_id("persona-layer").press("Enter")
        expect(shown).to_have_text("Type a layer from 0 to 3.")


def test_project_lists_tokens_and_steer_shows_both_continuations(page, served, chat_engine):
    graphs, _, vectors = served
    model = chat_engine.model
    with Served(create_app(graphs, chat_engine, personas=vectors)) as base:
        open_graph(page, base + "/graph/cat")
        panel = page.get_by_test_id("persona")
        expect(panel.get_by_test_id("persona-prompt")).to_have_value(GRAPH_PROMPT)
        result = panel.get_by_test_id("persona-projection")

        panel.get_by_test_id("persona-project").click()
        expect(result).to_have_attribute("data-state", "done")
        with chat_engine.lock:
            expected = project(model, vectors["glad"], 3, GRAPH_PROMPT, RESPONSE)
        expect(result.get_by_test_id("persona-summary")).to_have_text(
            f"last prompt token {expected.last_prompt:+.3f}"
        )
        expect(result.get_by_test_id("persona-token")).to_have_count(0)

        panel.get_by_test_id("persona-response").fill(RESPONSE)
        panel.get_by_test_id("persona-project").click()
        tokens = result.get_by_test_id("persona-token")
        expect(tokens).to_have_count(len(expected.tokens))
        last, mean = f"{expected.last_prompt:+.3f}", f"{expected.mean:+.3f}"
        summary = f"last prompt token {last} \u00b7 mean over the response {mean}"
        expect(result.get_by_test_id("persona-summary")).to_have_text(summary)
        for k, value in enumerate(expected.per_token.tolist()):
            token = tokens.nth(k)
            assert float(token.get_attribute("data-value")) == pytest.approx(value, rel=1e-9)
            expect(token).to_have_class(f"pv-token {'positive' if value >= 0 else 'negative'}")
            expect(token.locator("code")).to_have_text(expected.tokens[k].replace(" ", "\u2423"))

        steering = panel.get_by_test_id("persona-steering")
        expect(panel.get_by_test_id("persona-coefficient")).to_have_value("0.5")
        panel.get_by_test_id("persona-coefficient").fill("3")
        panel.get_by_test_id("persona-steer").click()
        expect(steering).to_have_attribute("data-state", "done")
        with chat_engine.lock:
            ids = chat_ids(model, GRAPH_PROMPT)
            unsteered = model.generate(ids, 20)
            with steer(model, vectors["glad"], 3, 3.0, relative=True, prompt=ids) as handle:
                steered = model.generate(ids, 20, before_forward=handle.at_position)
        assert steered != unsteered
        expect(steering.get_by_test_id("persona-unsteered")).to_have_text(unsteered)
        expect(steering.get_by_test_id("persona-steered")).to_have_text(steered)

        panel.get_by_test_id("persona-prompt").fill("")
        panel.get_by_test_id("persona-steer").click()
        expect(steering.get_by_test_id("persona-error")).to_have_text("Could not steer: the prompt is empty")


def test_the_panel_is_hidden_without_vectors_and_in_the_export(page, served, chat_engine, tmp_path):
    graphs, document, _ = served
    node = feature_of_layer(document, 1)["node_id"]
    with Served(create_app(graphs, chat_engine)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, node)
        expect(page.get_by_test_id("persona")).to_be_hidden()
        expect(page.get_by_test_id("persona")).to_be_empty()
    page.goto(write_exported_html(document, tmp_path / "cat.html").as_uri())
    page.wait_for_function(READY)
    click_node(page, node)
    expect(page.get_by_test_id("persona")).to_be_hidden()

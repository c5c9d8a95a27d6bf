"""The explorer in a real browser (headless Chromium through Playwright): graph list, graph view, saved state,
computing a graph, the offline export, client-side scores and node ids against Python, and a large page.

Needs Debian's Chromium at /usr/bin/chromium and the playwright package; without them the module is skipped,
except in CI (CI=true), where a missing browser is a failure. Screenshots go to $CIRCUITMAP_TEST_ARTIFACTS,
or test-artifacts/screenshots in the repository. (benchmarks/explorer.py times the large page.)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from urllib.parse import quote

import jsonschema
import pytest
from helpers.browser import (
    READY,
    Served,
    artifacts_folder,
    click_node,
    expect,
    node_position,
    open_graph,
    pick_nodes,
    read_document,
    skip_without_browser,
    synthetic_document,
    top_features,
    write_exported_html,
)
from helpers.graphs import write_graph_folder

from circuitmap.attribution import attribute
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import subgraph_scores
from circuitmap.graphs.export import graph_json, json_schema, write_graph_json
from circuitmap.graphs.ids import parse_node_id
from circuitmap.server import create_app

skip_without_browser()

PROMPT = "The cat sat"
EDGE_ROWS = 30  # edges the panel lists before "show all"
TARGET_CLERP = re.compile(r'^Output "(.*)" \(p=[0-9.]+\)$', re.DOTALL)
# Ctrl+S twice, P (pins the selected node), Ctrl+S again: all in one task, while the first save runs.
SAVE_SAVE_PIN_SAVE = """
() => {
  const press = (key, ctrlKey) =>
    document.body.dispatchEvent(new KeyboardEvent('keydown', { key, ctrlKey, bubbles: true }));
  press('s', true);
  press('s', true);
  press('p', false);
  press('s', true);
}
"""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_graph(engine):
    return attribute(engine.model, engine.transcoders, PROMPT, progress=False)


@pytest.fixture
def graphs(tmp_path, tiny_graph) -> Path:
    """A graph folder holding one pruned graph, ``cat``, with its full graph (so scores are exact)."""
    return write_graph_folder(tmp_path, graph_json(tiny_graph, slug="cat"), tiny_graph)


@pytest.fixture
def screenshot():
    """``screenshot(page, name)`` saves a PNG of the page into the artifacts folder."""
    artifacts = artifacts_folder()

    def take(page, name: str) -> Path:
        path = artifacts / f"{name}.png"
        page.screenshot(path=str(path))
        return path

    return take


# ---------------------------------------------------------------- helpers


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def inked_pixels(page) -> int:
    """How many pixels of the graph's base canvas are drawn on (red channel below 200)."""
    return page.evaluate(
        """() => {
          const canvas = document.querySelector('[data-testid="graph-base"]');
          const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
          let inked = 0;
          for (let k = 0; k < pixels.length; k += 4) if (pixels[k] < 200) inked++;
          return inked;
        }"""
    )


def python_scores(graph, pinned: list[str], supernodes: list[list[str]]) -> tuple[float | None, ...]:
    scores = subgraph_scores(graph, pinned, [group[1:] for group in supernodes])
    return tuple(None if math.isnan(v) else v for v in (scores.replacement, scores.completeness))


# ---------------------------------------------------------------- tests


def test_list_open_and_inspect_a_node(page, graphs, screenshot):
    document = read_document(graphs, "cat")
    with Served(create_app(graphs)) as base:
        page.goto(base + "/")
        row = page.get_by_test_id("graph-row")
        expect(row).to_have_count(1)
        expect(row).to_contain_text(PROMPT)
        expect(row).to_contain_text("tiny-llama")
        screenshot(page, "list")
        row.get_by_test_id("graph-link").click()
        page.wait_for_url(base + "/graph/cat")
        page.wait_for_function(READY)
        expect(page.get_by_test_id("graph-title")).to_have_text("cat")

        feature = top_features(document, 1)[0]
        node = next(n for n in document["nodes"] if n["node_id"] == feature)
        click_node(page, feature)
        expect(page.get_by_test_id("node-layer")).to_have_text(node["layer"])
        expect(page.get_by_test_id("node-position")).to_contain_text(str(node["ctx_idx"]))
        expect(page.get_by_test_id("node-label")).to_have_value(node["clerp"])
        incoming = [link for link in document["links"] if link["target"] == feature]
        outgoing = [link for link in document["links"] if link["source"] == feature]
        for direction, links in (("incoming", incoming), ("outgoing", outgoing)):
            rows = page.get_by_test_id(f"{direction}-edges").get_by_test_id("edge")
            expect(rows).to_have_count(min(EDGE_ROWS, len(links)))
        expect(page.get_by_test_id("lens-body")).not_to_be_empty()
        screenshot(page, "graph-node-selected")

        first = page.get_by_test_id("incoming-edges").get_by_test_id("edge").first
        other = first.get_attribute("data-node-id")
        first.click()
        expect(page.get_by_test_id("node-id")).to_have_text(other)


def test_pin_group_label_save_and_reload(page, graphs, screenshot):
    document = read_document(graphs, "cat")
    a, b, c = top_features(document, 3)
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        for node_id in (a, b):
            click_node(page, node_id)
            page.keyboard.press("p")
        expect(page.get_by_test_id("pinned-item")).to_have_count(2)
        for box in page.get_by_test_id("pinned-check").all():
            box.check()
        page.get_by_test_id("group-button").click()
        page.get_by_test_id("dialog-input").fill("cat group")
        page.get_by_test_id("dialog-ok").click()
        expect(page.get_by_test_id("supernode-label")).to_have_text("cat group")

        click_node(page, c)
        page.get_by_test_id("node-label").fill("a renamed feature")
        expect(page.get_by_test_id("save-status")).to_have_text("unsaved changes")
        expect(page.get_by_test_id("score-basis")).to_have_text("exact")
        screenshot(page, "subgraph-before-save")
        page.get_by_test_id("save-button").click()
        expect(page.get_by_test_id("save-status")).to_have_text("saved")

        saved = read_document(graphs, "cat")
        assert set(saved["qParams"]["pinnedIds"]) == {a, b}
        assert saved["qParams"]["supernodes"] == [["cat group", a, b]]
        assert next(n for n in saved["nodes"] if n["node_id"] == c)["clerp"] == "a renamed feature"

        open_graph(page, base + "/graph/cat")
        assert page.evaluate("location.hash") == ""
        state = page.evaluate("window.circuitmapExplorer.state()")
        assert set(state["pinned"]) == {a, b}
        assert state["supernodes"] == [["cat group", a, b]]
        expect(page.get_by_test_id("supernode-label")).to_have_text("cat group")
        expect(page.get_by_test_id("node-id")).to_have_text(c)
        expect(page.get_by_test_id("node-label")).to_have_value("a renamed feature")
        expect(page.get_by_test_id("save-status")).not_to_have_text("unsaved changes")
        screenshot(page, "subgraph-after-reload")


def test_rename_delete_and_errors_are_shown(page, graphs, screenshot):
    with Served(create_app(graphs)) as base:
        page.goto(base + "/graph/missing")
        expect(page.get_by_test_id("message")).to_contain_text("missing")
        expect(page.get_by_test_id("home-link")).to_be_visible()
        page.goto(base + "/")
        page.get_by_test_id("rename-graph").click()
        page.get_by_test_id("dialog-input").fill(".hidden")
        page.get_by_test_id("dialog-ok").click()
        expect(page.locator("#dialog-error")).to_be_visible()
        page.get_by_test_id("dialog-input").fill("kitten")
        page.get_by_test_id("dialog-ok").click()
        expect(page.get_by_test_id("graph-link")).to_have_text("kitten")
        assert (graphs / "kitten" / "graph.json").exists() and not (graphs / "cat").exists()
        page.get_by_test_id("delete-graph").click()
        screenshot(page, "list-delete-confirm")
        page.get_by_test_id("dialog-ok").click()
        expect(page.get_by_test_id("graph-list-empty")).to_be_visible()
        assert not (graphs / "kitten").exists()


def test_a_stale_save_asks_to_reload(page, graphs):
    a = top_features(read_document(graphs, "cat"), 1)[0]
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, a)
        page.keyboard.press("p")
        changed = read_document(graphs, "cat")
        changed["qParams"]["clickedId"] = a
        write_graph_json(changed, graphs / "cat" / "graph.json")
        page.get_by_test_id("save-button").click()
        expect(page.get_by_test_id("save-status")).to_have_text("not saved")
        expect(page.get_by_test_id("message")).to_contain_text("Reload the page")
        assert read_document(graphs, "cat")["qParams"]["pinnedIds"] == []


def test_a_saved_label_typed_back_is_saved_and_reloads_clean(page, graphs):
    document = read_document(graphs, "cat")
    original = {n["node_id"]: n["clerp"] for n in document["nodes"]}
    feature = top_features(document, 1)[0]
    target = next(n for n in document["nodes"] if n["feature_type"] == "logit")
    target_id, target_name = target["node_id"], TARGET_CLERP.match(target["clerp"]).group(1)
    label = page.get_by_test_id("node-label")
    status = page.get_by_test_id("save-status")

    def relabel(texts: dict[str, str]) -> dict[str, str]:
        """Type each node's label, save, and return the clerps on disk."""
        for node_id, text in texts.items():
            click_node(page, node_id)
            label.fill(text)
        expect(status).to_have_text("unsaved changes")
        page.get_by_test_id("save-button").click()
        expect(status).to_have_text("saved")
        return {n["node_id"]: n["clerp"] for n in read_document(graphs, "cat")["nodes"]}

    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        saved = relabel({feature: "renamed feature", target_id: "renamed target"})
        assert saved[feature] == "renamed feature"
        assert saved[target_id] == f'Output "renamed target" (p={target["token_prob"]:.3f})'
        expect(label).to_have_value("renamed target")

        saved = relabel({feature: original[feature], target_id: target_name})
        assert saved[feature] == original[feature] and saved[target_id] == original[target_id]
        page.wait_for_function(
            "id => location.hash.includes(`node=${encodeURIComponent(id)}`)"
            " && !location.hash.includes('labels=')",
            arg=target_id,
        )
        page.reload()
        page.wait_for_function(READY)
        expect(page.get_by_test_id("node-id")).to_have_text(target_id)
        expect(label).to_have_value(target_name)
        expect(status).not_to_have_text("unsaved changes")
        click_node(page, feature)
        expect(label).to_have_value(original[feature])

        # A link taken before the save holds labels equal to the saved ones: they are no edits.
        labels = quote(json.dumps({target_id: target_name}))
        page.goto("about:blank")
        open_graph(page, f"{base}/graph/cat#node={quote(target_id)}&labels={labels}")
        assert page.evaluate("window.circuitmapExplorer.state()")["labels"] == {}
        expect(status).not_to_have_text("unsaved changes")


def test_saves_asked_for_during_a_save_do_not_conflict(page, graphs):
    a, b = top_features(read_document(graphs, "cat"), 2)
    puts: list[str] = []
    page.on("request", lambda request: puts.append(request.url) if request.method == "PUT" else None)
    with Served(create_app(graphs)) as base:
        open_graph(page, base + "/graph/cat")
        click_node(page, a)
        page.keyboard.press("p")
        click_node(page, b)
        page.evaluate(SAVE_SAVE_PIN_SAVE)
        page.wait_for_function("() => !window.circuitmapExplorer.saving()")
        expect(page.get_by_test_id("save-status")).to_have_text("saved")
        expect(page.get_by_test_id("message")).to_be_hidden()
        assert set(read_document(graphs, "cat")["qParams"]["pinnedIds"]) == {a, b}
        assert len(puts) == 2  # the first save, then one for the pin made while it ran


def test_compute_a_graph_from_the_list(page, graphs, engine, screenshot):
    with Served(create_app(graphs, engine=engine)) as base:
        page.goto(base + "/")
        expect(page.get_by_test_id("graph-row")).to_have_count(1)
        page.get_by_test_id("compute-prompt").fill("A dog ran")
        page.get_by_test_id("compute-name").fill("dog")
        page.get_by_test_id("compute-button").click()
        expect(page.get_by_test_id("job")).to_have_count(1)
        screenshot(page, "compute-job")
        page.wait_for_url(base + "/graph/dog", timeout=60_000)
        page.wait_for_function(READY)
        expect(page.get_by_test_id("graph-title")).to_have_text("dog")
        expect(page.get_by_test_id("graph-prompt")).to_have_text("A dog ran")
        document = read_document(graphs, "dog")
        feature = top_features(document, 1)[0]
        click_node(page, feature)
        expect(page.get_by_test_id("lens")).to_be_visible()
        screenshot(page, "computed-graph")


def test_exported_page_works_offline(page, tiny_graph, tmp_path, screenshot):
    document = graph_json(tiny_graph, slug="cat-export")
    path = write_exported_html(document, tmp_path / "cat.html")
    blocked: list[str] = []
    failed: list[str] = []

    def only_local(route):
        if route.request.url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.on("requestfailed", lambda request: failed.append(request.url))
    open_graph(page, path.as_uri())
    expect(page.get_by_test_id("graph-title")).to_have_text("cat-export")
    expect(page.locator("#save-bar")).to_be_hidden()
    expect(page.get_by_test_id("home-link")).to_be_hidden()
    assert inked_pixels(page) > 500

    a, b = top_features(document, 2)
    click_node(page, a)
    page.get_by_test_id("pin-button").click()
    click_node(page, b)
    page.keyboard.press("p")
    expect(page.get_by_test_id("score-basis")).to_have_text("on the document's edges")
    page.wait_for_function(
        "ids => { const h = decodeURIComponent(location.hash); return ids.every(id => h.includes(id)); }",
        arg=[a, b],
    )
    page.reload()
    page.wait_for_function(READY)
    assert set(page.evaluate("window.circuitmapExplorer.state()")["pinned"]) == {a, b}
    expect(page.get_by_test_id("node-id")).to_have_text(b)
    screenshot(page, "exported-offline")
    assert blocked == [] and failed == []


def test_client_scores_equal_python_subgraph_scores(page, tiny_graph, tmp_path, screenshot):
    document = graph_json(tiny_graph, slug="cat-full", prune=False)
    targets = [n for n in document["nodes"] if n["feature_type"] == "logit"]
    assert all("target_weight" in n and "input_total" in n for n in targets)
    features = top_features(document, 12)
    errors = [n["node_id"] for n in document["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    cases = [
        (features[:3], []),
        (features[:1], [["pair", features[4], features[5]]]),
        (features[6:10] + errors[:3], [["trio", features[1], features[2], features[3]]]),
        ([], []),
    ]
    path = write_exported_html(document, tmp_path / "cat-full.html")
    for pinned, supernodes in cases:
        fragment = f"pinned={quote(','.join(pinned))}&supernodes={quote(json.dumps(supernodes))}"
        page.goto("about:blank")
        open_graph(page, f"{path.as_uri()}#{fragment}")
        shown = tuple(
            json.loads(page.get_by_test_id(f"score-{key}").get_attribute("data-value"))
            for key in ("replacement", "completeness")
        )
        expected = python_scores(tiny_graph, pinned, supernodes)
        assert all(close(x, y) for x, y in zip(shown, expected, strict=True)), (pinned, shown, expected)
    everything = [n["node_id"] for n in document["nodes"] if n["influence"] is not None]
    computed = page.evaluate("ids => window.circuitmapExplorer.clientScores(ids)", everything)
    expected = python_scores(tiny_graph, everything, [])
    assert close(computed["replacement"], expected[0]) and close(computed["completeness"], expected[1])
    screenshot(page, "client-scores")


def small_document() -> dict:
    return synthetic_document(60, 200, n_layers=4, n_positions=5)


def test_a_document_without_nodes_opens(page, tmp_path):
    document = small_document()
    document["nodes"], document["links"] = [], []
    open_graph(page, write_exported_html(document, tmp_path / "empty.html").as_uri())
    expect(page.get_by_test_id("graph-empty")).to_be_visible()
    expect(page.get_by_test_id("shown-counts")).to_have_text("0 of 0 nodes, 0 of 0 links")
    expect(page.get_by_test_id("message")).to_be_hidden()


def test_malformed_saved_state_is_ignored_with_a_notice(page, tmp_path):
    document = small_document()
    a = top_features(document, 1)[0]
    cases = [
        ({"pinnedIds": 5}, [], []),
        ({"supernodes": {"group": [a]}, "clickedId": 7}, [], []),
        ({"pinnedIds": [a, 3], "supernodes": ["not a group", ["kept", a]]}, [a], [["kept", a]]),
        ({"view": "wide", "pinnedIds": "abc"}, [], []),
        ("not an object", [], []),
    ]
    for q_params, pinned, supernodes in cases:
        document["qParams"] = q_params
        path = write_exported_html(document, tmp_path / "malformed.html")
        page.goto("about:blank")
        open_graph(page, path.as_uri())
        expect(page.get_by_test_id("message")).to_contain_text("Malformed parts of the saved state")
        state = page.evaluate("window.circuitmapExplorer.state()")
        assert (state["pinned"], state["supernodes"], state["clicked"]) == (pinned, supernodes, ""), q_params


def test_a_very_long_token_does_not_stall_the_page(page, tmp_path):
    document = small_document()
    document["metadata"]["prompt_tokens"][2] = " long" * 4000
    open_graph(page, write_exported_html(document, tmp_path / "long-token.html").as_uri())
    token = next(n["node_id"] for n in document["nodes"] if n["feature_type"] == "embedding")
    for _ in range(3):  # every hover redraws the overlay with its column headers
        at = node_position(page, token)
        page.mouse.move(at["x"], at["y"])
        expect(page.get_by_test_id("tooltip")).to_have_attribute("data-node-id", token)
        page.mouse.move(1, 1)


def test_synthetic_document_is_schema_valid():
    document = synthetic_document(300, 2000, n_layers=5, lens=True)
    jsonschema.Draft202012Validator(json_schema()).validate(document)


def test_a_page_of_5000_nodes_and_100000_links_opens_draws_and_answers_clicks(page, tmp_path, screenshot):
    """The large synthetic page (the one benchmarks/explorer.py times; nothing is timed here) opens with every
    node shown, draws, and shows the tooltip and the panel of its busiest target and of influential features
    hovered and clicked with the real mouse."""
    document = synthetic_document(5000, 100_000)
    n_nodes, n_links = len(document["nodes"]), len(document["links"])
    open_graph(page, write_exported_html(document, tmp_path / "large.html").as_uri())
    counts = page.get_by_test_id("shown-counts")
    expect(counts).to_contain_text(f"{n_nodes:,} of {n_nodes:,} nodes")
    expect(counts).to_contain_text(f" of {n_links:,} links")
    expect(page.get_by_test_id("message")).to_be_hidden()
    assert inked_pixels(page) > 5000

    for node_id in pick_nodes(document, 4):
        at = node_position(page, node_id)
        page.mouse.move(at["x"], at["y"])
        expect(page.get_by_test_id("tooltip")).to_have_attribute("data-node-id", node_id)
        click_node(page, node_id)
        incoming = sum(link["target"] == node_id for link in document["links"])
        rows = page.get_by_test_id("incoming-edges").get_by_test_id("edge")
        expect(rows).to_have_count(min(EDGE_ROWS, incoming))
    screenshot(page, "large-5000-nodes")


# Ids and the number of layers they are read with; the Python reader is the reference.
NODE_ID_CASES = [
    ("3_17_4", 30),
    ("3_17_*", 30),
    ("0_0_0", 30),
    ("  3_17_4 ", 30),
    ("03_017_4", 30),
    ("err_2_5", 30),
    ("E_100_0", 30),
    ("31_200_5", 30),
    ("31_200_5", 29),
    ("30_200_5", 29),
    ("T_1_5", 30),
    ("bad", 30),
    ("x_1_2", 30),
    ("31_200_*", 30),
    ("err_1", 30),
    ("err_2_*", 30),
    ("E_100_*", 30),
    ("T_1_*", 30),
    ("E_100", 30),
    ("", 30),
    ("1_2_3_4", 30),
    ("1_2_", 30),
    ("-1_2_3", 30),
    ("1.5_2_3", 30),
    ("err_1_2_3", 30),
    ("E_1_2 x", 30),
    ("toString_1_2", 30),
    ("constructor_1_2", 30),
    ("__proto___1_2", 30),
    ("1_2_3", None),
    ("31_200_5", None),
    ("\u0663_1_2", 30),
    ("\u00a03_17_4", 30),
]


def test_node_ids_are_read_in_the_page_as_in_python(page, tmp_path):
    """``window.Circuitmap.parseNodeId`` agrees with ``parse_node_id``: null where Python refuses the id,
    otherwise the same kind (as its NodeKind number), layer, index and position."""
    open_graph(page, write_exported_html(small_document(), tmp_path / "ids.html").as_uri())
    parsed = page.evaluate(
        "cases => cases.map(([text, nLayers]) => window.Circuitmap.parseNodeId(text, nLayers))",
        [list(case) for case in NODE_ID_CASES],
    )
    assert len(parsed) == len(NODE_ID_CASES)
    for (text, n_layers), in_page in zip(NODE_ID_CASES, parsed, strict=True):
        try:
            ref = parse_node_id(text, n_layers)
        except CircuitmapError:
            assert in_page is None, (text, n_layers, in_page)
            continue
        expected = {"kind": int(ref.kind), "layer": ref.layer, "index": ref.index, "position": ref.position}
        assert in_page == expected, (text, n_layers)

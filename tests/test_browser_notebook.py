"""A graph displayed in a notebook cell: the frame that ``show`` returns, inside a host page as a notebook
front end renders it, draws the graph with its supernodes, reacts to clicks and pins, and loads nothing
from the network."""

from __future__ import annotations

from helpers.browser import READY, artifacts_folder, skip_without_browser, top_features
from helpers.graphs import SERVER_PROMPT

from circuitmap import show
from circuitmap.attribution import attribute

skip_without_browser()

from playwright.sync_api import expect  # noqa: E402


def test_a_graph_in_a_notebook_cell_draws_offline_and_keeps_its_state_in_the_frame(page, engine, tmp_path):
    graph = attribute(engine.model, engine.transcoders, SERVER_PROMPT, progress=False)
    view = show(graph, height=560)
    host = tmp_path / "notebook.html"
    host.write_text(
        f"<!doctype html><html><body><h1>A notebook</h1><div class='output'>{view._repr_html_()}</div>"
        "<p>next cell</p></body></html>",
        encoding="utf-8",
    )
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(host.as_uri())
    frame = page.frame_locator("iframe")
    inner = next(f for f in page.frames if f != page.main_frame)
    inner.wait_for_function(READY)
    box = page.locator("iframe").bounding_box()
    assert box["height"] == 560 + 2 and box["width"] > 1000  # its height asked for, the cell's width

    supernodes = view.document["qParams"]["supernodes"]
    assert supernodes
    expect(frame.get_by_test_id("graph-title")).to_have_text(view.document["metadata"]["slug"])
    expect(frame.locator("#save-bar")).to_be_hidden()

    feature = top_features(view.document, 1)[0]
    if frame.get_by_test_id("graph-canvas").is_hidden():
        frame.get_by_test_id("mode-full").click()
    at = inner.evaluate("id => window.circuitmapExplorer.nodeScreenPosition(id)", feature)
    frame.locator("body").click(position={"x": at["x"], "y": at["y"]})
    expect(frame.get_by_test_id("node-id")).to_have_text(feature)
    inner.wait_for_function(
        "id => decodeURIComponent(location.hash).includes(id)", arg=feature
    )  # the state went to the frame's own address
    assert page.url == host.as_uri()
    page.screenshot(path=str(artifacts_folder() / "notebook-cell.png"))
    assert all(url.startswith(("file:", "about:", "data:")) for url in requests), requests

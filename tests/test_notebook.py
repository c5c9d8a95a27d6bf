"""Notebook display: a graph as the explorer's self-contained read-only page in a frame, with the supernodes
and pins asked for; feature dashboards, interventions and checks as HTML tables that escape what they show."""

from __future__ import annotations

import html
import json
import re

import pytest
from helpers.graphs import SERVER_PROMPT, write_graph_folder

from circuitmap import show
from circuitmap.attribution import attribute
from circuitmap.errors import CircuitmapError
from circuitmap.features.store import Example, FeatureDashboard, Label
from circuitmap.graphs import GraphFolder
from circuitmap.graphs.export import graph_json
from circuitmap.graphs.grouping import group_features
from circuitmap.interventions import FeatureEdit, intervene
from circuitmap.interventions.check import CheckReport, CheckRow
from circuitmap.pipeline import ComputedGraph
from circuitmap.server.export_html import render_html


@pytest.fixture(scope="module")
def graph(engine):
    return attribute(engine.model, engine.transcoders, SERVER_PROMPT, progress=False)


def srcdoc(markup: str) -> str:
    """The page inside a frame's ``srcdoc`` attribute."""
    match = re.fullmatch(
        r"""<iframe srcdoc='([^']*)' title="[^"]*" style="[^"]*" loading="eager"></iframe>""", markup
    )
    assert match, markup[:200]
    return html.unescape(match.group(1))


def test_a_graph_shows_as_the_exported_page_in_a_frame_that_loads_nothing_from_the_network(graph):
    view = show(graph, height=500)
    markup = view._repr_html_()
    page = srcdoc(markup)
    assert page == render_html(view.document)
    assert "height:500px" in markup and "width:100%" in markup
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, flags=re.IGNORECASE)
    assert "<script src=" not in page and 'rel="stylesheet"' not in page
    assert graph._repr_html_() == show(graph)._repr_html_()  # the graph displays on its own


def test_a_graph_is_pruned_and_grouped_automatically_as_the_pipeline_does(graph):
    document = show(graph).document
    assert document == show(graph, supernodes=group_features(graph)).document
    supernodes = document["qParams"]["supernodes"]
    assert supernodes, "the tiny graph has groups"
    members = [member for group in supernodes for member in group[1:]]
    assert set(members) <= set(document["qParams"]["pinnedIds"])
    assert show(graph, supernodes=[]).document["qParams"]["supernodes"] == []


def test_given_supernodes_and_pins_replace_the_documents_own_and_leave_the_source_unchanged(graph):
    document = graph_json(graph, slug="cat")
    before = repr(document)
    computed = ComputedGraph(graph, document)
    features = [n["node_id"] for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    a, b, c = features[:3]
    shown = show(computed, supernodes=[["pair", a, b]], pinned=[c]).document
    assert shown["qParams"]["supernodes"] == [["pair", a, b]]
    assert shown["qParams"]["pinnedIds"] == [a, b, c]
    assert repr(document) == before
    assert show(document, supernodes=[["one", c]]).document["qParams"]["supernodes"] == [["one", c]]
    assert computed._repr_html_() == show(computed)._repr_html_()


def test_a_graph_folder_shows_its_saved_document(graph, tmp_path):
    document = graph_json(graph, slug="saved")
    folder = write_graph_folder(tmp_path, document, graph, name="saved") / "saved"
    assert show(folder).document == document
    assert show(str(folder)).document == document
    assert srcdoc(GraphFolder(folder)._repr_html_()) == render_html(document)


def test_a_view_saves_the_page_that_it_shows(graph, tmp_path):
    view = show(graph)
    path = view.save(tmp_path / "graph.html")
    assert path.read_text(encoding="utf-8") == view.html()


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        (42, {}, "cannot show a int"),
        ({"nodes": []}, {}, "a viewer document needs"),
        ("graph", {"supernodes": [["lonely"]]}, "at least one member"),
        ("graph", {"supernodes": [["ghost", "99_1_1"]]}, "supernode 'ghost': unknown node ids '99_1_1'"),
        ("graph", {"pinned": ["99_1_1"]}, "pinned: unknown node ids '99_1_1'"),
        ("document", {"supernodes": [["ghost", "99_1_1"]]}, "99_1_1 is not a node of the shown graph"),
        ("document", {"pinned": ["99_1_1"]}, "cannot pin 99_1_1"),
        ("graph", {"height": 10}, "height"),
    ],
)
def test_bad_input_gets_one_line(graph, source, options, message):
    shown = (
        {"graph": graph, "document": graph_json(graph)}.get(source, source)
        if isinstance(source, str)
        else source
    )
    with pytest.raises(CircuitmapError, match=re.escape(message)) as error:
        show(shown, **options)
    assert "\n" not in str(error.value)


def test_a_graph_keeps_the_supernode_members_and_pins_that_pruning_drops(graph):
    pruned_ids = {node["node_id"] for node in graph_json(graph)["nodes"]}
    dropped = [graph.node_id(n) for n in range(graph.n_features) if graph.node_id(n) not in pruned_ids][:3]
    assert len(dropped) == 3
    document = show(graph, supernodes=[["kept", dropped[0], dropped[1]]], pinned=[dropped[2]]).document
    assert set(dropped) <= {node["node_id"] for node in document["nodes"]}
    assert document["qParams"]["supernodes"] == [["kept", dropped[0], dropped[1]]]
    assert set(dropped) <= set(document["qParams"]["pinnedIds"])


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(CircuitmapError, match="no graph at"):
        show(tmp_path / "absent.json")


def dashboard() -> FeatureDashboard:
    example = Example(
        context=0,
        start=0,
        tokens=["a", "<script>", "\n"],
        activations=[0, 2.5, 0],
        max_activation=2.5,
        peak=1,
    )
    return FeatureDashboard(
        layer=2,
        feature=7,
        active_tokens=1234,
        density=0.01,
        max_activation=2.5,
        mean_activation=1.25,
        histogram=[1, 2],
        histogram_edges=[0, 1, 2],
        top_examples=[example],
        quantile_groups=[],
        output_top=[(" <b>", 0.5)],
        output_bottom=[(" x", -0.25)],
        input_top=[(" y", 0.125)],
        label=Label(text="tags & <html>", source="auto", confidence=0.5),
    )


def test_a_dashboard_is_a_table_that_escapes_tokens_and_labels():
    markup = dashboard()._repr_html_()
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert "<b>&lt;script&gt;</b>" in markup  # the peak token, emphasised
    assert "tags &amp; &lt;html&gt;" in markup and "confidence 0.50" in markup
    assert "1,234 tokens" in markup and "+0.50" in markup and "⏎" in markup


def test_an_intervention_result_shows_its_tables(engine):
    result = intervene(
        engine.model,
        engine.transcoders,
        SERVER_PROMPT,
        [FeatureEdit.set((0, None, 0), 5.0)],
        targets=["t"],
    )
    markup = result._repr_html_()
    assert markup.count("<table") == 3  # targets, top tokens, feature changes
    assert html.escape(repr(result.top_before[0][0])) in markup
    assert "logit before" in markup and "activation before" in markup


def test_a_check_report_shows_one_row_per_node_and_its_agreement():
    rows = [
        CheckRow("9_1_2", "feature", members=[], influence=0.5, predicted=1.0, direct=0.5, observed=0.8),
        CheckRow("<g>", "supernode", members=[], influence=0.25, predicted=-1.0, direct=-0.5, observed=0.3),
    ]
    markup = CheckReport("The cat", " sat", rows)._repr_html_()
    assert markup.count("<tr>") == 3 and "&lt;g&gt;" in markup
    assert ">ok<" in markup and ">WRONG<" in markup and "sign agreement 0.50" in markup


def test_quotes_and_ampersands_in_labels_survive_the_frame_attribute(graph):
    document = graph_json(graph)
    feature = next(n["node_id"] for n in document["nodes"] if n["feature_type"] == "cross layer transcoder")
    label = """it's "France" & <b>co</b> &amp; </script>"""
    document = graph_json(graph, labels={feature: label})
    view = show(document)
    page = srcdoc(view._repr_html_())
    assert page == render_html(view.document)
    assert json.dumps(label)[1:-1].replace("<", "\\u003c") in page

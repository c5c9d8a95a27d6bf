"""Comparing two graphs: features matched by layer, index and position from the end, appear/disappear,
influence changes against ``node_influence``, greedy supernode matching, refusals, the ``compare`` command and
the explorer's compare route and page."""

from __future__ import annotations

import json
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers.graphs import (
    SERVER_PROMPT,
    edited_graph,
    random_graph,
    with_first_tokens,
    write_graph_folder,
)
from starlette.testclient import TestClient

from circuitmap import compare_graphs
from circuitmap.cli import main
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import Graph, GraphFolder, NodeKind, node_influence
from circuitmap.graphs.compare import GraphComparison
from circuitmap.graphs.export import FEATURE_TYPES, graph_json
from circuitmap.graphs.folder import DOCUMENT_FILE, GRAPH_FILE
from circuitmap.graphs.ids import index_by_id, parse_feature_id
from circuitmap.pipeline import compute_graph_folder
from circuitmap.server import create_app

LONGER_PROMPT = "Well, the capital of Texas is"


# ---------------------------------------------------------------- builders


def most_influential_features(graph: Graph, count: int) -> list[int]:
    features = graph.nodes_of(NodeKind.FEATURE)
    return features[np.argsort(-node_influence(graph)[features], kind="stable")][:count].tolist()


def kept_feature_ids(document: dict) -> set[str]:
    feature = FEATURE_TYPES[NodeKind.FEATURE]
    return {node["node_id"] for node in document["nodes"] if node["feature_type"] == feature}


def key_of(node_id: str, graph: Graph) -> tuple[int, int, int]:
    layer, index, position = parse_feature_id(node_id)
    return layer, index, len(graph.tokens) - 1 - position


def influence_of(graph: Graph, node_id: str) -> float:
    return float(node_influence(graph)[index_by_id(graph)[node_id]])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Graph, Graph]:
    """A graph folder root with graphs ``a`` and ``b`` (pruned documents): B is A behind a longer prompt, with
    A's most influential feature renamed and the edges out of its second one tripled."""
    graph_a = random_graph(2, n_layers=4, n_positions=5)
    top, second = most_influential_features(graph_a, 2)
    graph_b = with_first_tokens(edited_graph(graph_a, top, 99, second, 3.0), ["Well", ","], LONGER_PROMPT)
    write_graph_folder(tmp_path, graph_json(graph_a, slug="a"), graph_a, "a")
    root = write_graph_folder(tmp_path, graph_json(graph_b, slug="b"), graph_b, "b")
    return root, graph_a, graph_b


# ---------------------------------------------------------------- matching


def test_the_same_graph_behind_a_longer_prompt_matches_on_positions_from_the_end(tmp_path):
    graph_a = random_graph(1, n_positions=5)
    graph_b = with_first_tokens(graph_a, ["Well", ","], LONGER_PROMPT)
    write_graph_folder(tmp_path, graph_json(graph_a, prune=False), graph_a, "a")
    root = write_graph_folder(tmp_path, graph_json(graph_b, prune=False), graph_b, "b")

    comparison = compare_graphs(root / "a", GraphFolder(root / "b"))

    assert comparison.features_only_in_a == [] and comparison.features_only_in_b == []
    assert len(comparison.shared_features) == graph_a.n_features
    for feature in comparison.shared_features:
        position_a = parse_feature_id(feature.node_a)[2]
        assert parse_feature_id(feature.node_b)[2] == position_a + 2
        assert feature.from_end == len(graph_a.tokens) - 1 - position_a
        assert feature.token_a == feature.token_b == graph_a.token_strings[position_a]
        assert feature.influence_a == influence_of(graph_a, feature.node_a)
        assert feature.change == pytest.approx(0.0, abs=1e-12)
    assert comparison.a.prompt == graph_a.prompt and comparison.b.prompt == LONGER_PROMPT
    assert comparison.b.tokens[:2] == ["Well", ","]
    assert (comparison.a.top_target, comparison.a.top_target_probability) == (" Austin", 0.6)


def test_features_that_appear_disappear_or_change_influence(pair):
    root, graph_a, graph_b = pair
    document_a = json.loads((root / "a" / DOCUMENT_FILE).read_text())
    document_b = json.loads((root / "b" / DOCUMENT_FILE).read_text())

    comparison = compare_graphs(root / "a", root / "b")

    keys_a = {key_of(i, graph_a): i for i in kept_feature_ids(document_a)}
    keys_b = {key_of(i, graph_b): i for i in kept_feature_ids(document_b)}
    assert {
        (f.layer, f.feature, f.from_end) for f in comparison.shared_features
    } == keys_a.keys() & keys_b.keys()
    assert {f.node_a for f in comparison.features_only_in_a} == {
        keys_a[key] for key in keys_a.keys() - keys_b.keys()
    }
    assert {f.node_b for f in comparison.features_only_in_b} == {
        keys_b[key] for key in keys_b.keys() - keys_a.keys()
    }
    top = most_influential_features(graph_a, 1)[0]
    gone = graph_a.node_id(top)
    assert comparison.features_only_in_a[0].node_a == gone
    assert comparison.features_only_in_a[0].node_b is None and comparison.features_only_in_a[0].change is None
    new = [f for f in comparison.features_only_in_b if f.feature == 99]
    assert len(new) == 1 and new[0].from_end == key_of(gone, graph_a)[2]

    changed = 0
    for feature in comparison.shared_features:
        assert feature.influence_a == influence_of(graph_a, feature.node_a)
        assert feature.influence_b == influence_of(graph_b, feature.node_b)
        assert feature.change == feature.influence_b - feature.influence_a
        changed += abs(feature.change) > 1e-9
    assert changed > 0
    largest = [max(f.influence_a, f.influence_b) for f in comparison.shared_features]
    assert largest == sorted(largest, reverse=True)
    only = [f.influence_a for f in comparison.features_only_in_a]
    assert only == sorted(only, reverse=True)


def test_supernodes_are_matched_greedily_by_the_overlap_of_their_members(tmp_path):
    graph_a = random_graph(3, n_positions=5)
    graph_b = with_first_tokens(graph_a, ["Well"], LONGER_PROMPT)
    features_a = [graph_a.node_id(n) for n in graph_a.nodes_of(NodeKind.FEATURE)[:6]]
    features_b = [graph_b.node_id(n) for n in graph_b.nodes_of(NodeKind.FEATURE)[:6]]
    error_a = graph_a.node_id(int(graph_a.nodes_of(NodeKind.ERROR)[5]))
    f, g = features_a, features_b
    groups_a = [["g1", f[0], f[1], f[2]], ["g2", f[3]], ["g3", f[4], f[5], error_a], ["errors", error_a]]
    groups_b = [["h1", g[0], g[1]], ["h2", g[0], g[1], g[2], g[3]], ["h3", g[5], g[4]]]
    write_graph_folder(tmp_path, graph_json(graph_a, prune=False, supernodes=groups_a), graph_a, "a")
    root = write_graph_folder(tmp_path, graph_json(graph_b, prune=False, supernodes=groups_b), graph_b, "b")

    comparison = compare_graphs(root / "a", root / "b")

    # Jaccard: g3–h3 1, g1–h2 3/4, g1–h1 2/3 (g1 taken), g2–h2 1/4 (h2 taken).
    pairs = {(group.name_a, group.name_b): group for group in comparison.matched_supernodes}
    assert set(pairs) == {("g3", "h3"), ("g1", "h2")}
    assert (pairs["g1", "h2"].common_members, pairs["g1", "h2"].overlap) == (3, 0.75)
    assert (pairs["g3", "h3"].common_members, pairs["g3", "h3"].overlap) == (2, 1.0)
    assert sorted(group.name_a for group in comparison.supernodes_only_in_a) == ["errors", "g2"]
    assert [group.name_b for group in comparison.supernodes_only_in_b] == ["h1"]
    errors_only = next(group for group in comparison.supernodes_only_in_a if group.name_a == "errors")
    assert errors_only.members_a == [] and errors_only.influence_a == 0.0

    matched = pairs["g1", "h2"]
    assert set(matched.members_a) == set(f[:3]) and set(matched.members_b) == set(g[:4])
    assert matched.influence_a == pytest.approx(sum(influence_of(graph_a, i) for i in f[:3]))
    assert matched.influence_b == pytest.approx(sum(influence_of(graph_b, i) for i in g[:4]))
    assert matched.change == matched.influence_b - matched.influence_a
    only_b = comparison.supernodes_only_in_b[0]
    assert only_b.influence_a is None and only_b.change is None and only_b.overlap == 0.0


def test_graphs_from_the_pipeline_compare_with_each_other_and_with_themselves(tmp_path, engine):
    for name, prompt in (("cat", SERVER_PROMPT), ("dog", "A dog sat")):
        compute_graph_folder(engine.model, engine.transcoders, prompt, tmp_path / name, progress=False)
    folders = {name: GraphFolder(tmp_path / name) for name in ("cat", "dog")}

    comparison = compare_graphs(folders["cat"], folders["dog"])
    for side, name, parts in (
        ("a", "cat", (comparison.shared_features, comparison.features_only_in_a)),
        ("b", "dog", (comparison.shared_features, comparison.features_only_in_b)),
    ):
        graph = folders[name].read_graph()
        ids = [getattr(feature, f"node_{side}") for part in parts for feature in part]
        assert sorted(ids) == sorted(kept_feature_ids(folders[name].read_document()))
        influence, index = node_influence(graph), index_by_id(graph)
        for feature in (feature for part in parts for feature in part):
            node = index[getattr(feature, f"node_{side}")]
            assert getattr(feature, f"influence_{side}") == influence[node]
    only_a, only_b = comparison.supernodes_only_in_a, comparison.supernodes_only_in_b
    assert len(comparison.matched_supernodes) + len(only_a) == len(folders["cat"].saved_supernodes())
    assert len(comparison.matched_supernodes) + len(only_b) == len(folders["dog"].saved_supernodes())

    itself = compare_graphs(folders["cat"], folders["cat"])
    assert itself.features_only_in_a == itself.features_only_in_b == []
    assert all(feature.change == 0.0 for feature in itself.shared_features)
    assert len(itself.matched_supernodes) == len(folders["cat"].saved_supernodes())
    assert all(group.overlap == 1.0 and group.change == 0.0 for group in itself.matched_supernodes)


# ---------------------------------------------------------------- refusals


def without(root: Path, *files: str) -> Path:
    """Graph ``b`` of ``root`` with ``files`` deleted."""
    for name in files:
        (root / "b" / name).unlink()
    return root / "b"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "absent", "no graph folder at"),
        (lambda root: root / "b" / DOCUMENT_FILE, "is not a graph folder (give the folder"),
        (lambda root: without(root, GRAPH_FILE), f"it has no {GRAPH_FILE} ("),
        (lambda root: without(root, DOCUMENT_FILE), f"it has no {DOCUMENT_FILE} ("),
        (lambda root: without(root, DOCUMENT_FILE, GRAPH_FILE), f"no {DOCUMENT_FILE} and no {GRAPH_FILE}"),
    ],
)
def test_what_is_not_a_graph_folder_is_refused_in_one_line(pair, make, message):
    root = pair[0]
    with pytest.raises(CircuitmapError) as error:
        compare_graphs(root / "a", make(root))
    assert message in one_line(error)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_name": "another-model"}, "come from different models ('tiny-llama' and 'another-model')"),
        (
            {"transcoders_name": "another-set"},
            "come from different transcoder sets ('tiny-plt' and 'another-set')",
        ),
        (
            {"info": {"transcoders_fingerprint": "f2"}},
            "different transcoder sets (their fingerprints differ)",
        ),
    ],
)
def test_graphs_of_different_models_or_transcoder_sets_are_refused(tmp_path, change, message):
    graph_a = replace(random_graph(4), info={"transcoders_fingerprint": "f1"})
    graph_b = replace(graph_a, **change)
    write_graph_folder(tmp_path, graph_json(graph_a), graph_a, "a")
    root = write_graph_folder(tmp_path, graph_json(graph_b), graph_b, "b")
    with pytest.raises(CircuitmapError) as error:
        compare_graphs(root / "a", root / "b")
    assert message in one_line(error)


# ---------------------------------------------------------------- outputs


def test_json_is_strict_and_the_table_lists_the_top_rows(pair):
    root = pair[0]
    comparison = compare_graphs(root / "a", root / "b")
    document = json.loads(json.dumps(comparison.as_json(), allow_nan=False))
    assert set(document) == {"a", "b", "model", "transcoders", "features", "supernodes"}
    assert document["b"]["prompt"] == LONGER_PROMPT and document["model"] == "tiny-llama"
    shared = document["features"]["shared"]
    assert len(shared) == len(comparison.shared_features)
    assert shared[0]["change"] == comparison.shared_features[0].change
    assert document["features"]["only_in_a"][0]["influence_b"] is None

    table = comparison.table(top=2)
    assert f"{root / 'a'}: 'The capital of Texas is' -> ' Austin' (p=0.600)" in table
    assert f"B  {root / 'b'}: {LONGER_PROMPT!r}" in table
    assert f"features: {len(comparison.shared_features)} shared" in table
    assert f"… and {len(comparison.shared_features) - 2} more" in table
    first = comparison.shared_features[0]
    assert f"{first.layer}/{first.feature}" in table and f"{first.change:+.4f}" in table


def test_the_compare_command_prints_the_table_and_writes_json(pair, capsys, tmp_path):
    root = pair[0]
    out = tmp_path / "comparison.json"
    assert main(["compare", str(root / "a"), str(root / "b"), "--top", "3", "--json", str(out)]) == 0
    comparison = compare_graphs(root / "a", root / "b")
    assert capsys.readouterr().out == f"{comparison.table(3)}\nwrote {out}\n"
    assert json.loads(out.read_text()) == json.loads(json.dumps(comparison.as_json()))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{root}/missing", "{root}/b"], "circuitmap: error: no graph folder at "),
        (["{root}/a", "{root}/b/graph.json"], "circuitmap: error: "),
        (["{root}/a", "{root}/b", "--top", "0"], "circuitmap: error: argument --top: must be a positive"),
        (["{root}/a"], "circuitmap: error: the following arguments are required: b"),
    ],
)
def test_the_compare_command_refuses_bad_input_with_status_2(pair, capsys, arguments, message):
    root = pair[0]
    try:
        status = main(["compare", *(argument.format(root=root) for argument in arguments)])
    except SystemExit as stopped:
        status = stopped.code
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message)


# ---------------------------------------------------------------- explorer


@pytest.fixture
def client(pair, tmp_path):
    root = pair[0]
    graph = random_graph(5)
    write_graph_folder(tmp_path, graph_json(graph), None, "document-only")
    other = replace(graph, model_name="another-model")
    write_graph_folder(tmp_path, graph_json(other), other, "other-model")
    with TestClient(create_app(root), base_url="http://127.0.0.1:8041") as client:
        yield client


def test_the_api_compares_two_served_graphs(client, pair):
    root = pair[0]
    response = client.get("/api/compare/a/b")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    expected = compare_graphs(root / "a", root / "b").as_json()
    expected["a"]["name"], expected["b"]["name"] = "a", "b"
    assert response.json() == json.loads(json.dumps(expected))


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/api/compare/a/nothing", 404, "no graph named 'nothing'"),
        ("/api/compare/nothing/b", 404, "no graph named 'nothing'"),
        ("/api/compare/a/.hidden", 400, "invalid graph name '.hidden'"),
        ("/api/compare/a/document-only", 404, f"graph 'document-only' has no full graph ({GRAPH_FILE})"),
        ("/api/compare/a/other-model", 400, "come from different models"),
    ],
)
def test_the_api_refuses_unknown_or_incomparable_graphs(client, path, status, detail):
    response = client.get(path)
    assert response.status_code == status
    assert detail in response.json()["detail"] and "\n" not in response.json()["detail"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in ("script", "link"):
            self.links.append(attributes.get("src") or attributes.get("href"))


def test_the_compare_page_and_its_assets_come_from_the_package(client):
    page = client.get("/compare/a/b")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "https://" not in page.text and "http://" not in page.text
    parser = _Links()
    parser.feed(page.text)
    assert "/static/compare.js" in parser.links and "/static/explorer.css" in parser.links
    for link in parser.links:
        assert link.startswith("/static/")
        assert client.get(link).status_code == 200


def test_the_comparison_type_is_exported():
    import circuitmap.graphs

    assert circuitmap.graphs.compare_graphs is compare_graphs
    assert circuitmap.graphs.GraphComparison is GraphComparison

"""Viewer JSON export: schema validity, ids, links, pruning, labels, qParams, metadata and bad input."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest
from helpers.graphs import random_graph

from circuitmap.errors import CircuitmapError
from circuitmap.graphs.export import cantor_pair, document_links, export_graph_json, graph_json, json_schema
from circuitmap.graphs.graph import NodeKind
from circuitmap.graphs.ids import node_ids
from circuitmap.graphs.pruning import PruneConfig, graph_scores, prune


def validate(document: dict) -> None:
    jsonschema.Draft202012Validator(json_schema()).validate(document)


def link_set(document: dict) -> set[tuple[str, str, float]]:
    return {(link["source"], link["target"], link["weight"]) for link in document["links"]}


def test_schema_is_valid_draft_2020_12_and_found_as_package_data():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("do_prune", [True, False])
@pytest.mark.parametrize("weight_dtype", [np.float32, np.float64])
def test_export_validates_against_schema(tmp_path, do_prune, weight_dtype):
    graph = random_graph(1, weight_dtype=weight_dtype)
    path = export_graph_json(graph, tmp_path / "graph.json", prune=do_prune)
    assert path == tmp_path / "graph.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    validate(document)
    assert document["metadata"]["pruned"] is do_prune
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]


def test_full_export_has_every_node_and_edge_with_unique_ids():
    graph = random_graph(2)
    document = graph_json(graph, prune=False)
    ids = [node["node_id"] for node in document["nodes"]]
    assert ids == node_ids(graph)
    assert len(set(ids)) == len(ids) == graph.n_nodes
    assert [node["jsNodeId"] for node in document["nodes"]] == ids
    assert {node["feature_type"] for node in document["nodes"]} == {
        "cross layer transcoder",
        "mlp reconstruction error",
        "embedding",
        "logit",
    }
    assert f"{graph.n_layers + 1}_7_3" in ids and "T_1_3" in ids
    assert len(document["links"]) == graph.n_edges
    assert {end for link in document["links"] for end in (link["source"], link["target"])} <= set(ids)


def test_links_are_sources_into_targets_with_their_weights():
    graph = random_graph(3, weight_dtype=np.float64)
    document = graph_json(graph, prune=False)
    dense = graph.dense_adjacency()
    position_of = {identifier: node for node, identifier in enumerate(node_ids(graph))}
    for link in document["links"]:
        source, target = position_of[link["source"]], position_of[link["target"]]
        assert link["weight"] == dense[target, source]
        assert graph.kind[source] != NodeKind.TARGET
        assert graph.kind[target] in (NodeKind.FEATURE, NodeKind.TARGET)


def test_node_fields_follow_the_reference_conventions():
    graph = random_graph(4)
    document = graph_json(graph, prune=False)
    nodes = dict(zip(node_ids(graph), document["nodes"], strict=True))
    for node, identifier in enumerate(node_ids(graph)):
        entry, kind = nodes[identifier], graph.kind[node]
        assert entry["ctx_idx"] == graph.position[node]
        if kind == NodeKind.FEATURE:
            assert entry["feature"] == cantor_pair(int(graph.layer[node]), int(graph.index[node]))
            assert entry["layer"] == str(graph.layer[node])
            assert entry["activation"] == pytest.approx(graph.activation[node])
        elif kind == NodeKind.ERROR:
            assert (entry["feature"], entry["activation"]) == (-1, None)
            assert entry["layer"] == str(graph.layer[node])
        elif kind == NodeKind.TOKEN:
            assert (entry["feature"], entry["layer"]) == (graph.position[node], "E")
            assert entry["clerp"] == graph.token_strings[graph.position[node]]
            assert entry["influence"] is None
        else:
            assert entry["layer"] == str(graph.n_layers + 1)
            assert entry["influence"] is None
    logit, other = (nodes[f"{graph.n_layers + 1}_7_3"], nodes["T_1_3"])
    assert (logit["feature"], logit["token_prob"], logit["is_target_logit"]) == (7, 0.6, True)
    assert logit["clerp"] == 'Output " Austin" (p=0.600)'
    assert (other["feature"], other["token_prob"], other["is_target_logit"]) == (-2, 0.25, False)
    assert other["clerp"] == 'Output "Austin − Dallas" (p=0.250)'


def test_cantor_pair_is_inverted_as_neuronpedia_does():
    for layer, index in [(0, 0), (0, 253), (5, 0), (17, 16383), (25, 2_500_000)]:
        number = cantor_pair(layer, index)
        w = math.floor((math.sqrt(8 * number + 1) - 1) / 2)
        t = (w * w + w) // 2
        assert (w - (number - t), number - t) == (layer, index)


def test_pruned_export_is_the_pruned_graph_and_a_subset_of_the_full_one():
    graph = random_graph(5)
    full = graph_json(graph, prune=False)
    pruned = graph_json(graph, node_threshold=0.6, edge_threshold=0.9)
    kept = prune(graph, node_threshold=0.6, edge_threshold=0.9)
    ids = node_ids(graph)
    assert [node["node_id"] for node in pruned["nodes"]] == [ids[n] for n in np.flatnonzero(kept.node_mask)]
    assert len(pruned["links"]) == kept.edge_mask.sum() < graph.n_edges
    assert len(pruned["nodes"]) < graph.n_nodes
    full_nodes = {node["node_id"]: node for node in full["nodes"]}
    assert all(full_nodes[node["node_id"]] == node for node in pruned["nodes"])
    assert link_set(pruned) <= link_set(full)
    pruned_ids = {node["node_id"] for node in pruned["nodes"]}
    assert {end for link in pruned["links"] for end in (link["source"], link["target"])} <= pruned_ids
    kinds = {node["feature_type"] for node in pruned["nodes"]}
    assert {"embedding", "logit"} <= kinds
    meta = pruned["metadata"]
    assert meta["n_nodes"] == {"full": graph.n_nodes, "exported": len(pruned["nodes"])}
    assert meta["n_edges"] == {"full": graph.n_edges, "exported": len(pruned["links"])}


def test_influence_is_the_share_above_so_the_viewer_slider_reproduces_node_pruning():
    graph = random_graph(6)
    full = graph_json(graph, prune=False)
    shares = [node["influence"] for node in full["nodes"] if node["influence"] is not None]
    assert min(shares) == 0.0 and max(shares) <= 1.0
    influence = prune(graph).influence
    candidates = np.flatnonzero((graph.kind == NodeKind.FEATURE) | (graph.kind == NodeKind.ERROR))
    by_influence = candidates[np.argsort(-influence[candidates], kind="stable")]
    assert np.all(np.diff([full["nodes"][n]["influence"] for n in by_influence]) >= 0)
    for threshold in (0.3, 0.6, 0.9):
        pruned = graph_json(graph, node_threshold=threshold, edge_threshold=1.0)
        for node in pruned["nodes"]:
            assert node["influence"] is None or node["influence"] < threshold


def test_labels_become_clerps_with_argument_over_graph_labels():
    graph = random_graph(7)
    ids = node_ids(graph)
    labels = {ids[1]: "Texas", ids[-2]: "Austin!"}
    document = graph_json(graph, prune=False, labels=labels)
    clerps = {node["node_id"]: node["clerp"] for node in document["nodes"]}
    assert clerps[ids[0]] == "first feature"
    assert clerps[ids[1]] == "Texas"
    assert clerps[ids[-2]] == 'Output "Austin!" (p=0.600)'
    assert clerps[ids[2]] == ""
    overridden = graph_json(graph, prune=False, labels={ids[0]: "override"})
    assert overridden["nodes"][0]["clerp"] == "override"


def test_pinned_and_supernodes_go_to_qparams_and_stay_in_a_pruned_export():
    graph = random_graph(8)
    ids = node_ids(graph)
    kept = prune(graph, node_threshold=0.3, edge_threshold=0.5)
    dropped = [ids[n] for n in np.flatnonzero(~kept.node_mask)]
    pinned, grouped = dropped[:1], dropped[1:3]
    supernodes = [["Texas", *grouped]]
    document = graph_json(graph, node_threshold=0.3, edge_threshold=0.5, pinned=pinned, supernodes=supernodes)
    validate(document)
    q_params = document["qParams"]
    assert q_params["pinnedIds"] == pinned + grouped
    assert q_params["supernodes"] == supernodes
    assert (q_params["linkType"], q_params["clickedId"], q_params["sg_pos"]) == ("both", "", "")
    exported = {node["node_id"] for node in document["nodes"]}
    assert set(pinned + grouped) <= exported
    pinned_node = ids.index(pinned[0])
    sources, _ = graph.row(pinned_node)
    expected = {ids[s] for s in sources.tolist() if ids[s] in exported}
    got = {link["source"] for link in document["links"] if link["target"] == pinned[0]}
    assert got == expected


def test_metadata_defaults_scores_and_info():
    graph = random_graph(9, prompt="Die Hauptstadt von Österreich ist")
    document = graph_json(graph)
    meta = document["metadata"]
    assert meta["slug"] == "die-hauptstadt-von-osterreich-ist"
    assert (meta["scan"], meta["model"], meta["transcoders"]) == ("tiny-llama", "tiny-llama", "tiny-plt")
    assert meta["prompt"] == graph.prompt and meta["prompt_tokens"] == graph.token_strings
    assert (meta["node_threshold"], meta["edge_threshold"], meta["schema_version"]) == (0.8, 0.98, 1)
    assert meta["info"] == graph.info
    full = graph_scores(graph)
    assert meta["scores"]["full"] == {"replacement": full.replacement, "completeness": full.completeness}
    assert set(meta["scores"]["exported"]) == {"replacement", "completeness"}
    named = graph_json(graph, slug="my-graph", scan="gemma-2-2b")["metadata"]
    assert (named["slug"], named["scan"]) == ("my-graph", "gemma-2-2b")
    assert graph_json(random_graph(9, prompt="日本の首都は"))["metadata"]["slug"] == "graph"


def test_export_into_a_folder_uses_the_slug_and_keeps_unicode(tmp_path):
    graph = random_graph(10, prompt="Capital → city", token_strings=["<bos>", "Capital", " →", " city"])
    path = export_graph_json(graph, tmp_path)
    assert path == tmp_path / "capital-city.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["metadata"]["prompt_tokens"][2] == " →"
    assert "→" in path.read_text(encoding="utf-8")
    with pytest.raises(CircuitmapError, match="cannot name a file"):
        export_graph_json(graph, tmp_path, slug="../outside")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"pinned": ["1_999_1"]}, "unknown node ids"),
        ({"pinned": "E_1_0"}, "not the string"),
        ({"supernodes": [["group", "nope"]]}, "unknown node ids"),
        ({"supernodes": [["lonely"]]}, "at least one node id"),
        ({"labels": {"9_9_9": "x"}}, "unknown node ids"),
        ({"node_threshold": 0.0}, "node_threshold"),
        ({"edge_threshold": 1.5}, "edge_threshold"),
    ],
)
def test_bad_arguments_raise_circuitmap_errors(tmp_path, arguments, message):
    with pytest.raises(CircuitmapError, match=message):
        export_graph_json(random_graph(11), tmp_path / "graph.json", **arguments)
    assert not list(tmp_path.iterdir())


def test_non_finite_values_fail_or_are_made_safe(tmp_path):
    graph = random_graph(12)
    graph.target_probs = np.array([0.6, np.nan])
    assert graph_json(graph, prune=False)["nodes"][-1]["token_prob"] == 0.0
    graph.weights[0] = np.inf
    with pytest.raises(CircuitmapError, match="non-finite edge weights"):
        export_graph_json(graph, tmp_path / "graph.json", prune=False)
    assert not list(tmp_path.iterdir())


def test_schema_rejects_malformed_documents():
    document = graph_json(random_graph(13))
    validate(document)
    broken = json.loads(json.dumps(document))
    broken["nodes"][0]["feature_type"] = "transcoder"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(document))
    del broken["links"][0]["weight"]
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = json.loads(json.dumps(document))
    broken["nodes"][-1]["clerp"] = "Austin"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_a_document_lists_its_strongest_links_within_its_budget_and_serves_the_rest():
    graph = random_graph(2, n_layers=5, n_positions=6)
    whole = graph_json(graph)
    budget = len(whole["links"]) // 3
    light = graph_json(graph, PruneConfig(document_links=budget))
    validate(light)
    assert len(light["links"]) == budget and light["metadata"]["n_edges"]["exported"] == budget
    assert light["metadata"]["n_edges"]["pruned"] == len(whole["links"])
    assert "pruned" not in whole["metadata"]["n_edges"]
    assert light["metadata"]["scores"] == whole["metadata"]["scores"]
    assert light["nodes"] == whole["nodes"]
    assert link_set(light) < link_set(whole)
    kept = prune(graph)
    ids = node_ids(graph)
    index_of = {identifier: node for node, identifier in enumerate(ids)}
    rows = graph.target_indices()
    totals = np.bincount(rows, weights=np.abs(graph.weights).astype(np.float64), minlength=graph.n_nodes)

    def score(link):
        row, source = index_of[link["target"]], index_of[link["source"]]
        edge = next(e for e in range(graph.indptr[row], graph.indptr[row + 1]) if graph.indices[e] == source)
        return abs(float(graph.weights[edge])) / totals[row] * kept.influence[row]

    left_out = link_set(whole) - link_set(light)
    weakest_listed = min(score(link) for link in light["links"])
    assert all(score({"source": s, "target": t}) <= weakest_listed for s, t, _ in left_out)
    assert link_set({"links": document_links(graph, light)}) == link_set(whole)


def test_served_links_keep_the_edges_of_nodes_held_beyond_pruning():
    graph = random_graph(3, n_layers=4, n_positions=5)
    kept = prune(graph, node_threshold=0.5)
    ids = node_ids(graph)
    outside = next(n for n in graph.nodes_of(NodeKind.FEATURE).tolist() if not kept.node_mask[n])
    document = graph_json(graph, node_threshold=0.5, pinned=[ids[outside]], kept=kept)
    assert link_set({"links": document_links(graph, document)}) == link_set(document)
    unpruned = graph_json(graph, prune=False)
    assert link_set({"links": document_links(graph, unpruned)}) == link_set(unpruned)
    other = random_graph(4, n_layers=4, n_positions=5)
    other_document = graph_json(other)
    other_document["nodes"].append({"node_id": "9_9_9"})
    with pytest.raises(CircuitmapError, match="not in the graph"):
        document_links(graph, other_document)


def test_a_link_budget_must_be_a_positive_integer():
    graph = random_graph(0)
    for bad in (0, -5, 2.5):
        with pytest.raises(CircuitmapError, match="document_links"):
            graph_json(graph, PruneConfig(document_links=bad))

"""Neuronpedia export: field layout, exact numbers, one feature versus a folder of batches, bad input."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers.features import build_tiny_llama_database, labelled_features

from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.features.neuronpedia import (
    BATCH_FEATURES,
    default_ids,
    export_neuronpedia,
    feature_json,
    histogram_bars,
)

NEURON_FIELDS = {
    "modelId",
    "layer",
    "index",
    "sourceSetName",
    "creatorId",
    "maxActApprox",
    "frac_nonzero",
    "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values",
    "pos_str",
    "pos_values",
    "neg_str",
    "neg_values",
}
ACTIVATION_FIELDS = {
    "id",
    "modelId",
    "layer",
    "index",
    "creatorId",
    "tokens",
    "values",
    "maxValue",
    "maxValueTokenIndex",
    "minValue",
    "qualifyingTokenIndex",
    "dataIndex",
    "dataSource",
    "binMin",
    "binMax",
    "binContains",
}
EXPLANATION_FIELDS = {
    "id",
    "modelId",
    "layer",
    "index",
    "description",
    "authorId",
    "typeName",
    "explanationModelName",
    "notes",
    "createdAt",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with FeatureStore(build_tiny_llama_database(tmp_path_factory.mktemp("neuronpedia"))) as opened:
        yield opened


def rich_feature(store: FeatureStore) -> tuple[int, int]:
    """A feature with top contexts, at least two quantile groups and a label."""
    for layer, feature in labelled_features(store):
        dashboard = store.get(layer, feature)
        if dashboard.top_examples and len(dashboard.quantile_groups) >= 2:
            return layer, feature
    raise AssertionError("no feature with examples in the tiny database")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_feature_json_fields_match_the_dashboard(store):
    layer, feature = rich_feature(store)
    dashboard = store.get(layer, feature)
    record = feature_json(store, layer, feature)

    assert NEURON_FIELDS | {"activations", "explanations"} == set(record)
    assert (record["modelId"], record["sourceSetName"]) == default_ids(store) == ("tiny-llama", "transcoders")
    assert record["layer"] == f"{layer}-transcoders" and record["index"] == str(feature)
    assert record["maxActApprox"] == dashboard.max_activation
    assert record["frac_nonzero"] == dashboard.density
    assert record["pos_str"] == [token for token, _ in dashboard.output_top]
    assert record["pos_values"] == [value for _, value in dashboard.output_top]
    assert record["neg_str"] == [token for token, _ in dashboard.output_bottom]
    assert record["neg_values"] == [value for _, value in dashboard.output_bottom]

    heights, values = record["freq_hist_data_bar_heights"], record["freq_hist_data_bar_values"]
    assert len(heights) == len(values) and sum(heights) == sum(dashboard.histogram) > 0
    assert heights[0] > 0 and heights[-1] > 0
    edges = dashboard.histogram_edges
    first = next(i for i, count in enumerate(dashboard.histogram) if count)
    assert heights == dashboard.histogram[first : first + len(heights)]
    for i, value in enumerate(values):
        assert edges[first + i] < value < edges[first + i + 1]
        assert math.isclose(value, math.sqrt(edges[first + i] * edges[first + i + 1]))

    activations = record["activations"]
    groups = dashboard.quantile_groups
    assert len(activations) == len(dashboard.top_examples) + sum(len(g.examples) for g in groups)
    for record_, example in zip(activations, dashboard.top_examples, strict=False):
        assert set(record_) == ACTIVATION_FIELDS
        assert (record_["binMin"], record_["binContains"]) == (-1.0, -1.0)
        assert record_["binMax"] == dashboard.max_activation
        assert record_["tokens"] == example.tokens and record_["values"] == example.activations
        assert record_["maxValue"] == example.max_activation == max(record_["values"])
        assert record_["maxValueTokenIndex"] == record_["qualifyingTokenIndex"] == example.peak
        assert record_["minValue"] == min(example.activations)
    sampled = activations[len(dashboard.top_examples) :]
    maxima = [r["maxValue"] for r in sampled]
    assert maxima == sorted(maxima, reverse=True), "quantile groups come highest first"
    assert math.isclose(sum({r["binMin"]: r["binContains"] for r in sampled}.values()), 1.0)
    for r in sampled:
        assert r["binMin"] <= r["maxValue"] <= r["binMax"]
    assert len({r["id"] for r in activations}) == len(activations)

    (explanation,) = record["explanations"]
    assert set(explanation) == EXPLANATION_FIELDS
    assert explanation["description"] == dashboard.label.text
    assert "auto" in explanation["notes"] and explanation["createdAt"] == dashboard.label.created


def test_numbers_round_trip_exactly(store, tmp_path):
    layer, feature = rich_feature(store)
    dashboard = store.get(layer, feature)
    path = tmp_path / "one.json"
    export_neuronpedia(store, path, features=[(layer, feature)])
    record = json.loads(path.read_text())

    stored = [example for example in dashboard.top_examples]
    stored += [example for group in reversed(dashboard.quantile_groups) for example in group.examples]
    by_id = {r["id"]: r for r in record["activations"]}
    assert len(by_id) == len(stored)
    exported = sorted(record["activations"], key=lambda r: (r["dataIndex"], r["values"]))
    expected = sorted(stored, key=lambda e: (str(e.context), e.activations))
    for r, example in zip(exported, expected, strict=True):
        assert r["values"] == example.activations
        assert np.array_equal(
            np.asarray(r["values"], dtype=np.float32), np.asarray(example.activations, np.float32)
        )
        assert all(float(np.float32(v)) == v for v in r["values"]), "values are float32 numbers"
        assert r["maxValue"] == example.max_activation
    assert record["maxActApprox"] == dashboard.max_activation
    assert record["frac_nonzero"] == dashboard.density
    assert record["pos_values"] == [value for _, value in dashboard.output_top]


def test_whole_set_export_writes_every_feature_in_batches(store, tmp_path):
    report = export_neuronpedia(store, tmp_path / "export", progress=False)
    total = store.n_layers * store.d_features
    assert report.features == total

    model_folder = tmp_path / "export" / "tiny-llama"
    assert sorted(p.name for p in model_folder.iterdir()) == [f"{layer}-transcoders" for layer in range(3)]
    features, activations, explanations = [], [], []
    for layer in range(store.n_layers):
        source = model_folder / f"{layer}-transcoders"
        batches = (store.d_features + BATCH_FEATURES - 1) // BATCH_FEATURES
        for table in ("features", "activations", "explanations"):
            assert sorted(p.name for p in (source / table).iterdir()) == [
                f"batch-{n}.jsonl.gz" for n in range(batches)
            ]
        features += read_lines(source / "features" / "batch-0.jsonl.gz")
        activations += read_lines(source / "activations" / "batch-0.jsonl.gz")
        explanations += read_lines(source / "explanations" / "batch-0.jsonl.gz")

    assert len(features) == total and (report.activations, report.explanations) == (
        len(activations),
        len(explanations),
    )
    assert {(f["layer"], f["index"]) for f in features} == {
        (f"{layer}-transcoders", str(feature)) for layer in range(3) for feature in range(store.d_features)
    }
    assert all(set(f) == NEURON_FIELDS for f in features)
    assert all(set(a) == ACTIVATION_FIELDS for a in activations)
    assert all(set(e) == EXPLANATION_FIELDS for e in explanations)
    assert len(explanations) == len(labelled_features(store))

    layer, feature = rich_feature(store)
    nested = feature_json(store, layer, feature)
    flat = next(f for f in features if (f["layer"], f["index"]) == (nested["layer"], nested["index"]))
    assert flat == {key: value for key, value in nested.items() if key in NEURON_FIELDS}
    assert [a for a in activations if (a["layer"], a["index"]) == (flat["layer"], flat["index"])] == nested[
        "activations"
    ]


def test_one_feature_file_versus_a_list_folder(store, tmp_path):
    layer, feature = rich_feature(store)
    single = tmp_path / "feature.json"
    report = export_neuronpedia(
        store, single, features=[(layer, feature)], model_id="my-model", source_id="tc"
    )
    assert report.files == [single] and report.features == 1
    record = json.loads(single.read_text())
    assert record == feature_json(store, layer, feature, model_id="my-model", source_id="tc")
    assert record["layer"] == f"{layer}-tc" and record["modelId"] == "my-model"

    folder = tmp_path / "listed"
    report = export_neuronpedia(
        store, folder, features=[(0, 1), (2, 3), (0, 1)], source_id="tc", progress=False
    )
    assert report.features == 2 and len(report.files) == 6
    assert [
        f["index"] for f in read_lines(folder / "tiny-llama" / "0-tc" / "features" / "batch-0.jsonl.gz")
    ] == ["1"]
    assert [
        f["index"] for f in read_lines(folder / "tiny-llama" / "2-tc" / "features" / "batch-0.jsonl.gz")
    ] == ["3"]
    assert not (folder / "tiny-llama" / "1-tc").exists()

    again = tmp_path / "again"
    export_neuronpedia(store, again, features=[(0, 1), (2, 3)], source_id="tc", progress=False)
    for path in report.files:
        assert path.read_bytes() == (again / path.relative_to(folder)).read_bytes(), (
            "exports are reproducible"
        )

    with pytest.raises(CircuitmapError, match="one feature"):
        export_neuronpedia(store, tmp_path / "two.json", features=[(0, 1), (0, 2)])
    with pytest.raises(CircuitmapError, match="one feature"):
        export_neuronpedia(store, tmp_path / "all.json")


def test_bad_features_and_ids_give_clear_errors(store, tmp_path):
    with pytest.raises(CircuitmapError, match="no feature 0 in layer 7"):
        feature_json(store, 7, 0)
    with pytest.raises(CircuitmapError, match="no feature 999 in layer 0"):
        export_neuronpedia(store, tmp_path / "x.json", features=[(0, 999)])
    with pytest.raises(CircuitmapError, match="no feature 5 in layer -1"):
        export_neuronpedia(store, tmp_path / "folder", features=[(0, 1), (-1, 5)], progress=False)
    assert not (tmp_path / "folder").exists(), "nothing is written when a feature is out of range"
    with pytest.raises(CircuitmapError, match="model id 'My Model'.*'my-model'"):
        feature_json(store, 0, 1, model_id="My Model")
    with pytest.raises(CircuitmapError, match="no features"):
        export_neuronpedia(store, tmp_path / "none", features=[])


def test_histogram_bars_trim_empty_ends():
    edges = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert histogram_bars([0, 3, 0, 5], edges) == ([3, 0, 5], [math.sqrt(8), math.sqrt(32), math.sqrt(128)])
    assert histogram_bars([0, 0, 0, 0], edges) == ([], [])

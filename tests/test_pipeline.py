"""Prompt → graph folder: the pipeline is attribution, pruning, the logit lens and labels, written as one
unit; it refuses a run that would not fit before any work, and a stopped run writes nothing."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from helpers.features import build_engine_database
from helpers.graphs import SERVER_PROMPT

from circuitmap import (
    AttributionConfig,
    GraphFolder,
    PruneConfig,
    attribute,
    compute_graph,
    compute_graph_folder,
)
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.features import FeatureStore, add_logit_lens
from circuitmap.graphs import graph_json, prune
from circuitmap.graphs.grouping import group_features


def _comparable(document: dict) -> dict:
    """A document without what differs between two runs (timings, creation time)."""
    document = json.loads(json.dumps(document))
    document["metadata"].pop("info")
    return document


def test_the_folder_holds_the_graph_and_its_labelled_document(engine, tmp_path):
    database = build_engine_database(engine, tmp_path)
    attribution, pruning = AttributionConfig(max_feature_nodes=40), PruneConfig(node_threshold=0.9)
    with FeatureStore(database, engine.transcoders) as store:
        computed = compute_graph_folder(
            engine.model,
            engine.transcoders,
            SERVER_PROMPT,
            tmp_path / "cat",
            attribution,
            pruning,
            features=store,
            progress=False,
        )
    folder = GraphFolder(tmp_path / "cat")
    graph = attribute(engine.model, engine.transcoders, SERVER_PROMPT, attribution, progress=False)
    np.testing.assert_array_equal(folder.read_graph().weights, graph.weights)
    expected = add_logit_lens(graph_json(graph, pruning), engine.model, engine.transcoders)
    stored = folder.read_document()
    labels = {node["node_id"]: node["clerp"] for node in stored["nodes"]}
    grouping = group_features(graph, prune(graph, pruning), labels=labels)
    assert grouping.groups and stored["qParams"]["supernodes"] == [g.as_supernode() for g in grouping.groups]
    assert stored["qParams"]["pinnedIds"] == [m for g in grouping.groups for m in g.members]
    stored["qParams"].update(pinnedIds=[], supernodes=[])
    labelled = [node for node in stored["nodes"] if node.get("label_source")]
    assert labelled and all(node["clerp"] for node in labelled)
    for node in stored["nodes"]:
        node.pop("label_source", None)
        if node["feature_type"] == "cross layer transcoder":
            node["clerp"] = ""
    assert _comparable(stored) == _comparable(expected)
    assert computed.graph.n_features == 40 and set(computed.seconds) == {"attribution", "pruning"}
    summary = computed.summary(top=3)
    for expected_line in (
        "graph:",
        "pruned (0.9 / 0.98):",
        "replacement score:",
        "most influential",
        "time:",
    ):
        assert expected_line in summary
    assert summary.count(" feature ") == 3 and "label '" in summary


def test_a_run_that_would_not_fit_is_refused_before_any_work(engine, tmp_path, monkeypatch):
    monkeypatch.setattr("circuitmap.attribution.estimate.available_memory", lambda device: 1024)
    with pytest.raises(CircuitmapError, match="exceeds the available"):
        compute_graph_folder(
            engine.model,
            engine.transcoders,
            SERVER_PROMPT,
            tmp_path / "cat",
            check_memory=True,
            progress=False,
        )
    assert not (tmp_path / "cat").exists()
    compute_graph(engine.model, engine.transcoders, SERVER_PROMPT, progress=False)


def test_a_stopped_run_writes_nothing(engine, tmp_path):
    stop = threading.Event()
    calls = []

    def progress(stage: str, done: int, total: int) -> None:
        calls.append(stage)
        stop.set()

    with pytest.raises(Interrupted, match="nothing was written"):
        compute_graph_folder(
            engine.model,
            engine.transcoders,
            SERVER_PROMPT,
            tmp_path / "cat",
            AttributionConfig(batch_size=2),
            progress=progress,
            stop=stop,
        )
    assert calls and list(tmp_path.iterdir()) == []


def test_targets_reach_the_graph(engine):
    computed = compute_graph(
        engine.model, engine.transcoders, SERVER_PROMPT, targets=["a", ("e", "o")], progress=False
    )
    assert computed.graph.target_names == ["a", "e − o"]
    assert torch.isfinite(torch.as_tensor(computed.graph.weights)).all()


def test_a_progress_callback_hears_each_stage(engine):
    stages = []
    compute_graph(
        engine.model,
        engine.transcoders,
        SERVER_PROMPT,
        AttributionConfig(max_feature_nodes=10),
        progress=lambda stage, done, total: stages.append(stage),
    )
    assert list(dict.fromkeys(stages)) == [
        "selecting features",
        "recomputing rows",
        "pruning, scores and logit lens",
    ]

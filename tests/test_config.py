"""Settings dataclasses: documented field by field, changed with None meaning "keep", and the same run whether
given as an object or as keywords."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from helpers.graphs import random_graph
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import AttributionConfig, BuildConfig, PruneConfig, attribute, prune
from circuitmap.config import Settings, field_docs
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import graph_json
from circuitmap.server import Engine
from circuitmap.training import TrainConfig

SETTINGS = [AttributionConfig, PruneConfig, BuildConfig, TrainConfig]


@pytest.mark.parametrize("settings", [*SETTINGS, Engine])
def test_every_field_has_a_one_line_docstring(settings):
    docs = field_docs(settings)
    source = inspect.getsource(settings)
    for field in dataclasses.fields(settings):
        assert docs.get(field.name), f"{settings.__name__}.{field.name} has no docstring"
        assert f'"""{docs[field.name]}"""' in source, f"{settings.__name__}.{field.name}: one line"


@pytest.mark.parametrize("settings", SETTINGS)
def test_changes_keep_none_and_refuse_unknown_names(settings):
    base = settings()
    first = dataclasses.fields(settings)[0]
    assert base.with_changes(**{first.name: None}) == base
    with pytest.raises(CircuitmapError, match="unknown"):
        base.with_changes(no_such_setting=1)
    with pytest.raises(CircuitmapError, match="unknown"):
        settings.from_dict({**base.to_dict(), "no_such_setting": 1})
    assert settings.from_dict(base.to_dict()) == base
    assert issubclass(settings, Settings)


def test_a_new_window_keeps_the_share_before_the_peak():
    assert BuildConfig().with_changes(window=16).before == 12
    assert BuildConfig().with_changes(window=16, before=3).before == 3
    assert BuildConfig().with_changes(window=1).before == 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (AttributionConfig(max_n_logits=0), "max_n_logits must be at least 1"),
        (AttributionConfig(desired_logit_prob=1.5), "desired_logit_prob must be in"),
        (AttributionConfig(desired_logit_prob=float("nan")), "desired_logit_prob must be a finite number"),
        (AttributionConfig(max_feature_nodes=-1), "zero or more"),
        (AttributionConfig(batch_size=0), "batch_size must be at least 1"),
        (PruneConfig(node_threshold=0.0), "node_threshold must be in"),
        (PruneConfig(edge_threshold=float("nan")), "edge_threshold must be a finite number"),
        (TrainConfig(sparsity_coef=float("nan")), "sparsity_coef must be a finite number"),
        (TrainConfig(lr=float("inf")), "lr must be a finite number"),
        (TrainConfig(aux_coef=-1.0), "aux_coef must be zero or more"),
        (TrainConfig(k=2.5), "k must be a whole number"),
        (TrainConfig(max_grad_norm=0.0), "max_grad_norm must be positive"),
        (TrainConfig(decay_fraction=1.5), r"decay_fraction must be in \[0, 1\]"),
        (BuildConfig(seed=0.5), "seed must be a whole number"),
        (BuildConfig(before=-1), "before must be zero or more"),
    ],
)
def test_out_of_range_settings(config, message):
    with pytest.raises(CircuitmapError, match=message):
        config.check()


def test_attribution_settings_as_an_object_or_keywords():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-jumprelu", model.n_layers, model.d_model)
    config = AttributionConfig(max_feature_nodes=25, batch_size=5, max_n_logits=3)
    by_object = attribute(model, transcoders, "The cat sat on", config, progress=False)
    by_keywords = attribute(
        model,
        transcoders,
        "The cat sat on",
        max_feature_nodes=25,
        batch_size=5,
        max_n_logits=3,
        progress=False,
    )
    overridden = attribute(model, transcoders, "The cat sat on", config, max_feature_nodes=10, progress=False)
    np.testing.assert_array_equal(by_object.weights, by_keywords.weights)
    assert by_object.n_features == 25 and overridden.n_features == 10 and len(by_object.target_names) <= 3


def test_prune_settings_as_an_object_or_keywords():
    graph = random_graph(0)
    config = PruneConfig(node_threshold=0.6, edge_threshold=0.9)
    by_object, by_keywords = prune(graph, config), prune(graph, node_threshold=0.6, edge_threshold=0.9)
    np.testing.assert_array_equal(by_object.node_mask, by_keywords.node_mask)
    np.testing.assert_array_equal(by_object.edge_mask, by_keywords.edge_mask)
    document = graph_json(graph, config)
    assert (document["metadata"]["node_threshold"], document["metadata"]["edge_threshold"]) == (0.6, 0.9)
    assert graph_json(graph, config, node_threshold=0.7)["metadata"]["node_threshold"] == 0.7
    defaults = graph_json(graph)["metadata"]
    assert (defaults["node_threshold"], defaults["edge_threshold"]) == (
        PruneConfig().node_threshold,
        PruneConfig().edge_threshold,
    )

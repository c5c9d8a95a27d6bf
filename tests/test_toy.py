"""Toy models of superposition: the metrics on hand-built geometries, and the paper's two known results."""

from __future__ import annotations

import math

import pytest
import torch

from circuitmap.errors import CircuitmapError
from circuitmap.toy import (
    ToyConfig,
    dimensionality,
    feature_norms,
    represented,
    sample_features,
    superposition,
    train_toy_models,
)


def test_dimensionality_is_one_alone_a_half_in_an_antipodal_pair_and_two_fifths_in_a_pentagon():
    alone = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # two features, each with a dimension of its own
    torch.testing.assert_close(dimensionality(alone), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(superposition(alone), torch.tensor([0.0, 0.0]))
    pair = torch.tensor([[1.0, -1.0]])
    torch.testing.assert_close(dimensionality(pair), torch.tensor([0.5, 0.5]))
    angles = torch.arange(5) * 2 * math.pi / 5
    pentagon = torch.stack([angles.cos(), angles.sin()])
    torch.testing.assert_close(dimensionality(pentagon), torch.full((5,), 0.4), atol=1e-6, rtol=0)
    torch.testing.assert_close(feature_norms(pentagon), torch.ones(5))
    assert represented(pentagon).item() == 5 and represented(0.1 * pentagon).item() == 0


def test_inputs_have_the_asked_density_within_the_unit_interval():
    x = sample_features(torch.tensor([1.0, 0.1]), 20, 4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2, 20) and x.min() >= 0 and x.max() <= 1
    present = (x > 0).float().mean(dim=(0, 2))
    assert present[0] > 0.99 and abs(float(present[1]) - 0.1) < 0.01


@pytest.fixture(scope="module")
def trained():
    config = ToyConfig(steps=3_000)
    return train_toy_models(config, [1.0, 0.01], progress=False).W


def test_dense_features_get_the_m_most_important_dimensions_without_interference(trained):
    W = trained[0]
    norms = feature_norms(W)
    assert represented(W).item() == 5
    torch.testing.assert_close(norms[:5], torch.ones(5), atol=0.05, rtol=0)
    assert norms[5:].max() < 0.2
    assert superposition(W)[:5].max() < 0.01
    torch.testing.assert_close(dimensionality(W)[:5], torch.ones(5), atol=0.02, rtol=0)


def test_sparse_features_are_packed_into_more_directions_than_dimensions(trained):
    W = trained[1]
    assert represented(W).item() > 5
    shared = superposition(W)[feature_norms(W) >= 0.5]
    assert shared.max() > 0.1  # represented features now share directions


def test_training_is_seeded_and_bad_settings_are_refused():
    config = ToyConfig(n_features=6, n_hidden=2, steps=20, batch_size=16)
    first = train_toy_models(config, [0.5], progress=False).W
    torch.testing.assert_close(first, train_toy_models(config, [0.5], progress=False).W, rtol=0, atol=0)
    assert not torch.equal(first, train_toy_models(config.with_changes(seed=1), [0.5], progress=False).W)
    with pytest.raises(CircuitmapError, match="density"):
        train_toy_models(config, [0.0])
    with pytest.raises(CircuitmapError, match="at least one"):
        train_toy_models(config, [])
    with pytest.raises(CircuitmapError, match="n_hidden"):
        train_toy_models(config.with_changes(n_hidden=0), [0.5])

"""Toy models of superposition: the metrics on hand-built geometries, the paper's known results (dense and
sparse models, the two-feature phase diagram's corners) and sparse dictionaries that recover superposed
features."""

from __future__ import annotations

import math

import pytest
import torch

from circuitmap.errors import CircuitmapError
from circuitmap.toy import (
    DictionaryConfig,
    ToyConfig,
    best_cosines,
    chance_cosines,
    dimensionality,
    feature_norms,
    importance,
    represented,
    sample_features,
    superposition,
    train_sparse_dictionary,
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


def test_per_instance_importance_decides_which_features_a_dense_model_keeps():
    config = ToyConfig(n_features=4, n_hidden=2, steps=3_000, batch_size=128)
    rows = [[1.0, 1.0, 1e-3, 1e-3], [1e-3, 1e-3, 1.0, 1.0]]
    norms = feature_norms(train_toy_models(config, [1.0, 1.0], importances=rows, progress=False).W)
    assert norms[0, :2].min() > 0.9 and norms[0, 2:].max() < 0.2  # the first two matter: they are kept
    assert norms[1, 2:].min() > 0.9 and norms[1, :2].max() < 0.2  # the last two matter: they are kept
    same = config.with_changes(steps=20)
    default = train_toy_models(same, [0.5, 0.1], progress=False).W
    explicit = importance(same).expand(2, -1)
    torch.testing.assert_close(
        train_toy_models(same, [0.5, 0.1], importances=explicit, progress=False).W, default, rtol=0, atol=0
    )


def test_two_features_in_one_dimension_the_phase_diagrams_corners():
    """n = 2, m = 1, feature 1 of importance 1: a dense extra feature 10× as important takes the dimension,
    one 10× less important is dropped; sparse and equally important, the two share it antipodally."""
    config = ToyConfig(n_features=2, n_hidden=1, steps=2_000, batch_size=512)
    replicates = 4
    densities = [1.0, 1.0] + [0.02] * replicates
    rows = [[1.0, 10.0], [1.0, 0.1]] + [[1.0, 1.0]] * replicates
    W = train_toy_models(config, densities, importances=rows, progress=False).W[:, 0, :]
    dedicated, dropped, sparse = W[0].abs(), W[1].abs(), W[2:]
    assert dedicated[1] > 0.9 and dedicated[0] < 0.2
    assert dropped[0] > 0.9 and dropped[1] < 0.2
    antipodal = (sparse.abs().min(dim=1).values > 0.5) & (sparse[:, 0] * sparse[:, 1] < 0)
    assert antipodal.any()


def _superposed_features(generator: torch.Generator) -> torch.Tensor:
    """12 features in 8 dimensions: four triangles (each three features 120° apart in a plane), rotated."""
    angles = torch.arange(3) * 2 * math.pi / 3
    triangle = torch.stack([angles.cos(), angles.sin()])
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=generator))
    return rotation @ torch.block_diag(*[triangle] * 4)


def test_a_sparse_dictionary_recovers_superposed_features_and_a_random_one_does_not():
    generator = torch.Generator().manual_seed(0)
    W = _superposed_features(generator)
    torch.testing.assert_close(dimensionality(W), torch.full((12,), 2 / 3), atol=1e-5, rtol=0)
    h = sample_features(torch.tensor([0.05]), 12, 20_000, generator)[:, 0] @ W.T
    config = DictionaryConfig(n_latents=24, l1=0.3, steps=1_000, batch_size=256)
    dictionary = train_sparse_dictionary(h, config, progress=False)
    assert dictionary.directions.shape == (8, 24)
    torch.testing.assert_close(dictionary.directions.norm(dim=0), torch.ones(24))
    # recovered: a cosine that a random direction beats 1 time in 100 against 24 random ones
    threshold = float(chance_cosines(8, 24, samples=20_000).quantile(0.99))
    assert 0.85 < threshold < 0.95
    assert best_cosines(W, dictionary.directions).min() > threshold
    random_dictionary = torch.randn(8, 24, generator=generator)
    assert (best_cosines(W, random_dictionary) > threshold).sum() <= 2
    assert best_cosines(W, W).min() > 0.999 and best_cosines(W, -W).max() < 0.6


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: train_toy_models(ToyConfig(steps=1), [0.5], importances=[[1.0] * 19]), r"shape \[1, 20\]"),
        (lambda: train_toy_models(ToyConfig(steps=1), [0.5], importances=[[-1.0] * 20]), "zero or more"),
        (lambda: train_toy_models(ToyConfig(steps=1), [0.5], importances=[[math.nan] * 20]), "finite"),
        (lambda: train_toy_models(ToyConfig(steps=1), [0.5], importances="heavy"), "table of numbers"),
        (lambda: train_sparse_dictionary(torch.ones(5)), r"tensor \[samples, dimensions\]"),
        (lambda: train_sparse_dictionary(torch.full((4, 2), math.inf)), "finite"),
        (lambda: train_sparse_dictionary(torch.ones(4, 2), DictionaryConfig(n_latents=0)), "n_latents"),
        (lambda: train_sparse_dictionary(torch.ones(4, 2), DictionaryConfig(l1=-1)), "l1"),
        (lambda: best_cosines(torch.ones(3, 2), torch.ones(4, 2)), "3 dimensions, learned ones 4"),
        (lambda: best_cosines(torch.ones(3), torch.ones(3, 2)), "true directions"),
        (lambda: chance_cosines(0, 4), "dimensions"),
    ],
)
def test_bad_input_gets_a_one_line_error(call, message):
    with pytest.raises(CircuitmapError, match=message) as error:
        call()
    assert "\n" not in str(error.value)

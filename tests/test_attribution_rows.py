"""Rows computed on prefix graphs, many copies per pass, equal rows computed the direct way.

The direct way: one backward pass per row through the replacement model's own graph over the whole prompt,
taking the gradient at every MLP output and at the embedding, and dotting it with every source's output.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap.attribution import compute, rows
from circuitmap.attribution.replacement import replacement_run
from circuitmap.attribution.rows import RowComputer
from circuitmap.attribution.sources import build_sources

PROMPT = "The quick brown fox jumps over the lazy dog, again and again"


def direct_rows(run, sources, spec) -> torch.Tensor:
    """Each row by its own backward pass over the whole prompt."""
    values = torch.zeros(len(spec), sources.n_columns, dtype=torch.float64)
    n_written = sources.n_features + sources.n_errors
    for row, point in enumerate(spec.point):
        layer, position = int(spec.layer[row]), int(spec.position[row])
        tensor = run.mlp_in[layer] if point == "mlp_in" else run.readouts[point]
        seed = torch.zeros_like(tensor)
        seed[0, position] = spec.vectors[row]
        gradients = torch.autograd.grad(
            tensor, [*run.leaves, run.embed], seed, retain_graph=True, allow_unused=True
        )
        for out_layer, gradient in enumerate(gradients[:-1]):
            if gradient is None:
                continue
            for written, columns, vectors in sources.writes[out_layer]:
                values[row, columns] += vectors @ gradient[0, written]
        if gradients[-1] is not None:
            values[row, n_written:] = (gradients[-1][0] * sources.embed).sum(-1)
    return values


@pytest.mark.parametrize(("family", "kind"), [("llama", "plt-topk-skip"), ("gemma2", "clt-jumprelu")])
def test_prefix_graph_rows_equal_direct_rows(family, kind, monkeypatch):
    monkeypatch.setattr(rows, "MIN_PREFIX_STEP", 5)
    model = tiny_model(family, torch.float64)
    transcoders = random_transcoders(kind, model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    ids = model.encode(PROMPT)
    with replacement_run(model, transcoders, ids) as run:
        features = compute.collect_features(run)
        sources = build_sources(run, transcoders, features, None, compute.FIRST_POSITION)
        chosen = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:60]
        readout = torch.randn(2, model.d_model, dtype=torch.float64)
        targets = rows.RowSpec(
            ["resid_final", "final_norm"],
            torch.full((2,), model.n_layers),
            torch.full((2,), ids.shape[1] - 1),
            readout,
        )
        spec = rows.concat_specs([compute.feature_rows(transcoders, features.subset(chosen)), targets])
        computer = RowComputer(model, transcoders, run, ids, rows_per_pass=7)
        computed = computer.compute(sources, spec)
        assert len(computer.graphs) > 2
        expected = direct_rows(run, sources, spec)
    scale = expected.abs().max()
    torch.testing.assert_close(computed, expected, rtol=0, atol=1e-12 * float(scale))


def test_passes_follow_prefix_then_layer(monkeypatch):
    monkeypatch.setattr(rows, "MIN_PREFIX_STEP", 5)
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    ids = model.encode(PROMPT)
    with replacement_run(model, transcoders, ids) as run:
        features = compute.collect_features(run)
        computer = RowComputer(model, transcoders, run, ids, rows_per_pass=16)
        spec = compute.feature_rows(transcoders, features)
        passes = computer.passes(spec)
    order = torch.cat([row_pass.members for row_pass in passes])
    assert sorted(order.tolist()) == list(range(len(spec)))
    prefixes = torch.tensor([computer.prefix_of(p) for p in spec.position[order].tolist()])
    assert bool((prefixes[1:] >= prefixes[:-1]).all())
    assert all(len(row_pass.members) <= row_pass.copies <= 16 for row_pass in passes)
    assert all(int(spec.position[row_pass.members].max()) < row_pass.length for row_pass in passes)
    assert len(set(prefixes.tolist())) > 2


def test_rows_of_many_layers_go_in_shallower_smaller_passes(monkeypatch):
    """Rows of one prefix spread over every layer: cutting them by layer costs less than one deep pass."""
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    ids = model.encode(PROMPT)
    with replacement_run(model, transcoders, ids) as run:
        computer = RowComputer(model, transcoders, run, ids, rows_per_pass=64)
        n_rows = 64
        layers = torch.arange(n_rows) % model.n_layers
        spec = rows.RowSpec(
            ["mlp_in"] * n_rows,
            layers,
            torch.full((n_rows,), ids.shape[1] - 1),
            torch.randn(n_rows, model.d_model, dtype=torch.float64),
        )
        passes = computer.passes(spec)
        assert len(passes) > 1
        assert {row_pass.copies for row_pass in passes} <= {64, 16}
        for row_pass in passes:
            assert bool((spec.layer[row_pass.members].diff() >= 0).all())
        sources = build_sources(run, transcoders, compute.collect_features(run), None, compute.FIRST_POSITION)
        computed = computer.compute(sources, spec)
        expected = direct_rows(run, sources, spec)
    torch.testing.assert_close(computed, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))

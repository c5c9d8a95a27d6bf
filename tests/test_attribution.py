"""Attribution graphs are exact: every edge is checked against the frozen replacement model itself.

The oracle below re-implements the local replacement model with hooks only (no attribution code): attention
patterns and norm scales frozen, each MLP output replaced by the transcoders' fixed feature outputs, the error
vector, the decoder bias and the skip term of the current MLP input. Perturbing one node's output there must
change every feature pre-activation and target value by exactly that node's column of the adjacency matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.models import FAMILIES, STORIES, needs_shared, tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import CircuitmapError, load_model
from circuitmap.attribution import Direction, attribute, compute
from circuitmap.graphs import Graph, NodeKind

PROMPT = "The cat sat on"
KINDS = ["plt-topk-skip", "plt-jumprelu", "clt-jumprelu-skip", "clt-topk"]


class Oracle:
    """The frozen local replacement model, run with hooks; reads feature pre-activations and targets."""

    def __init__(self, model, transcoders, graph: Graph, targets):
        self.model, self.transcoders, self.graph = model, transcoders, graph
        self.ids = model.encode(graph.prompt)
        self.targets = targets
        self.frozen = model.freeze(self.ids)
        self.frozen.__enter__()
        _, cache = model.run_with_cache(self.ids, points=["mlp_in", "mlp_out", "resid_pre"])
        n = model.n_layers
        self.clean_in = [cache["mlp_in", layer][0] for layer in range(n)]
        self.clean_out = [cache["mlp_out", layer][0] for layer in range(n)]
        self.embed = cache["resid_pre", 0][0]
        self.acts = [transcoders.encode(layer, self.clean_in[layer]) for layer in range(n)]
        self.const = [self.clean_out[m] - transcoders.skip(m, self.clean_in[m]) for m in range(n)]
        self.clean = self.read()

    def close(self):
        self.frozen.__exit__(None, None, None)

    def read(self, deltas=None, embed_delta=None, outputs=None) -> np.ndarray:
        """Every row's value (feature pre-activations, then targets) under the given changes."""
        n = self.model.n_layers
        deltas = deltas or {}
        inputs: dict[int, torch.Tensor] = {}
        readouts = {}

        def keep_input(layer):
            def keep(x):
                inputs[layer] = x[0]

            return keep

        def replace_output(layer):
            def replace(out):
                base = self.const[layer] if outputs is None else outputs[layer]
                new = base + self.transcoders.skip(layer, inputs[layer]) + deltas.get(layer, 0)
                return new.unsqueeze(0).to(out.dtype)

            return replace

        def keep_readout(point):
            def keep(x):
                readouts[point] = x[0, -1]

            return keep

        hooks = [("mlp_in", layer, keep_input(layer)) for layer in range(n)]
        hooks += [("mlp_out", layer, replace_output(layer)) for layer in range(n)]
        hooks += [
            ("final_norm", None, keep_readout("final_norm")),
            ("resid_final", None, keep_readout("resid_final")),
        ]
        if embed_delta is not None:
            hooks.append(("resid_pre", 0, lambda x: x + embed_delta))
        with self.model.hooks(*hooks), torch.no_grad():
            self.model.forward(self.ids)
        graph = self.graph
        features = graph.nodes_of(NodeKind.FEATURE)
        pre = torch.stack([self.transcoders.pre_activations(layer, inputs[layer]) for layer in range(n)])
        values = pre[graph.layer[features], graph.position[features], graph.index[features]].tolist()
        values += [float(readouts[t.point] @ t.vector) + t.offset for t in self.targets]
        return np.array(values)

    def node_output(self, node: int, graph: Graph):
        """The (deltas per MLP output, embedding delta) that adds node ``node``'s output once more."""
        kind, layer, pos = NodeKind(int(graph.kind[node])), int(graph.layer[node]), int(graph.position[node])
        n = self.model.n_layers
        zero = torch.zeros_like(self.embed)
        if kind == NodeKind.TOKEN:
            delta = zero.clone()
            delta[pos] = self.embed[pos]
            return {}, delta
        deltas = {}
        if kind == NodeKind.ERROR:
            folded = self.clean_out[layer] - self.transcoders.skip(layer, self.clean_in[layer])
            acts = [a if i <= layer else None for i, a in enumerate(self.acts)]
            error = folded - self.transcoders.decode(acts, layer)
            delta = zero.clone()
            delta[pos] = error[pos] + self._dropped_output(graph, layer, pos, layer)
            deltas[layer] = delta
            for m in range(layer + 1, n) if self.transcoders.kind == "clt" else ():
                delta = zero.clone()
                delta[pos] = self._dropped_output(graph, layer, pos, m)
                deltas[m] = delta
            return deltas, None
        index = int(graph.index[node])
        outputs = range(layer, n) if self.transcoders.kind == "clt" else [layer]
        for m in outputs:
            delta = zero.clone()
            vector = self.transcoders.decoder_vectors(layer, torch.tensor([index]), m)[0]
            delta[pos] = self.acts[layer][pos, index] * vector
            deltas[m] = delta
        return deltas, None

    def _dropped_output(self, graph: Graph, layer: int, pos: int, out_layer: int) -> torch.Tensor:
        """Outputs onto ``out_layer`` of the features active at (layer, pos) that the graph does not keep."""
        kept = {
            int(graph.index[f])
            for f in graph.nodes_of(NodeKind.FEATURE)
            if graph.layer[f] == layer and graph.position[f] == pos
        }
        active = self.acts[layer][pos].nonzero(as_tuple=True)[0].tolist()
        dropped = torch.tensor([i for i in active if i not in kept], dtype=torch.long)
        if len(dropped) == 0:
            return torch.zeros(self.model.d_model, dtype=torch.float64)
        vectors = self.transcoders.decoder_vectors(layer, dropped, out_layer)
        return (self.acts[layer][pos, dropped, None] * vectors).sum(0)

    def bias(self) -> np.ndarray:
        """Row values with every node's output removed: what only biases and the first position give."""
        n = self.model.n_layers
        outputs = []
        for layer in range(n):
            out = self.transcoders.decode([None] * n, layer).expand_as(self.const[layer]).clone()
            out[0] = self.const[layer][0]
            outputs.append(out)
        return self.read(outputs=outputs, embed_delta=-self.embed)


def _rows(graph: Graph) -> np.ndarray:
    return np.concatenate([graph.nodes_of(NodeKind.FEATURE), graph.nodes_of(NodeKind.TARGET)])


def _check_exact(model, transcoders, graph: Graph, targets, n_sampled_features: int = 25, atol: float = 1e-9):
    from circuitmap.attribution.targets import resolve_targets

    resolved = resolve_targets(model, model.logits(graph.prompt)[0, -1], targets)
    oracle = Oracle(model, transcoders, graph, resolved)
    try:
        rows = _rows(graph)
        adjacency = graph.dense_adjacency()[rows]
        np.testing.assert_allclose(oracle.clean, graph.value[rows], rtol=0, atol=atol)
        np.testing.assert_allclose(adjacency.sum(1) + oracle.bias(), graph.value[rows], rtol=0, atol=atol)
        features = graph.nodes_of(NodeKind.FEATURE)
        rng = np.random.default_rng(0)
        sampled = rng.choice(features, size=min(n_sampled_features, len(features)), replace=False)
        others = np.concatenate([graph.nodes_of(NodeKind.ERROR), graph.nodes_of(NodeKind.TOKEN)])
        for node in np.concatenate([sampled, others]):
            deltas, embed_delta = oracle.node_output(int(node), graph)
            change = oracle.read(deltas=deltas, embed_delta=embed_delta) - oracle.clean
            np.testing.assert_allclose(
                change,
                adjacency[:, node],
                rtol=0,
                atol=atol,
                err_msg=f"column of node {graph.node_id(int(node))}",
            )
    finally:
        oracle.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_edges_match_perturbations_of_the_frozen_model(family, kind):
    model = tiny_model(family, torch.float64)
    transcoders = random_transcoders(kind, model.n_layers, model.d_model)
    graph = attribute(model, transcoders, PROMPT, progress=False)
    assert graph.n_features > 20
    _check_exact(model, transcoders, graph, None)


def test_explicit_difference_and_direction_targets():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    direction = Direction("random direction", torch.randn(model.d_model, dtype=torch.float64))
    targets = ["a", ("e", "o"), direction]
    graph = attribute(model, transcoders, PROMPT, targets=targets, progress=False)
    assert graph.target_names == ["a", "e − o", "random direction"]
    np.testing.assert_allclose(graph.target_weight[graph.nodes_of(NodeKind.TARGET)], [1 / 3] * 3)
    _check_exact(model, transcoders, graph, targets)


@pytest.mark.parametrize("kind", ["plt-jumprelu", "clt-jumprelu-skip"])
@pytest.mark.parametrize("pool_factor", [1, 0])
def test_capped_graph_is_the_uncapped_graph_with_dropped_features_folded(kind, pool_factor, monkeypatch):
    """With no candidates beyond the visited features, early rows miss kept features and are recomputed."""
    monkeypatch.setattr(compute, "POOL_FACTOR", pool_factor)
    monkeypatch.setattr(compute, "POOL_BUDGET_BYTES", 0)
    model = tiny_model("gemma2", torch.float64)
    transcoders = random_transcoders(kind, model.n_layers, model.d_model)
    full = attribute(model, transcoders, PROMPT, progress=False)
    capped = attribute(model, transcoders, PROMPT, progress=False, max_feature_nodes=30, batch_size=7)
    assert capped.n_features == 30 < full.n_features
    _check_exact(model, transcoders, capped, None)

    def key(graph, node):
        return (
            int(graph.kind[node]),
            int(graph.layer[node]),
            int(graph.position[node]),
            int(graph.index[node]),
        )

    full_index = {key(full, node): node for node in range(full.n_nodes)}
    mapping = np.array([full_index[key(capped, node)] for node in range(capped.n_nodes)])
    dense_full, dense_capped = full.dense_adjacency(), capped.dense_adjacency()
    kept = set(mapping.tolist())
    expected = dense_full[np.ix_(mapping, mapping)]
    errors = {
        (int(full.layer[n]), int(full.position[n])): i
        for i, n in enumerate(mapping)
        if capped.kind[i] == NodeKind.ERROR
    }
    for node in full.nodes_of(NodeKind.FEATURE):
        if node not in kept:
            column = errors[(int(full.layer[node]), int(full.position[node]))]
            expected[:, column] += dense_full[mapping, node]
    rows = _rows(capped)
    np.testing.assert_allclose(dense_capped[rows], expected[rows], rtol=0, atol=1e-10)


def test_cap_above_the_number_of_active_features_keeps_them_all():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    full = attribute(model, transcoders, PROMPT, progress=False)
    capped = attribute(model, transcoders, PROMPT, progress=False, max_feature_nodes=10_000)
    np.testing.assert_array_equal(full.indices, capped.indices)
    np.testing.assert_array_equal(full.weights, capped.weights)


def test_batch_size_does_not_change_the_graph():
    model = tiny_model("gpt2", torch.float64)
    transcoders = random_transcoders("clt-topk", model.n_layers, model.d_model)
    one = attribute(model, transcoders, PROMPT, progress=False, batch_size=1)
    many = attribute(model, transcoders, PROMPT, progress=False, batch_size=64)
    np.testing.assert_array_equal(one.indptr, many.indptr)
    np.testing.assert_allclose(one.weights, many.weights, rtol=0, atol=1e-12)


def test_float32_graph_is_close_to_float64():
    model64 = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model64.n_layers, model64.d_model)
    exact = attribute(model64, transcoders, PROMPT, progress=False)
    model32 = tiny_model("llama", torch.float32)
    approx = attribute(model32, transcoders, PROMPT, progress=False)
    assert approx.weights.dtype == np.float32
    np.testing.assert_allclose(approx.dense_adjacency(), exact.dense_adjacency(), rtol=0, atol=1e-4)


def test_bad_input():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    with pytest.raises(CircuitmapError, match="not a single token: it tokenises as"):
        attribute(model, transcoders, PROMPT, targets=["ab"], progress=False)
    with pytest.raises(CircuitmapError, match="context is 64"):
        attribute(model, transcoders, "x" * 65, progress=False)
    with pytest.raises(CircuitmapError, match="layers of width"):
        attribute(model, random_transcoders("plt-topk", 2, model.d_model), PROMPT, progress=False)
    silent = random_transcoders("plt-jumprelu", model.n_layers, model.d_model)
    for layer in silent.layers:
        layer.b_enc -= 1e6
    with pytest.raises(CircuitmapError, match="no transcoder feature is active"):
        attribute(model, silent, PROMPT, progress=False)
    with pytest.raises(CircuitmapError, match="at least two tokens"):
        attribute(model, transcoders, "a", progress=False)


@needs_shared(STORIES)
@pytest.mark.parametrize("kind", ["plt-jumprelu", "clt-jumprelu-skip"])
def test_exact_on_stories260k(kind):
    model = load_model(STORIES / "stories260K.bin", dtype="float64")
    transcoders = random_transcoders(kind, model.n_layers, model.d_model, d_features=128)
    graph = attribute(
        model, transcoders, "Once upon a time, there was", progress=False, max_feature_nodes=200
    )
    assert graph.n_features == 200
    _check_exact(model, transcoders, graph, None, n_sampled_features=20, atol=1e-8)


def test_settings_out_of_range_and_batched_prompts():
    model = tiny_model("llama", torch.float64)
    transcoders = random_transcoders("plt-topk-skip", model.n_layers, model.d_model)
    for batch_size in (0, -3):
        with pytest.raises(CircuitmapError, match="batch_size must be at least 1"):
            attribute(model, transcoders, PROMPT, batch_size=batch_size, progress=False)
    ids = model.encode(PROMPT).repeat(2, 1)
    with pytest.raises(CircuitmapError, match="one prompt at a time, got a batch of 2"):
        attribute(model, transcoders, ids, progress=False)


def _node_keys(graph: Graph) -> list[tuple[int, int, int, int]]:
    """Each node's (kind, layer, position, index): what identifies it across graphs of one prompt."""
    return list(
        zip(
            graph.kind.tolist(),
            graph.layer.tolist(),
            graph.position.tolist(),
            graph.index.tolist(),
            strict=True,
        )
    )


def test_bfloat16_model_gives_a_float32_graph_close_to_float64():
    """The bfloat16 model's graph matches the float64 graph of the same weights and transcoders.

    Nodes are matched by (kind, layer, position, index). bfloat16 keeps 8 significant bits (a relative
    rounding of 2**-9 per operation), so pre-activations near a JumpReLU threshold or a TopK cut may land on
    the other side: a few features may differ, and the error node of such a (layer, position) cell absorbs
    the difference (its output is the MLP output minus the reconstruction), so its edges are left out.
    Every other edge between shared nodes must agree within 3% of the largest float64 edge weight: about
    eight bfloat16 roundings at that scale, room for the errors that three layers of attention, norms and
    MLPs accumulate (seen here: under 1%), yet a sixteenth of what a wrong scale does. The test checks that
    last claim itself: the same graph with its weights scaled by 1.5 fails the comparison. Target values (the
    logits, about 1) must agree within 3% of the largest one, which the scaled values fail too.
    """
    exact = attribute(
        tiny_model("llama", torch.float64), random_transcoders("plt-topk-skip", 3, 32), PROMPT, progress=False
    )
    model = tiny_model("llama", torch.bfloat16)
    graph = attribute(model, random_transcoders("plt-topk-skip", 3, 32), PROMPT, progress=False)
    assert graph.weights.dtype == np.float32 and np.isfinite(graph.weights).all()
    assert graph.n_features > 0 and exact.n_features > 0
    assert graph.target_names == exact.target_names

    exact_keys, keys = _node_keys(exact), _node_keys(graph)
    where = {key: node for node, key in enumerate(keys)}
    shared = [key for key in exact_keys if key in where]
    exact_features = [key for key in exact_keys if key[0] == NodeKind.FEATURE]
    present = sum(key in where for key in exact_features)
    assert present >= 0.9 * len(exact_features), (present, len(exact_features))

    differing_cells = {(layer, position) for _, layer, position, _ in set(exact_keys) ^ set(keys)}
    compared_sources = np.array(
        [
            not (kind == NodeKind.ERROR and (layer, position) in differing_cells)
            for kind, layer, position, _ in shared
        ]
    )
    exact_rows = np.array([exact_keys.index(key) for key in shared])
    rows = np.array([where[key] for key in shared])
    expected = exact.dense_adjacency()[np.ix_(exact_rows, exact_rows)][:, compared_sources]
    approx = graph.dense_adjacency()[np.ix_(rows, rows)][:, compared_sources]
    tolerance = 0.03 * np.abs(expected).max()
    assert np.abs(approx - expected).max() <= tolerance
    assert np.abs(1.5 * approx - expected).max() > tolerance, "the comparison would not see a wrong scale"

    exact_targets = exact.value[exact.nodes_of(NodeKind.TARGET)]
    targets = graph.value[graph.nodes_of(NodeKind.TARGET)]
    value_tolerance = 0.03 * np.abs(exact_targets).max()
    assert np.abs(targets - exact_targets).max() <= value_tolerance
    assert np.abs(1.5 * targets - exact_targets).max() > value_tolerance

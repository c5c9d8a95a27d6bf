"""Transcoder sets: activations, PLT/CLT maths, round trips, lazy decoders, GemmaScope, hub refs, errors."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from helpers.transcoders import random_transcoders
from safetensors.torch import load_file, save_file

from circuitmap.errors import CircuitmapError, IncompatibleTranscodersError, TranscoderLoadError
from circuitmap.transcoders import (
    CrossLayerTranscoder,
    JumpReLU,
    PerLayerTranscoders,
    ReLU,
    TopK,
    Transcoders,
    load_transcoders,
    save_transcoders,
)

L, D, F, K = 3, 16, 32, 4
MAKE_TRANSCODERS = Path(__file__).resolve().parents[2] / "shared" / "tools" / "make_transcoders.py"
DTYPES = [torch.float32, torch.float64]


def make_set(
    kind: str = "plt",
    activation: str = "relu",
    *,
    skip: bool = False,
    dtype=torch.float32,
    seed: int = 0,
    model_name: str | None = "toy",
) -> Transcoders:
    """A small random set built in memory (L layers, width D, F features)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def act():
        return {"relu": ReLU, "topk": lambda: TopK(K), "jumprelu": lambda: JumpReLU(r(F).abs())}[activation]()

    cls = PerLayerTranscoders if kind == "plt" else CrossLayerTranscoder
    W_dec = [r(F, D) if kind == "plt" else r(F, L - i, D) for i in range(L)]
    return cls(
        [r(F, D) for _ in range(L)],
        [r(F) for _ in range(L)],
        W_dec,
        [r(D) for _ in range(L)],
        [act() for _ in range(L)],
        [r(D, D) for _ in range(L)] if skip else None,
        model_name=model_name,
        input_hook="blocks.mlp.in",
        output_hook="blocks.mlp.out",
    )


def inputs(dtype=torch.float32, seed: int = 1, n: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(L)]


def weights(t: Transcoders) -> dict[str, torch.Tensor]:
    """Every tensor of a set by name, decoders included."""
    out = {}
    for i, layer in enumerate(t.layers):
        out |= {f"{name}{i}": getattr(layer, name) for name in ("W_enc", "b_enc", "b_dec", "W_dec")}
        if layer.W_skip is not None:
            out[f"W_skip{i}"] = layer.W_skip
        if isinstance(layer.activation, JumpReLU):
            out[f"threshold{i}"] = layer.activation.threshold
    return out


def assert_same_set(a: Transcoders, b: Transcoders) -> None:
    assert (type(a), a.n_layers, a.d_model, a.d_features) == (type(b), b.n_layers, b.d_model, b.d_features)
    assert (a.activation_name, a.k, a.has_skip, a.dtype) == (b.activation_name, b.k, b.has_skip, b.dtype)
    assert (a.model_name, a.input_hook, a.output_hook) == (b.model_name, b.input_hook, b.output_hook)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def one_line_error(error_type, match: str, fn, *args, **kwargs) -> str:
    """Call fn, check it raises error_type with a one-line message containing `match`; return the message."""
    with pytest.raises(error_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message
    assert "\n" not in message
    return message


# --- activations --------------------------------------------------------------------------------------


def test_topk_keeps_exactly_k_largest_then_relu():
    z = torch.tensor([[3.0, -1.0, 5.0, 0.5, 2.0], [-4.0, -3.0, -2.0, -1.0, 1.0]])
    a = TopK(3)(z)
    assert torch.equal(a[0], torch.tensor([3.0, 0.0, 5.0, 0.0, 2.0]))
    assert torch.equal(a[1], torch.tensor([0.0, 0.0, -0.0, 0.0, 1.0]))  # kept -2, -1 become 0 through ReLU
    positive = torch.rand(7, 40) + 0.1
    assert ((TopK(K)(positive) != 0).sum(-1) == K).all()
    assert TopK(K).name == "topk" and TopK(K).k == K


def test_jumprelu_threshold_is_strict():
    threshold = torch.tensor([0.5, 0.5, 0.5, -1.0])
    z = torch.tensor([0.5, 0.5000001, 0.4, -0.5])
    assert torch.equal(JumpReLU(threshold)(z), torch.tensor([0.0, 0.5000001, 0.0, -0.5]))
    assert JumpReLU(threshold).name == "jumprelu" and JumpReLU(threshold).k is None
    assert torch.equal(ReLU()(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0])) and ReLU().name == "relu"


@pytest.mark.parametrize("k", [0, -2, 2.0, True])
def test_topk_rejects_bad_k(k):
    one_line_error(CircuitmapError, "positive integer", TopK, k)


# --- maths --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_plt_reconstruct_matches_formula(activation):
    t = make_set("plt", activation, skip=True, dtype=torch.float64)
    xs = inputs(torch.float64)
    for i, (x, y) in enumerate(zip(xs, t.reconstruct(xs), strict=True)):
        layer = t.layers[i]
        z = x @ layer.W_enc.T + layer.b_enc
        if activation == "relu":
            a = z.clamp(min=0)
        elif activation == "jumprelu":
            a = torch.where(z > layer.activation.threshold, z, 0.0)
        else:
            a = torch.zeros_like(z)
            for row in range(z.shape[0]):
                top = z[row].argsort(descending=True)[:K]
                a[row, top] = z[row, top].clamp(min=0)
        torch.testing.assert_close(y, a @ layer.W_dec + layer.b_dec + x @ layer.W_skip.T)


@pytest.mark.parametrize("skip", [False, True])
def test_clt_reconstruct_matches_brute_force(skip):
    t = make_set("clt", "jumprelu", skip=skip, dtype=torch.float64)
    xs = inputs(torch.float64)
    acts = [t.encode(i, x) for i, x in enumerate(xs)]
    got = t.reconstruct(xs)
    for m in range(L):
        expected = t.layers[m].b_dec.expand(xs[m].shape[0], D).clone()
        for source in range(m + 1):
            for feature in range(F):
                expected += acts[source][:, feature, None] * t.layers[source].W_dec[feature, m - source]
        if skip:
            expected += xs[m] @ t.layers[m].W_skip.T
        torch.testing.assert_close(got[m], expected)
        torch.testing.assert_close(t.decode(acts, m) + t.skip(m, xs[m]), expected)


def test_decode_skips_none_entries_and_bias_alone():
    t = make_set("clt", "relu")
    xs = inputs()
    acts = [t.encode(i, x) for i, x in enumerate(xs)]
    only_first = t.decode([acts[0], None, None], 2)
    torch.testing.assert_close(only_first, t.layers[2].b_dec + acts[0] @ t.layers[0].W_dec[:, 2])
    assert torch.equal(t.decode([None] * L, 1), t.layers[1].b_dec)
    one_line_error(CircuitmapError, "one entry per layer", t.decode, acts[:2], 1)


def test_vectors_sparse_encode_and_skip():
    clt, plt = make_set("clt", "topk"), make_set("plt", "relu")
    ids = torch.tensor([3, 0, 7])
    assert torch.equal(clt.decoder_vectors(1, ids), clt.layers[1].W_dec[ids])
    assert clt.decoder_vectors(1, ids).shape == (3, L - 1, D)
    assert torch.equal(clt.decoder_vectors(1, ids, 2), clt.layers[1].W_dec[ids, 1])
    assert torch.equal(plt.decoder_vectors(2, ids), plt.layers[2].W_dec[ids])
    assert torch.equal(plt.decoder_vectors(2, ids, 2), plt.layers[2].W_dec[ids])
    assert torch.equal(plt.encoder_vectors(0, ids), plt.layers[0].W_enc[ids])
    one_line_error(CircuitmapError, "do not write to layer 1", plt.decoder_vectors, 2, ids, 1)
    one_line_error(CircuitmapError, "write to layers 1..2, not to layer 0", clt.decoder_vectors, 1, ids, 0)
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(2))
    indices, values = clt.sparse_encode(1, x)
    assert indices.shape[1] == 3 and 0 < len(indices) <= 2 * 4 * K
    dense = torch.zeros(2, 4, F)
    dense[indices.unbind(-1)] = values
    assert torch.equal(dense, clt.encode(1, x))
    assert torch.equal(plt.skip(0, x), torch.zeros(2, 4, D))
    one_line_error(CircuitmapError, "layer 3 is out of range", plt.encode, 3, x)
    one_line_error(IncompatibleTranscodersError, "input has width 15", plt.encode, 0, x[..., :15])


def test_check_model():
    t = make_set("plt", "relu")
    t.check_model(L, D)
    message = one_line_error(IncompatibleTranscodersError, "", t.check_model, 30, 576)
    assert message == "transcoders have 3 layers of width 16 but the model has 30 layers of width 576"
    one_line_error(IncompatibleTranscodersError, "model has 3 layers of width 17", t.check_model, L, D + 1)


def test_constructor_rejects_inconsistent_layers():
    t = make_set("clt", "relu")
    w = [[getattr(layer, name) for layer in t.layers] for name in ("W_enc", "b_enc", "W_dec", "b_dec")]
    bad_dec = [*w[2][:2], torch.zeros(F, 2, D)]
    one_line_error(
        TranscoderLoadError,
        "layer 2: W_dec_2 has shape (32, 2, 16), expected (32, 1, 16)",
        CrossLayerTranscoder,
        w[0],
        w[1],
        bad_dec,
        w[3],
        [ReLU()] * L,
    )
    one_line_error(
        TranscoderLoadError,
        "activation topk (k=4) differs from layer 0's relu",
        CrossLayerTranscoder,
        *w,
        [ReLU(), ReLU(), TopK(K)],
    )
    one_line_error(
        TranscoderLoadError,
        "W_skip is present in some layers",
        CrossLayerTranscoder,
        *w,
        [ReLU()] * L,
        [torch.zeros(D, D), None, None],
    )
    one_line_error(
        TranscoderLoadError,
        "TopK k=40 is larger than d_features=32",
        CrossLayerTranscoder,
        *w,
        [TopK(40)] * L,
    )


# --- round trips --------------------------------------------------------------------------------------

ROUND_TRIPS = [
    ("plt", "topk", True),
    ("plt", "jumprelu", False),
    ("plt", "relu", False),
    ("clt", "jumprelu", True),
    ("clt", "topk", False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kind", "activation", "skip"), ROUND_TRIPS)
def test_round_trip(tmp_path, kind, activation, skip, dtype):
    original = make_set(kind, activation, skip=skip, dtype=dtype)
    assert original.save(tmp_path / "set") == tmp_path / "set"
    loaded = load_transcoders(tmp_path / "set")
    assert_same_set(original, loaded)
    assert (loaded.kind, loaded.k, loaded.has_skip) == (kind, K if activation == "topk" else None, skip)
    xs = inputs(dtype)
    for i, x in enumerate(xs):
        assert torch.equal(original.encode(i, x), loaded.encode(i, x))
    for a, b in zip(original.reconstruct(xs), loaded.reconstruct(xs), strict=True):
        assert torch.equal(a, b)
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert config["model_kind"] == {"plt": "transcoder_set", "clt": "cross_layer_transcoder"}[kind]
    assert config.get("activation") == (None if activation == "jumprelu" else activation)
    assert config.get("k") == (K if activation == "topk" else None)
    if kind == "clt" and skip:
        assert "W_skip_1" in load_file(tmp_path / "set" / "W_enc_1.safetensors")


def test_save_refuses_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "notes.txt").write_text("mine")
    t = make_set("plt", "relu")
    one_line_error(CircuitmapError, "is not empty (use overwrite=True)", t.save, tmp_path / "set")
    assert (tmp_path / "set" / "notes.txt").exists()
    save_transcoders(t, tmp_path / "set", overwrite=True)
    assert not (tmp_path / "set" / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no staging or backup folder left behind


def test_save_over_own_lazy_source(tmp_path):
    make_set("clt", "jumprelu", skip=True).save(tmp_path / "set")
    lazy = load_transcoders(tmp_path / "set")
    eager = load_transcoders(tmp_path / "set", lazy_decoders=False)
    lazy.save(tmp_path / "set", overwrite=True)
    assert not any(layer.decoder.loaded for layer in lazy.layers)  # saving reads decoders, keeps none
    assert_same_set(eager, lazy)
    assert_same_set(eager, load_transcoders(tmp_path / "set"))


# --- lazy decoders, device and dtype ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plt", "clt"])
def test_decoders_are_read_lazily(tmp_path, kind):
    make_set(kind, "topk", skip=True).save(tmp_path / "set")
    lazy = load_transcoders(tmp_path / "set")
    eager = load_transcoders(tmp_path / "set", lazy_decoders=False)
    assert not any(layer.decoder.loaded for layer in lazy.layers)
    assert all(layer.decoder.loaded for layer in eager.layers)
    xs = inputs()
    acts = [lazy.encode(i, x) for i, x in enumerate(xs)]
    assert not any(layer.decoder.loaded for layer in lazy.layers)  # encoding needs no decoder
    lazy.decode(acts, 1)
    assert [layer.decoder.loaded for layer in lazy.layers] == (
        [False, True, False] if kind == "plt" else [True, True, False]
    )
    for a, b in zip(lazy.reconstruct(xs), eager.reconstruct(xs), strict=True):
        assert torch.equal(a, b)
    assert_same_set(lazy, eager)


def test_conversions_reach_decoders_still_on_disk(tmp_path):
    make_set("clt", "jumprelu").save(tmp_path / "set")
    t = load_transcoders(tmp_path / "set", dtype=torch.float64)
    assert t.dtype == torch.float64 and not t.layers[0].decoder.loaded
    assert t.layers[0].W_dec.dtype == t.layers[0].activation.threshold.dtype == torch.float64
    t.float()
    assert t.layers[0].W_dec.dtype == torch.float32 and t.layers[1].W_dec.dtype == torch.float32
    one_line_error(
        TranscoderLoadError, "floating-point", load_transcoders, tmp_path / "set", dtype=torch.int64
    )


def test_file_changed_after_load(tmp_path):
    make_set("plt", "relu").save(tmp_path / "set")
    t = load_transcoders(tmp_path / "set")
    (tmp_path / "set" / "layer_0.safetensors").unlink()
    one_line_error(TranscoderLoadError, "cannot read W_dec from", lambda: t.layers[0].W_dec)


# --- files from elsewhere -----------------------------------------------------------------------------


@pytest.mark.skipif(not MAKE_TRANSCODERS.exists(), reason=f"{MAKE_TRANSCODERS} is absent")
@pytest.mark.parametrize(
    ("kind", "extra", "expected"),
    [
        ("plt-jumprelu", [], ("plt", "jumprelu", None, False)),
        ("plt-topk", ["--topk", "5", "--skip"], ("plt", "topk", 5, True)),
        ("plt-relu", [], ("plt", "relu", None, False)),
        ("clt-jumprelu", [], ("clt", "jumprelu", None, False)),
    ],
)
def test_reads_make_transcoders_output(tmp_path, monkeypatch, kind, extra, expected):
    out = tmp_path / kind
    monkeypatch.setattr(sys, "argv", [str(MAKE_TRANSCODERS), str(out), kind, "3", "8", "24", *extra])
    runpy.run_path(str(MAKE_TRANSCODERS), run_name="__main__")
    t = load_transcoders(out)
    assert (t.kind, t.activation_name, t.k, t.has_skip) == expected
    assert (t.n_layers, t.d_model, t.d_features, t.model_name) == (3, 8, 24, "test")
    assert (t.input_hook, t.output_hook) == ("mlp.hook_in", "mlp.hook_out")
    if kind.startswith("plt"):
        assert torch.equal(t.layers[2].W_dec, load_file(out / "layer_2.safetensors")["W_dec"])
    else:
        assert torch.equal(t.layers[1].W_dec, load_file(out / "W_dec_1.safetensors")["W_dec_1"])
        assert t.layers[1].W_dec.shape == (24, 2, 8)
    assert t.reconstruct([torch.randn(4, 8)] * 3)[2].shape == (4, 8)


def test_reads_k_stored_as_a_tensor(tmp_path):
    make_set("plt", "topk").save(tmp_path / "plt")
    config_path = tmp_path / "plt" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    del config["k"], config["activation"]
    config_path.write_text(yaml.safe_dump(config))
    for i in range(L):
        path = tmp_path / "plt" / f"layer_{i}.safetensors"
        save_file(load_file(path) | {"activation_function.k": torch.tensor(K)}, path)
    t = load_transcoders(tmp_path / "plt")
    assert (t.activation_name, t.k) == ("topk", K)
    config_path.write_text(yaml.safe_dump(config | {"activation": "topk", "k": K + 1}))
    one_line_error(
        TranscoderLoadError,
        "TopK k disagrees between config.yaml (5) and the layer files (4)",
        load_transcoders,
        tmp_path / "plt",
    )

    make_set("clt", "topk").save(tmp_path / "clt")
    (tmp_path / "clt" / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    for i in range(L):
        path = tmp_path / "clt" / f"W_enc_{i}.safetensors"
        save_file(load_file(path) | {f"k_{i}": torch.tensor([float(K)])}, path)
    t = load_transcoders(tmp_path / "clt")
    assert (t.activation_name, t.k, t.model_name, t.input_hook) == ("topk", K, None, "mlp.hook_in")


def write_gemmascope(path: Path, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.standard_normal((D, F), dtype=np.float32),  # stored d_model × d_features
        "W_dec": rng.standard_normal((F, D), dtype=np.float32),
        "b_enc": rng.standard_normal(F, dtype=np.float32),
        "b_dec": rng.standard_normal(D, dtype=np.float32),
        "threshold": rng.random(F, dtype=np.float32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **params)
    return params


def test_gemmascope_npz_layouts(tmp_path):
    flat = [write_gemmascope(tmp_path / "flat" / f"layer_{i}.npz", i) for i in range(L)]
    t = load_transcoders(tmp_path / "flat")
    assert (t.kind, t.activation_name, t.n_layers, t.d_model, t.d_features) == ("plt", "jumprelu", L, D, F)
    for layer, params in zip(t.layers, flat, strict=True):
        assert torch.equal(layer.W_enc, torch.from_numpy(params["W_enc"]).T)
        assert torch.equal(layer.W_dec, torch.from_numpy(params["W_dec"]))
        assert torch.equal(layer.activation.threshold, torch.from_numpy(params["threshold"]))

    variant = Path("width_32") / "average_l0_5" / "params.npz"
    nested = [write_gemmascope(tmp_path / "nested" / f"layer_{i}" / variant, i) for i in range(L)]
    assert_same_set(t, load_transcoders(tmp_path / "nested"))
    assert nested[1]["W_enc"].shape == (D, F)

    single = load_transcoders(tmp_path / "nested" / "layer_1" / variant)
    assert single.n_layers == 1 and torch.equal(single.layers[0].W_enc, t.layers[1].W_enc)
    assert load_transcoders(tmp_path / "nested" / "layer_1" / variant.parent).n_layers == 1

    listed = tmp_path / "listed"
    listed.mkdir()
    entries = [str(tmp_path / "flat" / f"layer_{i}.npz") for i in range(L)]
    config = {"model_kind": "transcoder_set", "transcoders": entries}
    (listed / "config.yaml").write_text(yaml.safe_dump(config))
    assert_same_set(t, load_transcoders(listed))

    write_gemmascope(tmp_path / "nested" / "layer_1" / "width_32" / "average_l0_9" / "params.npz", 9)
    one_line_error(TranscoderLoadError, "holds 2 params.npz files", load_transcoders, tmp_path / "nested")
    (tmp_path / "flat" / "layer_1.npz").unlink()
    one_line_error(TranscoderLoadError, "missing layer files in", load_transcoders, tmp_path / "flat")
    (tmp_path / "flat" / "layer_1.npz").write_bytes(b"not a zip archive")
    one_line_error(
        TranscoderLoadError, "layer_1.npz: not a valid .npz archive", load_transcoders, tmp_path / "flat"
    )
    np.savez(tmp_path / "flat" / "layer_1.npz", W_enc=flat[1]["W_enc"])
    one_line_error(
        TranscoderLoadError,
        "layer_1.npz has no W_dec, b_enc, b_dec, threshold array",
        load_transcoders,
        tmp_path / "flat",
    )


# --- bad input ----------------------------------------------------------------------------------------


def test_missing_path_and_unknown_files(tmp_path):
    one_line_error(
        TranscoderLoadError,
        f"transcoder path not found: {tmp_path / 'nope'}",
        load_transcoders,
        str(tmp_path / "nope"),
    )
    one_line_error(TranscoderLoadError, "transcoder path not found", load_transcoders, tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"x")
    one_line_error(
        TranscoderLoadError,
        "expected a folder, config.yaml or GemmaScope .npz",
        load_transcoders,
        tmp_path / "weights.bin",
    )
    (tmp_path / "empty").mkdir()
    one_line_error(
        TranscoderLoadError, "has no config.yaml and no GemmaScope", load_transcoders, tmp_path / "empty"
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            "model_name: x\n",
            "config.yaml has no model_kind (expected transcoder_set or cross_layer_transcoder)",
        ),
        ("model_kind: sae\n", "unknown model_kind 'sae'"),
        ("- a\n- b\n", "config.yaml is not a YAML mapping"),
        ("model_kind: [unclosed\n", "cannot read"),
        ("model_kind: transcoder_set\nactivation: gelu\n", "unknown activation 'gelu'"),
        ("model_kind: transcoder_set\nactivation: topk\nk: 0\n", "k must be a positive integer, got 0"),
        ("model_kind: transcoder_set\nactivation: topk\n", "says activation topk but gives no k"),
        ("model_kind: transcoder_set\nactivation: jumprelu\n", "jumprelu but layer 0 stores no threshold"),
        ("model_kind: transcoder_set\ntranscoders: layer_0.safetensors\n", "transcoders must be a list"),
    ],
)
def test_bad_config(tmp_path, config, match):
    make_set("plt", "relu").save(tmp_path / "set")
    (tmp_path / "set" / "config.yaml").write_text(config)
    one_line_error(TranscoderLoadError, match, load_transcoders, tmp_path / "set")


@pytest.mark.parametrize("listed", [True, False])
def test_missing_layer_files(tmp_path, listed):
    make_set("plt", "relu").save(tmp_path / "plt")
    if not listed:
        (tmp_path / "plt" / "config.yaml").write_text("model_kind: transcoder_set\n")
    (tmp_path / "plt" / "layer_1.safetensors").unlink()
    match = "missing layer file" + (
        f" {tmp_path / 'plt' / 'layer_1.safetensors'} (listed in"
        if listed
        else f"s in {tmp_path / 'plt'}: layer_1.safetensors"
    )
    one_line_error(TranscoderLoadError, match, load_transcoders, tmp_path / "plt")

    make_set("clt", "relu").save(tmp_path / "clt")
    (tmp_path / "clt" / "W_dec_2.safetensors").unlink()
    one_line_error(TranscoderLoadError, "missing layer files in", load_transcoders, tmp_path / "clt")
    one_line_error(TranscoderLoadError, "W_dec_2.safetensors", load_transcoders, tmp_path / "clt")
    for path in (tmp_path / "clt").glob("W_*"):
        path.unlink()
    one_line_error(TranscoderLoadError, "no W_enc_*.safetensors files in", load_transcoders, tmp_path / "clt")


def test_corrupt_safetensors(tmp_path):
    make_set("clt", "relu").save(tmp_path / "set")
    path = tmp_path / "set" / "W_enc_1.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(TranscoderLoadError, f"cannot read {path}: ", load_transcoders, tmp_path / "set")
    path.write_bytes(b"\x00" * 3)
    one_line_error(TranscoderLoadError, f"cannot read {path}: ", load_transcoders, tmp_path / "set")
    path.write_bytes(data)
    decoder = tmp_path / "set" / "W_dec_0.safetensors"
    decoder.write_bytes(decoder.read_bytes()[:-10])
    one_line_error(TranscoderLoadError, f"cannot read {decoder}: ", load_transcoders, tmp_path / "set")


def test_inconsistent_shapes(tmp_path):
    make_set("plt", "jumprelu", skip=True).save(tmp_path / "plt")
    path = tmp_path / "plt" / "layer_1.safetensors"
    good = load_file(path)
    cases = [
        ({"W_enc": torch.zeros(F, D + 1)}, "W_enc has shape (32, 17), expected (32, 16)"),
        ({"W_dec": torch.zeros(F + 1, D)}, "W_dec has shape (33, 16), expected (32, 16)"),
        ({"W_skip": torch.zeros(D, 2)}, "W_skip has shape (16, 2), expected (16, 16)"),
        ({"activation_function.threshold": torch.zeros(3)}, "activation_function.threshold has shape (3,)"),
    ]
    for change, match in cases:
        save_file(good | change, path)
        one_line_error(TranscoderLoadError, f"{path}: {match}", load_transcoders, tmp_path / "plt")
    save_file({k: v for k, v in good.items() if k != "b_dec"}, path)
    one_line_error(TranscoderLoadError, f"{path} has no b_dec tensor", load_transcoders, tmp_path / "plt")

    make_set("clt", "relu").save(tmp_path / "clt")
    save_file({"W_dec_1": torch.zeros(F, L, D)}, tmp_path / "clt" / "W_dec_1.safetensors")
    one_line_error(
        TranscoderLoadError,
        "W_dec_1.safetensors: W_dec_1 has shape (32, 3, 16), expected (32, 2, 16)",
        load_transcoders,
        tmp_path / "clt",
    )


# --- hub references -----------------------------------------------------------------------------------

MAIN, TAGGED = "a" * 40, "b" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hugging Face hub cache with org/sets (main: a PLT at the top, a CLT under clt/; tag v1: another
    PLT), offline mode on, and a record of the snapshot_download / hf_hub_download calls made."""
    repo = tmp_path / "hub" / "models--org--sets"
    make_set("plt", "topk", skip=True).save(repo / "snapshots" / MAIN / "top")
    for path in (repo / "snapshots" / MAIN / "top").iterdir():
        path.rename(repo / "snapshots" / MAIN / path.name)
    (repo / "snapshots" / MAIN / "top").rmdir()
    make_set("clt", "jumprelu", skip=True).save(repo / "snapshots" / MAIN / "clt")
    make_set("plt", "relu", seed=7).save(repo / "snapshots" / TAGGED)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def spy(name):
        real = getattr(huggingface_hub, name)

        def recorded(*args, **kwargs):
            calls.append((name, kwargs))
            return real(*args, **kwargs)

        return recorded

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, spy(name))
    return calls


def test_hub_refs_resolve_through_the_local_cache(hub, tmp_path):
    assert_same_set(load_transcoders("org/sets"), make_set("plt", "topk", skip=True))
    name, kwargs = hub[-1]
    assert name == "snapshot_download" and kwargs["repo_id"] == "org/sets" and kwargs["revision"] is None
    assert kwargs["cache_dir"] == str(tmp_path / "hub") and kwargs["local_files_only"] is True
    assert kwargs["allow_patterns"] is None

    assert_same_set(load_transcoders("org/sets/clt"), make_set("clt", "jumprelu", skip=True))
    assert hub[-1][1]["allow_patterns"] == ["clt/*"]
    assert_same_set(load_transcoders("org/sets@v1"), make_set("plt", "relu", seed=7))
    assert hub[-1][1]["revision"] == "v1"
    assert_same_set(load_transcoders(f"hf://org/sets/clt@{MAIN}"), make_set("clt", "jumprelu", skip=True))
    assert len(hub) == 4 and {name for name, _ in hub} == {"snapshot_download"}


def test_hub_uris_in_config(hub, tmp_path):
    folder = tmp_path / "uses-hub"
    folder.mkdir()
    entries = [f"hf://org/sets/layer_{i}.safetensors" for i in range(L)]
    config = {"model_kind": "transcoder_set", "activation": "topk", "k": K, "transcoders": entries}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    t = load_transcoders(folder)
    assert torch.equal(t.layers[2].W_dec, make_set("plt", "topk", skip=True).layers[2].W_dec)
    assert [name for name, _ in hub] == ["hf_hub_download"] * L
    assert hub[0][1]["filename"] == "layer_0.safetensors" and hub[0][1]["repo_id"] == "org/sets"


def test_local_path_wins_over_hub_ref(hub, tmp_path, monkeypatch):
    make_set("plt", "relu", seed=3).save(tmp_path / "org" / "sets")
    monkeypatch.chdir(tmp_path)
    assert_same_set(load_transcoders("org/sets"), make_set("plt", "relu", seed=3))
    assert hub == []


def test_hub_ref_not_cached(hub, tmp_path):
    message = one_line_error(
        TranscoderLoadError,
        "cannot download org/absent: the hub is unreachable and it is not in the local cache",
        load_transcoders,
        "org/absent",
    )
    assert str(tmp_path / "hub") in message
    one_line_error(
        TranscoderLoadError,
        "the hub repository org/sets has no folder nothing-here",
        load_transcoders,
        "hf://org/sets/nothing-here",
    )
    one_line_error(
        TranscoderLoadError,
        "cannot download hf://org/sets/layer_9.safetensors: the hub is unreachable",
        load_transcoders,
        "hf://org/sets/layer_9.safetensors",
    )
    one_line_error(
        TranscoderLoadError, "not a hub reference: hf://just-a-name", load_transcoders, "hf://just-a-name"
    )


@pytest.mark.parametrize("kind", ["plt-jumprelu-skip", "clt-topk"])
def test_a_set_cut_after_its_first_layers_reconstructs_those_layers_as_the_whole_set(kind):
    transcoders = random_transcoders(kind, 4, 16, d_features=12)
    inputs = [
        torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    cut = transcoders.first_layers(2)
    assert (cut.kind, cut.n_layers, cut.has_skip) == (transcoders.kind, 2, transcoders.has_skip)
    for got, expected in zip(cut.reconstruct(inputs[:2]), transcoders.reconstruct(inputs)[:2], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(CircuitmapError, match="can be cut after"):
        transcoders.first_layers(5)

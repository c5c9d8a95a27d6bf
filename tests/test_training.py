"""The trainer: sparse kernels against dense maths, folding, every kind and activation, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import char_tokenizer, tiny_hf_model, tiny_model
from safetensors.torch import load_file

from circuitmap import CircuitmapError, attribute, load_transcoders
from circuitmap.cli import main
from circuitmap.errors import TrainingDiverged
from circuitmap.features import FeatureStore
from circuitmap.features import build as build_module
from circuitmap.training import (
    ActivationCache,
    CorpusContexts,
    FeatureDatabase,
    PairChunks,
    SampledContexts,
    TrainConfig,
    collect_pairs,
    pack_contexts,
    sample_contexts,
    train_transcoders,
)
from circuitmap.training.data import derived_seed
from circuitmap.training.distributed import ProcessGroup
from circuitmap.training.sparse import encoder_pre_activations, select_encode, sparse_decode, stacked_indices
from circuitmap.training.trainable import Standardiser, TrainableTranscoders
from circuitmap.training.trainer import _fit_standardiser, _least_squares_skip, learning_rate

TESTS = Path(__file__).parent
DOCUMENTS = [f"The cat number {i} sat on the mat and looked at dog {i % 7}." for i in range(300)]
SMALL = TrainConfig(
    d_features=24,
    k=4,
    n_tokens=3200,
    batch_size=64,
    context_length=16,
    chunk_contexts=16,
    model_batch_size=8,
    dead_tokens=600,
    aux_k=6,
    lr=3e-3,
    warmup_steps=5,
)


def corpus(model, documents=DOCUMENTS, length=16):
    return CorpusContexts(lambda: iter(documents), model.tokenizer, length, "test-documents")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return tensors


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys() and first
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=atol, msg=key)


def test_sparse_topk_step_matches_the_dense_computation():
    torch.manual_seed(0)
    L, n, d, F, k = 3, 20, 8, 32, 5
    x, y = torch.randn(L, n, d), torch.randn(L, n, d)
    weights = [torch.randn(L, F, d), torch.randn(L, F), torch.randn(L, F, d)]
    sparse_weights = [w.clone().requires_grad_() for w in weights]
    dense_weights = [w.clone().requires_grad_() for w in weights]

    W_enc, b_enc, W_dec = sparse_weights
    pre = encoder_pre_activations(x, W_enc, b_enc)
    indices = pre.topk(k, dim=-1).indices
    values = select_encode(x, W_enc, b_enc, indices, pre).relu()
    out = sparse_decode(values, stacked_indices(indices, F), W_dec.view(-1, d))
    (out - y).pow(2).sum().backward()

    W_enc, b_enc, W_dec = dense_weights
    dense_pre = torch.einsum("lnd,lfd->lnf", x, W_enc) + b_enc[:, None]
    top = dense_pre.topk(k, dim=-1)
    acts = torch.zeros_like(dense_pre).scatter(-1, top.indices, top.values.relu())
    dense_out = torch.einsum("lnf,lfd->lnd", acts, W_dec)
    (dense_out - y).pow(2).sum().backward()

    torch.testing.assert_close(out, dense_out)
    for sparse, dense in zip(sparse_weights, dense_weights, strict=True):
        torch.testing.assert_close(sparse.grad, dense.grad, rtol=1e-4, atol=1e-4)


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    config = TrainConfig(activation="jumprelu", d_features=1, jumprelu_bandwidth=0.2, init_threshold=0.5)
    module = TrainableTranscoders(1, 2, config)
    with torch.no_grad():
        module.W_enc.copy_(torch.tensor([[[1.0, 0.0]]]))
    x = torch.tensor([[[0.45, 0.0], [0.7, 0.0], [2.0, 0.0]]])
    y = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [0.0, 1.0]]])
    module(x, y).loss.backward()
    # Only z = 0.45 lies within ε/2 = 0.1 of θ = 0.5. There a = 0, so dL/da = −2·y·w / (n·d·L), and the
    # straight-through rule gives dL/dθ = −(θ/ε)·dL/da, chained through θ = exp(log θ).
    w = module.W_dec[0, 0].detach()
    grad_a = -2 * (y[0, 0] * w).sum() / (3 * 2)
    expected = -(0.5 / 0.2) * grad_a * 0.5
    torch.testing.assert_close(module.log_threshold.grad[0, 0], expected)
    assert module.W_enc.grad[0, 0, 0] != 0, "active tokens train the encoder"


@pytest.mark.parametrize(
    "kind,activation",
    [("plt", "topk"), ("skip-plt", "topk"), ("clt", "topk"), ("plt", "jumprelu"), ("clt", "relu")],
)
def test_the_saved_set_predicts_exactly_what_the_module_predicts(kind, activation):
    """Fold the standardisation: the saved set's reconstruction of raw inputs must have zero loss."""
    torch.manual_seed(1)
    L, d, n = 3, 8, 50
    config = TrainConfig(kind=kind, activation=activation, d_features=16, k=3, init_threshold=0.05)
    module = TrainableTranscoders(L, d, config)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    raw_in = torch.randn(n, L, d) * 3 + torch.randn(L, d)
    standardiser = Standardiser(
        torch.randn(L, d).double(),
        torch.rand(L).double() + 0.5,
        torch.randn(L, d).double(),
        torch.rand(L).double() + 0.5,
    )
    transcoders = module.to_transcoders(standardiser)
    raw_out = torch.stack(transcoders.reconstruct(list(raw_in.transpose(0, 1)))).transpose(0, 1)
    x, y = standardiser.apply(torch.stack([raw_in, raw_out], dim=2))
    output = module(x, y)
    assert float(output.squared_error.max()) < 1e-6 * float(output.target_energy.min())
    assert transcoders.activation_name == activation and transcoders.kind == (
        "clt" if kind == "clt" else "plt"
    )
    assert transcoders.has_skip == (kind == "skip-plt")


@pytest.mark.parametrize(
    "kind,activation",
    [("plt", "topk"), ("skip-plt", "topk"), ("clt", "topk"), ("plt", "jumprelu"), ("plt", "relu")],
)
def test_training_lowers_the_error_and_the_result_feeds_attribution(tmp_path, kind, activation):
    model = tiny_model("llama")
    config = SMALL.with_changes(kind=kind, activation=activation, sparsity_coef=3e-3, n_tokens=6400)
    result = train_transcoders(model, corpus(model), config, tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["mean_fvu"] < 0.8 * log[0]["mean_fvu"]
    assert result.steps == 100 and result.tokens == 6400 and len(result.fvu) == model.n_layers
    if activation == "topk":
        assert max(result.l0) <= 4
    transcoders = load_transcoders(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mean_fvu"] == pytest.approx(sum(result.fvu) / len(result.fvu))
    contexts = torch.stack(list(pack_contexts(DOCUMENTS[:20], model.tokenizer, 16))[:4])
    inputs, outputs = collect_pairs(model, contexts)
    predicted = transcoders.reconstruct(list(inputs))
    fvu = [
        float((o - p).pow(2).sum() / (o - o.mean(0)).pow(2).sum())
        for o, p in zip(outputs, predicted, strict=True)
    ]
    assert max(fvu) < 0.9
    graph = attribute(model, transcoders, "The cat number", progress=False)
    assert graph.n_features > 0


def test_learning_rate_schedule():
    config = TrainConfig(lr=1.0, warmup_steps=10, decay_fraction=0.2)
    rates = [learning_rate(step, 100, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == 1.0 and rates[50] == 1.0
    assert rates[80] == pytest.approx(1.0) and rates[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))


def test_dead_features_get_the_auxiliary_loss():
    torch.manual_seed(0)
    config = TrainConfig(d_features=16, k=2, aux_k=4)
    module = TrainableTranscoders(2, 6, config)
    x, y = torch.randn(2, 30, 6), torch.randn(2, 30, 6)
    dead = torch.zeros(2, 16, dtype=torch.bool)
    dead[:, 10:] = True
    module(x, y, dead).loss.backward()
    with_aux = module.W_dec.grad.clone()
    module.zero_grad()
    module(x, y).loss.backward()
    changed = (with_aux - module.W_dec.grad).abs().sum(-1) > 0
    assert changed[:, 10:].any() and not changed[:, :10].any(), "only dead features gain gradient"


def test_sampled_contexts_are_seeded_and_leave_the_callers_random_state():
    model = tiny_model("llama")
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    first = sample_contexts(model, 3, 10, seed=7, batch_size=2)
    assert torch.equal(torch.rand(1), expected)
    assert first.shape == (3, 10) and (first[:, 0] == model.tokenizer.bos_token_id).all()
    assert torch.equal(first, sample_contexts(model, 3, 10, seed=7, batch_size=2))
    assert not torch.equal(first, sample_contexts(model, 3, 10, seed=8, batch_size=2))
    source = SampledContexts(model, 10, seed=3)
    assert not torch.equal(source.group(0, 4, 0, 2), source.group(0, 4, 1, 2))
    assert derived_seed(1, 2, 3) != derived_seed(1, 3, 2)


def test_pairs_captured_while_sampling_are_the_models_pairs_on_that_text():
    model = tiny_model("llama")
    contexts, pairs = sample_contexts(model, 3, 12, seed=4, batch_size=2, with_pairs=True)
    assert torch.equal(contexts, sample_contexts(model, 3, 12, seed=4, batch_size=2))
    inputs, outputs = collect_pairs(model, contexts)
    expected = torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3)
    assert pairs.shape == expected.shape and pairs.dtype == torch.bfloat16
    torch.testing.assert_close(pairs.float(), expected, rtol=0.02, atol=0.02)
    written = []
    sample_contexts(model, 3, 12, seed=4, batch_size=2, with_pairs=True, progress=written.append)
    assert written == [2] * 11 + [1] * 11, "every sampled token is reported, batch by batch"


def test_training_on_sampled_text(tmp_path):
    model = tiny_model("llama")
    config = SMALL.with_changes(n_tokens=640, chunk_contexts=8)
    result = train_transcoders(
        model, SampledContexts(model, 16, seed=0), config, tmp_path / "run", progress=False
    )
    assert result.tokens == 640


def test_groups_deal_the_chunk_contexts_round_robin():
    model = tiny_model("llama")
    source = corpus(model)
    chunk = source.chunk(1, 8)
    assert torch.equal(source.group(1, 8, 1, 4), chunk[1::4])
    assert torch.equal(
        source.chunk(0, 8), torch.stack(list(pack_contexts(DOCUMENTS, model.tokenizer, 16))[:8])
    )
    assert torch.equal(source.chunk(1, 8), chunk), "going back restarts the stream"


def test_activation_cache_is_reused_and_a_full_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cache = tmp_path / "cache"
    config = SMALL.with_changes(n_tokens=640)
    first = train_transcoders(model, corpus(model), config, tmp_path / "a", cache_dir=cache, progress=False)
    shards = sorted(cache.rglob("*.npy"))
    assert shards and not list(cache.rglob("*.tmp"))

    def no_model(*args, **kwargs):
        raise AssertionError("the cached run must not run the model")

    monkeypatch.setattr("circuitmap.training.data.collect_pairs", no_model)
    second = train_transcoders(model, corpus(model), config, tmp_path / "b", cache_dir=cache, progress=False)
    assert first.fvu == second.fvu
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    store = ActivationCache(tmp_path / "full", {"model": "x"})
    with pytest.raises(CircuitmapError, match="No space left on device"):
        store.store(0, 0, torch.zeros(1, 4, dtype=torch.long), torch.zeros(3, 2, 2, 4, dtype=torch.bfloat16))
    assert [p.name for p in store.folder.iterdir()] == ["identity.json"]
    assert store.load(0, 0) is None


def test_epochs_collect_once_and_pass_over_the_pairs_again(tmp_path, monkeypatch):
    model = tiny_model("llama")
    calls = []
    original = PairChunks._collect

    def counting(self, contexts):
        calls.append(len(contexts))
        return original(self, contexts)

    monkeypatch.setattr(PairChunks, "_collect", counting)
    config = SMALL.with_changes(n_tokens=1280, epochs=2)
    result = train_transcoders(model, corpus(model), config, tmp_path / "run", progress=False)
    # 10 steps per epoch, 3 batches of 64 from each chunk of 16 contexts: chunks 0..3, collected once.
    assert result.tokens == 1280 and result.next_chunk == 4
    assert sum(calls) == 4 * config.chunk_contexts
    assert not (tmp_path / "run" / "activations").exists(), "the run's own cache goes when it ends"


def test_pairs_come_back_from_the_cache_unchanged(tmp_path):
    model = tiny_model("gemma2")
    cache = ActivationCache(tmp_path, {"model": "tiny"})
    chunks = PairChunks(
        model, corpus(model), chunk_contexts=4, groups=2, local_groups=[0, 1], model_batch_size=2, cache=cache
    )
    fresh = chunks.chunk(0)
    again = chunks.chunk(0)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again, strict=True))
    inputs, outputs = collect_pairs(model, corpus(model).group(0, 4, 1, 2))
    expected = torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3).to(torch.bfloat16)
    assert torch.equal(fresh[1], expected)
    assert torch.equal(cache.load_contexts(0, 1), corpus(model).group(0, 4, 1, 2))
    assert cache.load_contexts(1, 0) is None


def test_bad_text_sources(tmp_path, capsys):
    model = tiny_model("llama")
    with pytest.raises(CircuitmapError, match="too small to fill a single training batch"):
        train_transcoders(model, corpus(model, documents=[]), SMALL, tmp_path / "empty", progress=False)
    short = DOCUMENTS[:40]
    result = train_transcoders(
        model, corpus(model, documents=short), SMALL, tmp_path / "short", progress=False
    )
    assert 0 < result.tokens < SMALL.n_tokens
    assert "the text ran out after" in capsys.readouterr().err
    assert (tmp_path / "short" / "config.yaml").exists()


def test_divergence_names_the_step_and_layer_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("llama")
    original = Standardiser.apply
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        x, y = original(self, batch)
        if calls["n"] == 8:
            y[2, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(Standardiser, "apply", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"at step 7: the loss of layer 2 .*checkpoint \(step 7\)"):
        train_transcoders(model, corpus(model), SMALL, out, checkpoint_seconds=0, progress=False)
    assert (out / "checkpoint.safetensors").exists()


def test_resume_refuses_other_settings_and_unknown_folders(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "run"
    with pytest.raises(CircuitmapError, match="nothing to resume"):
        train_transcoders(model, corpus(model), SMALL, out, resume=True, progress=False)
    train_transcoders(model, corpus(model), SMALL.with_changes(n_tokens=640), out, progress=False)
    with pytest.raises(CircuitmapError, match="nothing to resume: the run in .* has finished"):
        train_transcoders(model, corpus(model), SMALL, out, resume=True, progress=False)
    with pytest.raises(CircuitmapError, match="is not an empty folder"):
        train_transcoders(model, corpus(model), SMALL, out, progress=False)
    out = tmp_path / "unfinished"
    out.mkdir()
    (out / "training.json").write_text(json.dumps({"config": SMALL.to_dict(), "model": {}, "source": "x"}))
    (out / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(CircuitmapError, match=r"other settings \(.*k 4 → 5"):
        train_transcoders(model, corpus(model), SMALL.with_changes(k=5), out, resume=True, progress=False)
    with pytest.raises(CircuitmapError, match="holds an unfinished run: add --resume"):
        train_transcoders(model, corpus(model), SMALL, out, progress=False)


def test_a_run_that_never_reached_a_checkpoint_starts_again(tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    config = SMALL.with_changes(n_tokens=640)

    def full_disk(*args, **kwargs):
        raise CircuitmapError("cannot write the checkpoint: No space left on device")

    for resume in (False, True):
        out = tmp_path / f"run-{resume}"
        with monkeypatch.context() as patched:
            patched.setattr("circuitmap.training.trainer.save_checkpoint", full_disk)
            with pytest.raises(CircuitmapError, match="No space left"):
                train_transcoders(model, corpus(model), config, out, progress=False, checkpoint_seconds=0)
        assert (out / "training.json").is_file() and not (out / "checkpoint.safetensors").exists()
        train_transcoders(model, corpus(model), config, out, resume=resume, progress=False)
        assert "never reached a checkpoint: starting it again" in capsys.readouterr().err
        assert (out / "metrics.json").is_file()


def test_two_trainers_never_share_a_run_folder(tmp_path):
    import fcntl

    model = tiny_model("llama")
    out = tmp_path / "run"
    out.mkdir()
    with (out / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CircuitmapError, match="another training run is using"):
            train_transcoders(model, corpus(model), SMALL, out, progress=False)
        assert [path.name for path in out.iterdir()] == [".lock"]
    train_transcoders(model, corpus(model), SMALL.with_changes(n_tokens=640), out, progress=False)
    assert (out / "metrics.json").is_file() and not (out / ".lock").exists()


def test_non_finite_settings_are_refused_before_anything_is_written(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(CircuitmapError, match="a training context .* has 65 tokens but the model.s context"):
        train_transcoders(model, corpus(model), SMALL.with_changes(context_length=65), tmp_path / "x")
    with pytest.raises(CircuitmapError, match="sparsity_coef must be a finite number"):
        train_transcoders(model, corpus(model), SMALL.with_changes(sparsity_coef=math.nan), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_hf_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    corpus_file = folder / "corpus.txt"
    corpus_file.write_text("\n\n".join(DOCUMENTS * 3))
    return folder


def train_argv(model_folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_folder),
        "--corpus",
        str(model_folder / "corpus.txt"),
        "--out",
        str(out),
        "--d-features",
        "24",
        "--k",
        "4",
        "--tokens",
        "25600",
        "--batch-size",
        "64",
        "--context-length",
        "16",
        "--chunk-contexts",
        "16",
        "--eval-tokens",
        "0",
        "--quiet",
        *extra,
    ]


def run_cli(argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    code = "import sys; from circuitmap.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env, **kwargs)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_run_resumes_to_the_same_weights(model_folder, tmp_path, how):
    straight = tmp_path / "straight"
    assert run_cli(train_argv(model_folder, straight)).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    process = run_cli(train_argv(model_folder, killed, "--checkpoint-every", "0"), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(how)
    code = process.wait(timeout=120)
    assert process.poll() is not None
    if how == signal.SIGINT:
        assert code == 130 and b"--resume" in process.stderr.read()
    else:
        assert code == -signal.SIGKILL
    assert (killed / "checkpoint.safetensors").exists(), "killed before the end"
    resumed = run_cli(train_argv(model_folder, killed, "--resume"), stderr=subprocess.PIPE)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert b"resuming" in resumed.stderr.read()
    assert_same_weights(straight, killed)


def test_two_processes_match_one_with_the_same_global_batch(model_folder, tmp_path):
    single = tmp_path / "single"
    args = ["--tokens", "3200", "--groups", "2"]
    assert main(train_argv(model_folder, single, *args)) == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "circuitmap", *train_argv(model_folder, double, *args)]
    finished = subprocess.run(command, env=env, capture_output=True, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    assert_same_weights(single, double, atol=1e-5)
    log = [json.loads(line) for line in (double / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["tokens"] == 3200


def test_train_and_evaluate_commands(model_folder, tmp_path, capsys):
    out = tmp_path / "trained"
    assert main(train_argv(model_folder, out, "--tokens", "1280", "--eval-tokens", "300")) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "wrote" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout"]["tokens"] >= 300 and metrics["mean_l0"] <= 4
    argv = ["evaluate-transcoders", "--model", str(model_folder), "--transcoders", str(out)]
    argv += ["--corpus", str(model_folder / "corpus.txt"), "--tokens", "500", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2]
    assert set(report["layers"][0]) == {"layer", "fvu", "l0", "dead_fraction"}
    assert report["kl"] >= 0 and report["ce_loss_increase"] == pytest.approx(
        report["ce_loss_spliced"] - report["ce_loss"]
    )
    assert {"mean_fvu", "mean_l0"} <= set(report)
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(DOCUMENTS[:10]))
    assert main([*argv[:5], "--corpus", str(small), "--tokens", "5000"]) == 0
    assert "fewer than the 5,000 requested" in capsys.readouterr().err
    assert (
        main(
            train_argv(
                model_folder, tmp_path / "x", "--kind", "clt", "--activation", "relu", "--tokens", "640"
            )
        )
        == 0
    )
    assert load_transcoders(tmp_path / "x").kind == "clt"
    with pytest.raises(SystemExit):
        main(train_argv(model_folder, tmp_path / "y", "--preset", "nope"))
    assert main(train_argv(model_folder, tmp_path / "y", "--k", "100")) == 2
    assert "k=100 cannot exceed" in capsys.readouterr().err


def test_demo_trains_the_quick_set_once_then_reuses_it(model_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRCUITMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("circuitmap.training.preset", lambda name: SMALL.with_changes(n_tokens=640))
    argv = ["demo", "--model", str(model_folder), "--prompt", "The cat number", "--out", str(tmp_path / "g")]
    assert main([*argv, "--no-serve"]) == 0
    first = capsys.readouterr()
    assert "training the quick set once" in first.err
    assert (tmp_path / "g" / "the-cat-number" / "graph.json").exists()
    assert list((tmp_path / "cache" / "transcoders").iterdir())[0].name.endswith("-quick")
    assert main([*argv, "--no-serve"]) == 0
    assert "training the quick set" not in capsys.readouterr().err


def test_a_run_builds_its_feature_database_from_its_own_activations(tmp_path, monkeypatch):
    model = tiny_model("llama")
    config = SMALL.with_changes(n_tokens=1280, epochs=2)
    runs = []
    original = build_module._process

    def no_model_pass(model_, transcoders, state, batch, inputs, ids, config_):
        runs.append(inputs is None)
        return original(model_, transcoders, state, batch, inputs, ids, config_)

    monkeypatch.setattr(build_module, "_process", no_model_pass)
    features = FeatureDatabase(lambda transcoders: tmp_path / f"{transcoders.fingerprint()[:8]}.sqlite", 600)
    result = train_transcoders(
        model, corpus(model), config, tmp_path / "run", progress=False, features=features
    )
    path = tmp_path / f"{result.transcoders.fingerprint()[:8]}.sqlite"
    assert runs and not any(runs), "the dashboards come from the cached activations, not a model pass"
    with FeatureStore(path) as store:
        assert store.meta["fingerprint"] == result.transcoders.fingerprint()
        assert "training text: test-documents" in store.meta["settings"]
        active = [
            (layer, feature)
            for layer in range(model.n_layers)
            for feature in range(config.d_features)
            if store.get(layer, feature).top_examples
        ]
        assert active
    # the dashboards agree with the model run on the stored contexts, to bfloat16 precision
    layer, feature = active[0]
    with FeatureStore(path) as store:
        example = store.get(layer, feature).top_examples[0]
    with sqlite3.connect(path) as connection:
        (blob,) = connection.execute(
            "SELECT tokens FROM contexts WHERE id = ?", (example.context,)
        ).fetchone()
    ids = torch.from_numpy(np.frombuffer(blob, dtype="<i4").astype(np.int64))[None]
    acts = result.transcoders.encode(layer, model.activations(ids, points=["mlp_in"])["mlp_in", layer])
    assert (
        abs(float(acts[0, 1:, feature].max()) - example.max_activation)
        <= 0.02 * example.max_activation + 1e-3
    )
    single = SMALL.with_changes(n_tokens=640)
    train_transcoders(model, corpus(model), single, tmp_path / "one", progress=False, features=features)


def test_the_skip_paths_start_from_the_least_squares_solution():
    torch.manual_seed(0)
    L, d, n = 2, 6, 3000
    x = torch.randn(n, L, d) * torch.linspace(0.5, 2, d) + 1.0
    maps = torch.randn(L, d, d)
    y = torch.einsum("lod,nld->nlo", maps, x) + 0.1 * torch.randn(n, L, d)
    pairs = torch.stack([x, y], dim=2).to(torch.bfloat16)
    one_process = ProcessGroup.from_environment(torch.device("cpu"))
    standardiser = _fit_standardiser([pairs], one_process, d)
    chunks = [
        [pairs[:1000]],
        [pairs[1000:2000]],
        [pairs[2000:]],
        None,
        [pairs[:10]],
    ]  # None: the text ran out
    skip = _least_squares_skip(chunks, standardiser, one_process, 0.0)
    xs, ys = standardiser.apply(pairs)
    for layer in range(L):
        expected = torch.linalg.lstsq(xs[layer].double(), ys[layer].double()).solution.T
        torch.testing.assert_close(skip[layer].double(), expected, rtol=1e-4, atol=1e-4)
    ridged = _least_squares_skip(chunks[:3], standardiser, one_process, 10.0)
    assert ridged.norm() < skip.norm(), "the ridge penalty shrinks the solution"


def test_a_skip_run_begins_where_least_squares_ends(tmp_path):
    model = tiny_model("llama")
    config = SMALL.with_changes(kind="skip-plt", n_tokens=640, epochs=2, lr=1e-12, warmup_steps=1)
    result = train_transcoders(model, corpus(model), config, tmp_path / "run", progress=False)
    linear_only = SMALL.with_changes(kind="plt", n_tokens=640, epochs=2, lr=1e-12, warmup_steps=1)
    sparse_only = train_transcoders(model, corpus(model), linear_only, tmp_path / "plain", progress=False)
    assert sum(result.fvu) < 0.8 * sum(sparse_only.fvu), "with no learning, the solved skip already explains"

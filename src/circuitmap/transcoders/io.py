"""Load and save transcoder sets: the circuit-tracer layout, GemmaScope .npz files and Hugging Face hub refs.

circuit-tracer layout (a folder; read and written):
  config.yaml: model_kind (transcoder_set | cross_layer_transcoder), model_name, feature_input_hook,
    feature_output_hook (defaults mlp.hook_in / mlp.hook_out), optional activation (relu | topk | jumprelu)
    with k for TopK, optional transcoders (files or hf:// URIs: for PLT one per layer in layer order, for CLT
    the W_enc_*/W_dec_* files). Without transcoders the files are found in the folder by their layer index.
  PLT layer_{i}.safetensors: W_enc [f, d], W_dec [f, d], b_enc [f], b_dec [d], optional
    activation_function.threshold [f] and W_skip [d, d].
  CLT W_enc_{i}.safetensors: W_enc_{i}, b_enc_{i}, b_dec_{i}, optional threshold_{i}, and our extension
    W_skip_{i} [d, d] (the reference never saved CLT skips); W_dec_{i}.safetensors: W_dec_{i} [f, L-i, d].
  A stored threshold means JumpReLU (config.yaml's activation may only confirm it); `save` then writes no
  activation. TopK is written as `activation: topk` and `k: N`; a k stored as a tensor in the layer files (a
  reference defect: activation_function.k or k for PLT, k_{i} or k for CLT) is read as an int.
  Decoders are read lazily (see `LazyTensor`) unless lazy_decoders=False; encoders are read at load.
GemmaScope (read only) → a JumpReLU PLT set: a folder of layer_{i}.npz or layer_{i}/**/params.npz (one
  each), or a single params.npz (or a folder holding one), which is a one-layer set. npz keys: W_enc [d, f],
  transposed on load, W_dec [f, d], b_enc, b_dec, threshold. npz cannot be memory-mapped: it is read eagerly.
Hub refs: `org/repo[/subfolder][@revision]` (only when no such local path exists) and
  `hf://org/repo[/path][@revision]`, fetched with huggingface_hub; HF_HUB_CACHE (or HUGGINGFACE_HUB_CACHE,
  HF_HOME) and HF_HUB_OFFLINE are read when called, not when huggingface_hub was imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from circuitmap.atomic import replace_folder
from circuitmap.errors import CircuitmapError, TranscoderLoadError
from circuitmap.transcoders.activations import Activation, JumpReLU, ReLU, TopK
from circuitmap.transcoders.transcoders import (
    DEFAULT_INPUT_HOOK,
    DEFAULT_OUTPUT_HOOK,
    CrossLayerTranscoder,
    LazyTensor,
    PerLayerTranscoders,
    Transcoders,
    one_line,
    read_safetensor,
)

_KINDS: dict[str, type[Transcoders]] = {
    "transcoder_set": PerLayerTranscoders,
    "cross_layer_transcoder": CrossLayerTranscoder,
}
_ACTIVATIONS = ("relu", "jumprelu", "topk")
_PLT_FILE, _ENC_FILE, _DEC_FILE = "layer_{}.safetensors", "W_enc_{}.safetensors", "W_dec_{}.safetensors"
_HUB_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<path>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?")
_HUB_FILE_SUFFIXES = (".safetensors", ".npz", ".yaml")


def load_transcoders(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    lazy_decoders: bool = True,
) -> Transcoders:
    """Load a transcoder set from a folder, a config.yaml, a GemmaScope params.npz or a hub reference."""
    if dtype is not None and not dtype.is_floating_point:
        raise TranscoderLoadError(f"transcoder dtype must be a floating-point type, got {dtype}")
    path = _local_path(source)
    if not path.exists():
        raise TranscoderLoadError(f"transcoder path not found: {path}")
    if path.is_file() and path.name == "config.yaml":
        path = path.parent
    if path.is_dir():
        transcoders = _load_folder(path, lazy_decoders)
    elif path.suffix == ".npz":
        transcoders = _load_gemmascope([path])
    else:
        raise TranscoderLoadError(f"cannot load {path}: expected a folder, config.yaml or GemmaScope .npz")
    return transcoders.to(device=device, dtype=dtype)


def save_transcoders(transcoders: Transcoders, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `transcoders` to `folder` in the circuit-tracer layout and return the folder.

    The folder is written as one unit (``circuitmap.atomic.replace_folder``), so a failed save leaves no
    half-written set. An existing non-empty folder is replaced only with overwrite=True.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CircuitmapError(f"cannot save transcoders to {folder}: it exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CircuitmapError(f"cannot save transcoders to {folder}: it is not empty (use overwrite=True)")
    return replace_folder(folder, lambda staging: _write(transcoders, staging))


def _write(transcoders: Transcoders, folder: Path) -> None:
    """Write the set's files and config.yaml into `folder`."""
    key = transcoders.file_key
    for i, layer in enumerate(transcoders.layers):
        threshold = layer.activation.threshold if isinstance(layer.activation, JumpReLU) else None
        weights = {
            "W_enc": layer.W_enc,
            "b_enc": layer.b_enc,
            "b_dec": layer.b_dec,
            "threshold": threshold,
            "W_skip": layer.W_skip,
        }
        encoder = {key(name, i): tensor for name, tensor in weights.items() if tensor is not None}
        decoder = {key("W_dec", i): layer.decoder.read()}
        if transcoders.kind == "plt":
            _save_safetensors(encoder | decoder, folder / _PLT_FILE.format(i))
        else:
            _save_safetensors(encoder, folder / _ENC_FILE.format(i))
            _save_safetensors(decoder, folder / _DEC_FILE.format(i))
    model_kind = {cls.kind: name for name, cls in _KINDS.items()}[transcoders.kind]
    config: dict = {"model_kind": model_kind}
    if transcoders.model_name is not None:
        config["model_name"] = transcoders.model_name
    config |= {"feature_input_hook": transcoders.input_hook, "feature_output_hook": transcoders.output_hook}
    if transcoders.activation_name != "jumprelu":
        config["activation"] = transcoders.activation_name
    if transcoders.k is not None:
        config["k"] = transcoders.k
    if transcoders.kind == "plt":
        config["transcoders"] = [_PLT_FILE.format(i) for i in range(transcoders.n_layers)]
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


# --- circuit-tracer layout ----------------------------------------------------------------------------


def _load_folder(folder: Path, lazy: bool) -> Transcoders:
    """A circuit-tracer folder when it has a config.yaml, otherwise a GemmaScope folder."""
    if (folder / "config.yaml").is_file():
        return _load_circuit_tracer(folder, lazy)
    return _load_gemmascope(_gemmascope_files(folder))


def _read_config(path: Path) -> dict:
    """config.yaml as a dict, with model_kind, activation, k and transcoders checked."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TranscoderLoadError(f"cannot read {path}: {one_line(error)}") from None
    if not isinstance(config, dict):
        raise TranscoderLoadError(f"{path} is not a YAML mapping")
    kinds = " or ".join(_KINDS)
    if "model_kind" not in config:
        raise TranscoderLoadError(f"{path} has no model_kind (expected {kinds})")
    if config["model_kind"] not in _KINDS:
        raise TranscoderLoadError(f"{path}: unknown model_kind {config['model_kind']!r} (expected {kinds})")
    if config.get("activation") not in (None, *_ACTIVATIONS):
        raise TranscoderLoadError(
            f"{path}: unknown activation {config['activation']!r} (expected {', '.join(_ACTIVATIONS)})"
        )
    k = config.get("k")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise TranscoderLoadError(f"{path}: k must be a positive integer, got {k!r}")
    listed = config.get("transcoders")
    if listed is not None and not (isinstance(listed, list) and all(isinstance(x, str) for x in listed)):
        raise TranscoderLoadError(f"{path}: transcoders must be a list of file names or hf:// URIs")
    return config


def _load_circuit_tracer(folder: Path, lazy: bool) -> Transcoders:
    config_path = folder / "config.yaml"
    config = _read_config(config_path)
    cls = _KINDS[config["model_kind"]]
    listed = config.get("transcoders")
    files = [_listed_file(entry, folder) for entry in listed] if listed is not None else None
    if cls is PerLayerTranscoders:
        if files is None:
            files = _in_layer_order(_by_index(folder.iterdir(), _PLT_FILE), _PLT_FILE, folder)
        paths = files
        layers = [_read_plt_layer(path, i, lazy) for i, path in enumerate(paths)]
        sources = [str(path) for path in paths]
    else:
        candidates = files if files is not None else list(folder.iterdir())
        encoders = _in_layer_order(_by_index(candidates, _ENC_FILE), _ENC_FILE, folder)
        decoders = _by_index(candidates, _DEC_FILE)
        missing = [_DEC_FILE.format(i) for i in range(len(encoders)) if i not in decoders]
        if missing:
            raise TranscoderLoadError(f"missing layer files in {folder}: {', '.join(missing)}")
        layers = [_read_clt_layer(enc, decoders[i], i, lazy) for i, enc in enumerate(encoders)]
        sources = [f"{enc} / {decoders[i].name}" for i, enc in enumerate(encoders)]
    activations = _activations(layers, config.get("activation"), config.get("k"), config_path)
    return cls(
        [layer["W_enc"] for layer in layers],
        [layer["b_enc"] for layer in layers],
        [layer["W_dec"] for layer in layers],
        [layer["b_dec"] for layer in layers],
        activations,
        [layer.get("W_skip") for layer in layers],
        model_name=config.get("model_name"),
        input_hook=config.get("feature_input_hook", DEFAULT_INPUT_HOOK),
        output_hook=config.get("feature_output_hook", DEFAULT_OUTPUT_HOOK),
        layer_sources=sources,
    )


def _listed_file(entry: str, folder: Path) -> Path:
    """A `transcoders:` entry of config.yaml as a local file (downloading hf:// URIs)."""
    path = _download(entry[len("hf://") :], entry) if entry.startswith("hf://") else folder / entry
    if not path.is_file():
        raise TranscoderLoadError(f"missing layer file {path} (listed in {folder / 'config.yaml'})")
    return path


def _by_index(paths, pattern: str) -> dict[int, Path]:
    """The paths whose names match `pattern` (one `{}` for the layer index), keyed by index."""
    prefix, suffix = pattern.split("{}")
    regex = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
    return {int(m[1]): Path(p) for p in paths if (m := regex.fullmatch(Path(p).name))}


def _in_layer_order(found: dict[int, Path], pattern: str, where: Path) -> list[Path]:
    """The files of `found` in layer order; every layer from 0 to the highest must be there."""
    if not found:
        raise TranscoderLoadError(f"no {pattern.format('*')} files in {where}")
    missing = [pattern.format(i) for i in range(max(found) + 1) if i not in found]
    if missing:
        raise TranscoderLoadError(f"missing layer files in {where}: {', '.join(missing)}")
    return [found[i] for i in sorted(found)]


def _read_safetensors(
    path: Path,
    keys: dict[str, str],
    required: tuple[str, ...],
    k_keys: tuple[str, ...] = (),
    lazy: bool = False,
) -> dict:
    """Tensors of `path` by our names (`keys`: name → key); W_dec as a LazyTensor when lazy; k as an int."""
    try:
        with safe_open(path, framework="pt") as f:
            present = set(f.keys())
            out = {
                name: read_safetensor(f, key)
                for name, key in keys.items()
                if key in present and not (lazy and name == "W_dec")
            }
            k_key = next((key for key in k_keys if key in present), None)
            k = read_safetensor(f, k_key) if k_key is not None else None
    except Exception as error:  # safetensors raises several types for bad files; rewrap them all
        raise TranscoderLoadError(f"cannot read {path}: {one_line(error)}") from None
    missing = [keys[name] for name in required if keys[name] not in present]
    if missing:
        raise TranscoderLoadError(f"{path} has no {', '.join(missing)} tensor")
    if lazy and "W_dec" in keys:
        out["W_dec"] = LazyTensor.from_file(path, keys["W_dec"])
    if k is not None:
        if k.numel() != 1 or (k.is_floating_point() and k.item() != int(k.item())):
            raise TranscoderLoadError(f"{path}: {k_key} must hold one integer, got {k.tolist()}")
        out["k"] = int(k.item())
    return out


def _read_plt_layer(path: Path, layer: int, lazy: bool) -> dict:
    if path.suffix == ".npz":
        return _read_npz(path)
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")
    key = PerLayerTranscoders.file_key
    return _read_safetensors(
        path, {name: key(name, layer) for name in names}, names[:4], (key("k", layer), "k"), lazy
    )


def _read_clt_layer(encoder: Path, decoder: Path, layer: int, lazy: bool) -> dict:
    names = ("W_enc", "b_enc", "b_dec", "threshold", "W_skip")
    key = CrossLayerTranscoder.file_key
    weights = _read_safetensors(
        encoder, {name: key(name, layer) for name in names}, names[:3], (key("k", layer), "k")
    )
    return weights | _read_safetensors(decoder, {"W_dec": key("W_dec", layer)}, ("W_dec",), lazy=lazy)


def _activations(layers: list[dict], name: str | None, k: int | None, config: Path) -> list[Activation]:
    """One activation per layer: JumpReLU where a threshold is stored, else config.yaml's (TopK when a k is
    stored in the files and config.yaml names none)."""
    file_ks = {layer["k"] for layer in layers if "k" in layer}
    if len(file_ks) > 1 or (k is not None and file_ks and file_ks != {k}):
        raise TranscoderLoadError(
            f"{config}: TopK k disagrees between config.yaml ({k}) and the layer files "
            f"({', '.join(map(str, sorted(file_ks)))})"
        )
    k = k if k is not None else next(iter(file_ks), None)
    if name is None and k is not None:
        name = "topk"
    activations: list[Activation] = []
    for i, layer in enumerate(layers):
        if "threshold" in layer:
            if name == "topk":
                raise TranscoderLoadError(f"{config} says activation topk but layer {i} has a threshold")
            activations.append(JumpReLU(layer["threshold"]))
        elif name == "jumprelu":
            raise TranscoderLoadError(f"{config} says activation jumprelu but layer {i} stores no threshold")
        elif name == "topk":
            if k is None:
                raise TranscoderLoadError(f"{config} says activation topk but gives no k")
            activations.append(TopK(k))
        else:
            activations.append(ReLU())
    return activations


# --- GemmaScope npz -----------------------------------------------------------------------------------


def _gemmascope_files(folder: Path) -> list[Path]:
    """The params files of a GemmaScope folder in layer order (a lone params.npz is a one-layer set)."""
    if (folder / "params.npz").is_file():
        return [folder / "params.npz"]
    found: dict[int, Path] = {}
    for path in folder.iterdir():
        m = re.fullmatch(r"layer_(\d+)(\.npz)?", path.name)
        if m is None or (m[2] is not None) != path.is_file():
            continue
        params = [path] if m[2] else sorted(path.rglob("params.npz"))
        if len(params) > 1:
            raise TranscoderLoadError(
                f"{path} holds {len(params)} params.npz files; list the ones to use in "
                f"a config.yaml `transcoders:` list"
            )
        layer = int(m[1])
        if params and layer in found:
            raise TranscoderLoadError(
                f"{folder} has two files for layer {layer}: {found[layer]} and {params[0]}"
            )
        if params:
            found[layer] = params[0]
    if not found:
        raise TranscoderLoadError(
            f"{folder} has no config.yaml and no GemmaScope layer_*.npz or layer_*/**/params.npz files"
        )
    return _in_layer_order(found, "layer_{}.npz", folder)


def _read_npz(path: Path) -> dict:
    """One GemmaScope layer: W_enc transposed to [f, d], the threshold kept for JumpReLU."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise TranscoderLoadError(f"{path} is not an .npz archive")
        with npz:
            arrays = {
                name: npz[name]
                for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
                if name in npz.files
            }
    except TranscoderLoadError:
        raise
    except Exception as error:  # numpy and zipfile raise many types for bad archives; rewrap them all
        reason = f"not a valid .npz archive of plain arrays ({type(error).__name__})"
        raise TranscoderLoadError(f"cannot read {path}: {reason}") from None
    missing = [name for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold") if name not in arrays]
    if missing:
        raise TranscoderLoadError(f"{path} has no {', '.join(missing)} array")
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    return tensors


def _load_gemmascope(files: list[Path]) -> Transcoders:
    layers = [_read_npz(path) for path in files]
    return PerLayerTranscoders(
        [layer["W_enc"] for layer in layers],
        [layer["b_enc"] for layer in layers],
        [layer["W_dec"] for layer in layers],
        [layer["b_dec"] for layer in layers],
        [JumpReLU(layer["threshold"]) for layer in layers],
        layer_sources=[str(path) for path in files],
    )


# --- Hugging Face hub --------------------------------------------------------------------------------


def _local_path(source: str | Path) -> Path:
    """The local file or folder named by `source`, downloading hub references first."""
    if isinstance(source, Path):
        return source
    if source.startswith("hf://"):
        return _download(source[len("hf://") :], source)
    path = Path(source).expanduser()
    if path.exists() or not _HUB_REF.fullmatch(source):
        return path
    return _download(source, source)


def _download(ref: str, shown: str) -> Path:
    """Fetch `org/repo[/path][@revision]`: one file when path ends in a known suffix, else a (sub)folder."""
    import huggingface_hub  # imported on use: it is slow to import

    m = _HUB_REF.fullmatch(ref)
    if m is None:
        raise TranscoderLoadError(f"not a hub reference: {shown} (expected hf://org/repo[/path][@revision])")
    repo, sub, revision = m["repo"], m["path"].strip("/"), m["rev"]
    if sub.endswith(_HUB_FILE_SUFFIXES):
        return Path(
            _from_hub(shown, huggingface_hub.hf_hub_download, repo_id=repo, filename=sub, revision=revision)
        )
    snapshot = Path(
        _from_hub(
            shown,
            huggingface_hub.snapshot_download,
            repo_id=repo,
            revision=revision,
            allow_patterns=[f"{sub}/*"] if sub else None,
        )
    )
    if not (snapshot / sub).is_dir():
        raise TranscoderLoadError(f"cannot load {shown}: the hub repository {repo} has no folder {sub}")
    return snapshot / sub


def _from_hub(shown: str, fetch, **kwargs) -> str:
    """Call a huggingface_hub download function with the cache and offline mode the environment sets now."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache, offline = _hub_cache(), _hub_offline()
    try:
        return fetch(**kwargs, cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError:
        mode = ", offline mode" if offline else ""
        raise TranscoderLoadError(
            f"cannot download {shown}: the hub is unreachable and it is not in the "
            f"local cache ({cache}{mode})"
        ) from None
    except (OSError, ValueError, EntryNotFoundError) as error:
        raise TranscoderLoadError(f"cannot download {shown}: {one_line(error)}") from None


def _hub_cache() -> str:
    """The hub cache folder, from the environment as it is now."""
    from huggingface_hub import constants

    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return os.path.expanduser(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set now (falling back to the value huggingface_hub read at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return constants.HF_HUB_OFFLINE
    return value.strip().lower() in ("1", "true", "yes", "on")

"""Persona vector files, and llama.cpp control vectors.

A persona vector holds one direction per layer: ``directions[i]`` lives in the residual stream entering
layer ``i`` (``resid_pre``; layer 0's is the embedding output), as the reference's ``hidden_states[i]``.
Its file is one ``.safetensors`` file: tensors ``layer.{i}`` (float32, ``[d_model]``) and, under the
metadata key ``circuitmap.persona``, JSON with where it comes from: the model's name, family, width, layer
count and vocabulary size (the model's fingerprint), the trait and the SHA-256 of its file, the positions
averaged (``response`` or ``prompt_last``), the scorer, thresholds and counts of answers kept, the
generation settings and, when a sweep measured them, its results. Loading checks the file against itself and,
given a model, against the model: another width or layer count is refused in one line.

llama.cpp's control vectors (``--control-vector FILE``) are GGUF files with ``general.architecture =
controlvector``, ``controlvector.model_hint`` (the model's architecture) and ``controlvector.layer_count``
(the number of directions), and one float32 tensor ``direction.{N}`` per steered layer. llama.cpp adds
``direction.N`` to the output of its block ``N`` (``N ≥ 1``; block 0's output cannot be steered): the residual
entering circuitmap's layer ``N + 1``. So ``directions[i]`` is written as ``direction.{i - 1}`` for
``i ≥ 2``, and ``llama-cli --control-vector-scaled FILE C`` steers a GGUF model as
``steer(model, vector, i, C)`` does on every exported layer (``--control-vector-layer-range`` picks some).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError
from circuitmap.models import Model

FORMAT_VERSION = 1
METADATA_KEY = "circuitmap.persona"
CONTROL_VECTOR = "controlvector"
LLAMA_CPP_ARCHITECTURES = {"gpt_neox": "gptneox", "gemma3_text": "gemma3"}
"""circuitmap's family names that llama.cpp spells otherwise (the others are the same)."""
FIRST_EXPORTED_LAYER = 2
"""The first layer whose residual llama.cpp can steer: the output of its block 1."""


@dataclass
class PersonaVector:
    """One direction per layer (``directions`` ``[n_layers, d_model]``, float32) and where it comes from."""

    directions: torch.Tensor
    info: dict

    @property
    def n_layers(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        return self.directions.shape[1]

    def layer(self, layer: int) -> torch.Tensor:
        """The direction of ``layer`` (the residual entering it), ``[d_model]``."""
        if not 0 <= layer < self.n_layers:
            raise CircuitmapError(
                f"layer {layer} is out of range (the vector has layers 0..{self.n_layers - 1})"
            )
        return self.directions[layer]

    def check_model(self, model: Model, what: str = "the persona vector") -> None:
        """A one-line error when ``model``'s width or layer count differ from the vector's."""
        if (model.d_model, model.n_layers) != (self.d_model, self.n_layers):
            raise CircuitmapError(
                f"{what} was extracted from {self.info.get('model', 'another model')} (width {self.d_model}, "
                f"{self.n_layers} layers); {model.name} has width {model.d_model} and {model.n_layers} layers"
            )

    def save(self, path: str | Path) -> Path:
        """Write the vector as the module describes, atomically."""
        tensors = {
            f"layer.{i}": self.directions[i].detach().float().cpu().contiguous() for i in range(self.n_layers)
        }
        metadata = {METADATA_KEY: json.dumps({**self.info, "format": FORMAT_VERSION})}
        return atomic_write(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def model_fingerprint(model: Model) -> dict:
    """What a vector records of its model: name, family, width, layer count and vocabulary size."""
    return {
        "model": model.name,
        "family": model.adapter.family,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "d_vocab": model.d_vocab,
    }


def load_persona_vector(path: str | Path, model: Model | None = None) -> PersonaVector:
    """The persona vector in ``path``, checked (and checked against ``model`` when given)."""
    path = Path(path)
    if not path.is_file():
        raise CircuitmapError(f"{path}: persona vector file not found")
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises several types for missing or corrupt files
        raise CircuitmapError(f"{path}: not a readable safetensors file ({error})") from None
    if METADATA_KEY not in metadata:
        raise CircuitmapError(f"{path}: not a persona vector file (no {METADATA_KEY} metadata)")
    try:
        info = json.loads(metadata[METADATA_KEY])
        n_layers, d_model = int(info["n_layers"]), int(info["d_model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CircuitmapError(f"{path}: the persona vector's metadata is unreadable") from None
    if info.get("format", 0) > FORMAT_VERSION:
        raise CircuitmapError(f"{path}: written by a newer circuitmap (format {info['format']})")
    expected = {f"layer.{i}" for i in range(n_layers)}
    if set(tensors) != expected:
        raise CircuitmapError(
            f"{path}: expected the tensors layer.0 … layer.{n_layers - 1}, found {len(tensors)} others"
        )
    if any(tensor.shape != (d_model,) for tensor in tensors.values()):
        raise CircuitmapError(f"{path}: every layer's direction must have the width {d_model}")
    vector = PersonaVector(torch.stack([tensors[f"layer.{i}"].float() for i in range(n_layers)]), info)
    if model is not None:
        vector.check_model(model, str(path))
    return vector


@dataclass(frozen=True)
class ControlVector:
    """A llama.cpp control vector read back: directions keyed by circuitmap's layer (the residual entering
    it), the model hint and the layer count the file declares."""

    directions: dict[int, torch.Tensor]
    model_hint: str
    layer_count: int


def export_control_vector(
    vector: PersonaVector,
    path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write ``vector`` as a llama.cpp control vector: ``direction.{i - 1}`` for each of ``layers`` (default:
    every layer from 2 on). The model hint defaults to the vector's family as llama.cpp names it."""
    chosen = sorted(set(range(FIRST_EXPORTED_LAYER, vector.n_layers) if layers is None else layers))
    if not chosen:
        raise CircuitmapError(f"no layer to export: llama.cpp steers layers {FIRST_EXPORTED_LAYER} and up")
    for layer in chosen:
        if not FIRST_EXPORTED_LAYER <= layer < vector.n_layers:
            raise CircuitmapError(
                f"layer {layer} cannot be exported: llama.cpp steers the residual entering layers "
                f"{FIRST_EXPORTED_LAYER}..{vector.n_layers - 1}"
            )
    family = vector.info.get("family", "")
    hint = model_hint if model_hint is not None else LLAMA_CPP_ARCHITECTURES.get(family, family)

    def write(temporary: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(temporary), CONTROL_VECTOR)
        writer.add_string(f"{CONTROL_VECTOR}.model_hint", hint)
        writer.add_int32(f"{CONTROL_VECTOR}.layer_count", len(chosen))
        for layer in chosen:
            writer.add_tensor(f"direction.{layer - 1}", vector.layer(layer).detach().float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_write(path, write)


def load_control_vector(path: str | Path) -> ControlVector:
    """The directions of a llama.cpp control vector, keyed by circuitmap's layer (``direction.N`` gives layer
    ``N + 1``); a one-line error for a file llama.cpp would refuse."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CircuitmapError(f"{path}: control vector file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises several types for files that are not GGUF
        raise CircuitmapError(f"{path}: not a readable GGUF file ({error})") from None

    def field(name: str):
        return reader.fields[name].contents() if name in reader.fields else None

    if field("general.architecture") != CONTROL_VECTOR:
        raise CircuitmapError(f"{path}: not a control vector (general.architecture is not {CONTROL_VECTOR})")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        prefix, _, number = tensor.name.partition(".")
        if prefix != "direction" or not number.isdigit() or int(number) == 0:
            raise CircuitmapError(f"{path}: tensor {tensor.name!r} is not direction.N with N ≥ 1")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise CircuitmapError(f"{path}: {tensor.name} is not a one-dimensional float32 tensor")
        directions[int(number) + 1] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    if len({len(direction) for direction in directions.values()}) > 1:
        raise CircuitmapError(f"{path}: the directions do not all have the same width")
    return ControlVector(
        directions,
        str(field(f"{CONTROL_VECTOR}.model_hint") or ""),
        int(field(f"{CONTROL_VECTOR}.layer_count") or 0),
    )

"""Transcoder sets: per-layer (PLT) and cross-layer (CLT) transcoders with one common API.

A transcoder reads an MLP's input x and predicts its output: `a = σ(W_enc x + b_enc)`,
`ŷ = a W_dec + b_dec (+ x @ W_skip.T)`. Weights are frozen buffers (circuitmap reads transcoders, it does not
train them). Each layer's decoder sits in a `LazyTensor`: a set loaded from safetensors files keeps W_dec on
disk until first use, so decoders are not part of `state_dict()`; `save()` writes them.

Devices: each layer's weights may sit on a device of their own. A layer's encoding and skip term compute where
its weights are (inputs are moved there), and a decoder output is summed where the output layer's bias is.
By default attribution and interventions move each layer to the device of the model layer it serves
(`follow`); `place` fixes the devices instead, e.g. to keep a large set on other GPUs than the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from circuitmap.errors import CircuitmapError, IncompatibleTranscodersError, TranscoderLoadError
from circuitmap.transcoders.activations import Activation, JumpReLU

DEFAULT_INPUT_HOOK = "mlp.hook_in"
DEFAULT_OUTPUT_HOOK = "mlp.hook_out"


def one_line(error: BaseException) -> str:
    """An exception's message on one line, for errors that wrap it."""
    return " ".join(str(error).split()) or type(error).__name__


def read_safetensor(file, key: str) -> Tensor:
    """Tensor `key` of an open safetensors file, copied into a fresh torch allocation.

    safetensors returns buffers of arbitrary alignment, and BLAS rounding depends on alignment: the copy makes
    a loaded set compute bit-identically to the same weights built in memory.
    """
    return file.get_tensor(key).clone()


class LazyTensor:
    """A tensor held in memory, or kept in a safetensors file until first use.

    Reads go through `safe_open`, which memory-maps the file, so only this tensor's bytes are read.
    """

    def __init__(
        self, tensor: Tensor | None, shape: tuple[int, ...], path: Path | None = None, key: str = ""
    ):
        self._tensor = tensor
        self.shape = shape
        self.path = path
        self.key = key
        self._pending: list[Callable[[Tensor], Tensor]] = []

    @classmethod
    def in_memory(cls, tensor: Tensor) -> LazyTensor:
        """Wrap a tensor that is already loaded."""
        return cls(tensor, tuple(tensor.shape))

    @classmethod
    def from_file(cls, path: Path, key: str) -> LazyTensor:
        """Point at tensor `key` of safetensors file `path`; only the file's header is read now."""
        try:
            with safe_open(path, framework="pt") as f:
                shape = tuple(f.get_slice(key).get_shape())
        except Exception as error:  # safetensors raises several types for bad files; rewrap them all
            raise TranscoderLoadError(f"cannot read {key} from {path}: {one_line(error)}") from None
        return cls(None, shape, Path(path), key)

    @property
    def loaded(self) -> bool:
        """Whether the tensor is in memory."""
        return self._tensor is not None

    def read(self) -> Tensor:
        """The tensor; if it is still on disk, a fresh read that is not kept (for one-off uses: saving)."""
        if self._tensor is not None:
            return self._tensor
        try:
            with safe_open(self.path, framework="pt") as f:
                tensor = read_safetensor(f, self.key)
        except Exception as error:  # safetensors raises several types for bad files; rewrap them all
            raise TranscoderLoadError(f"cannot read {self.key} from {self.path}: {one_line(error)}") from None
        if tuple(tensor.shape) != self.shape:
            raise TranscoderLoadError(f"{self.path} changed on disk: {self.key} is now {tuple(tensor.shape)}")
        for convert in self._pending:
            tensor = convert(tensor)
        return tensor

    def get(self) -> Tensor:
        """The tensor, read from disk on first use and kept in memory from then on."""
        self._tensor = self.read()
        self._pending.clear()
        return self._tensor

    def apply(self, convert: Callable[[Tensor], Tensor]) -> None:
        """Apply a module conversion (`.to()`, `.double()`, ...) now, or at the first read if on disk."""
        if self._tensor is None:
            self._pending.append(convert)
        else:
            self._tensor = convert(self._tensor)


class _Layer(nn.Module):
    """One layer's weights: encoder, biases, optional skip, activation and (possibly lazy) decoder."""

    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor | LazyTensor,
        b_dec: Tensor,
        activation: Activation,
        W_skip: Tensor | None,
    ):
        super().__init__()
        self.register_buffer("W_enc", W_enc)
        self.register_buffer("b_enc", b_enc)
        self.register_buffer("b_dec", b_dec)
        self.register_buffer("W_skip", W_skip)
        self.activation = activation
        self.decoder = W_dec if isinstance(W_dec, LazyTensor) else LazyTensor.in_memory(W_dec)

    @property
    def W_dec(self) -> Tensor:
        return self.decoder.get()

    def _apply(self, fn, recurse=True):
        # nn.Module.to() and friends reach buffers through _apply; the decoder is not a buffer.
        super()._apply(fn, recurse)
        self.decoder.apply(fn)
        return self


def _describe(activation: Activation) -> str:
    return activation.name if activation.k is None else f"{activation.name} (k={activation.k})"


class Transcoders(nn.Module):
    """A set of transcoders covering every layer of a model: the API shared by PLT and CLT sets.

    Per-layer arguments are sequences with one entry per layer; `W_skip` may be None (no skip) or hold one
    [d_model, d_model] matrix per layer. `layer_sources` names where each layer came from, for error messages.
    """

    kind: str

    def __init__(
        self,
        W_enc: Sequence[Tensor],
        b_enc: Sequence[Tensor],
        W_dec: Sequence[Tensor | LazyTensor],
        b_dec: Sequence[Tensor],
        activations: Sequence[Activation],
        W_skip: Sequence[Tensor | None] | None = None,
        *,
        model_name: str | None = None,
        input_hook: str = DEFAULT_INPUT_HOOK,
        output_hook: str = DEFAULT_OUTPUT_HOOK,
        layer_sources: Sequence[str] | None = None,
    ):
        super().__init__()
        n = len(W_enc)
        skips = list(W_skip) if W_skip is not None else [None] * n
        sources = list(layer_sources) if layer_sources is not None else [f"layer {i}" for i in range(n)]
        lengths = [len(x) for x in (W_enc, b_enc, W_dec, b_dec, activations, skips, sources)]
        if n == 0 or len(set(lengths)) != 1:
            raise TranscoderLoadError(
                f"a transcoder set needs one entry per layer for each weight, got lengths {lengths}"
            )
        self.model_name = model_name
        self.input_hook = input_hook
        self.output_hook = output_hook
        weights = zip(W_enc, b_enc, W_dec, b_dec, activations, skips, strict=True)
        self.layers = nn.ModuleList(_Layer(*layer) for layer in weights)
        self._placed = False
        self._check_shapes(sources)

    @staticmethod
    def file_key(name: str, layer: int) -> str:
        """The key of weight `name` ("W_enc", "threshold", ...) of `layer` in circuit-tracer files."""
        raise NotImplementedError

    def _decoder_shape(self, layer: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _check_shapes(self, sources: list[str]) -> None:
        """Raise TranscoderLoadError naming the source unless layers agree on widths, activation and skip."""
        first = self.layers[0]
        if first.W_enc.ndim != 2:
            raise TranscoderLoadError(
                f"{sources[0]}: {self.file_key('W_enc', 0)} must be 2-D, got shape {tuple(first.W_enc.shape)}"
            )
        f, d = first.W_enc.shape
        for i, (layer, where) in enumerate(zip(self.layers, sources, strict=True)):
            shapes = {
                "W_enc": (layer.W_enc.shape, (f, d)),
                "b_enc": (layer.b_enc.shape, (f,)),
                "b_dec": (layer.b_dec.shape, (d,)),
                "W_dec": (layer.decoder.shape, self._decoder_shape(i)),
            }
            if layer.W_skip is not None:
                shapes["W_skip"] = (layer.W_skip.shape, (d, d))
            if isinstance(layer.activation, JumpReLU):
                shapes["threshold"] = (layer.activation.threshold.shape, (f,))
            for name, (shape, expected) in shapes.items():
                if tuple(shape) != expected:
                    raise TranscoderLoadError(
                        f"{where}: {self.file_key(name, i)} has shape {tuple(shape)}, "
                        f"expected {expected} (d_features={f}, d_model={d})"
                    )
            if (layer.W_skip is None) != (first.W_skip is None):
                raise TranscoderLoadError(f"{where}: W_skip is present in some layers but not in others")
            if _describe(layer.activation) != _describe(first.activation):
                raise TranscoderLoadError(
                    f"{where}: activation {_describe(layer.activation)} differs from "
                    f"layer 0's {_describe(first.activation)}"
                )
        if self.k is not None and self.k > f:
            raise TranscoderLoadError(f"{sources[0]}: TopK k={self.k} is larger than d_features={f}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_features(self) -> int:
        return self.layers[0].W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.layers[0].W_enc.shape[1]

    @property
    def activation_name(self) -> str:
        return self.layers[0].activation.name

    @property
    def k(self) -> int | None:
        """TopK's k, or None for other activations."""
        return self.layers[0].activation.k

    @property
    def has_skip(self) -> bool:
        return self.layers[0].W_skip is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].W_enc.dtype

    @property
    def device(self) -> torch.device:
        """Layer 0's device (see ``layer_device`` for the others)."""
        return self.layers[0].W_enc.device

    def layer_device(self, layer: int) -> torch.device:
        """The device of layer ``layer``'s weights, where its encoding and skip term compute."""
        return self._layer(layer).W_enc.device

    @property
    def placement(self) -> tuple[torch.device, ...] | None:
        """Every layer's device while ``place`` holds the set where it is, else None (the set follows the
        model)."""
        return tuple(self.layer_device(i) for i in range(self.n_layers)) if self._placed else None

    def place(
        self,
        devices: str | torch.device | Sequence[str | torch.device] | Mapping[int, str | torch.device] | None,
    ) -> Transcoders:
        """Move layers to devices of their own and hold the set there: ``attribute``, ``intervene`` and
        ``generate_with`` then only cast it to the model's dtype, and move each layer's inputs to it and its
        outputs to the model layer it serves. ``devices`` is one device for every layer, a sequence of one per
        layer, or a mapping ``{layer: device}`` (the layers it leaves out stay where they are). None releases
        the set: each layer moves again to the device its model layer runs on."""
        from circuitmap.models.loading import resolve_device  # the models package imports transcoders

        if devices is None:
            self._placed = False
            return self
        if isinstance(devices, (str, torch.device)):
            devices = [devices] * self.n_layers
        if not isinstance(devices, Mapping):
            if len(devices) != self.n_layers:
                raise CircuitmapError(
                    f"place needs one device per layer ({self.n_layers}), got {len(devices)}"
                )
            devices = dict(enumerate(devices))
        for layer, device in devices.items():
            self._layer(layer).to(resolve_device(device))
        self._placed = True
        return self

    def follow(self, layer_devices: Sequence[torch.device], dtype: torch.dtype) -> Transcoders:
        """Make the set ready for a model whose layer i computes on ``layer_devices[i]`` in ``dtype``: cast
        every layer to ``dtype`` and, unless ``place`` holds the set, move it to its model layer's device."""
        for layer, device in enumerate(layer_devices):
            self._layer(layer).to(device=None if self._placed else device, dtype=dtype)
        return self

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_features={self.d_features}, activation={_describe(self.layers[0].activation)}, "
            f"skip={self.has_skip}"
        )

    def _layer(self, layer: int) -> _Layer:
        if not 0 <= layer < self.n_layers:
            raise CircuitmapError(f"layer {layer} is out of range for a {self.n_layers}-layer transcoder set")
        return self.layers[layer]

    def first_layers(self, n_layers: int) -> Transcoders:
        """The set of a model cut after its first ``n_layers`` layers (``Model.first_layers``): those layers'
        transcoders, weights shared; a cross-layer set keeps only the writes to those layers."""
        if not 1 <= n_layers <= self.n_layers:
            raise CircuitmapError(
                f"a transcoder set can be cut after 1..{self.n_layers} layers, not {n_layers}"
            )
        layers = [self._layer(i) for i in range(n_layers)]
        cut = type(self)(
            W_enc=[layer.W_enc for layer in layers],
            b_enc=[layer.b_enc for layer in layers],
            W_dec=[self._first_decoder(i, n_layers) for i in range(n_layers)],
            b_dec=[layer.b_dec for layer in layers],
            activations=[layer.activation for layer in layers],
            W_skip=[layer.W_skip for layer in layers] if self.has_skip else None,
            model_name=self.model_name,
            input_hook=self.input_hook,
            output_hook=self.output_hook,
        )
        cut._placed = self._placed
        return cut

    def _first_decoder(self, layer: int, n_layers: int) -> Tensor | LazyTensor:
        """Layer ``layer``'s decoder in the set cut after ``n_layers`` layers."""
        return self._layer(layer).decoder

    def check_model(self, n_layers: int, d_model: int) -> None:
        """Raise IncompatibleTranscodersError unless the set fits a model of this depth and width."""
        if (n_layers, d_model) != (self.n_layers, self.d_model):
            raise IncompatibleTranscodersError(
                f"transcoders have {self.n_layers} layers of width {self.d_model} "
                f"but the model has {n_layers} layers of width {d_model}"
            )

    def pre_activations(self, layer: int, x: Tensor) -> Tensor:
        """`W_enc x + b_enc` for MLP inputs x [..., d_model] (moved to the layer's device and dtype) →
        [..., d_features]."""
        weights = self._layer(layer)
        if x.shape[-1] != self.d_model:
            raise IncompatibleTranscodersError(
                f"input has width {x.shape[-1]} but the transcoders have d_model {self.d_model}"
            )
        return F.linear(x.to(weights.W_enc), weights.W_enc, weights.b_enc)

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Feature activations [..., d_features] of MLP inputs x [..., d_model] at `layer`."""
        return self.activate(layer, self.pre_activations(layer, x))

    def activate(self, layer: int, pre: Tensor) -> Tensor:
        """Feature activations [..., d_features] from pre-activations at `layer` (the activation function)."""
        return self._layer(layer).activation(pre)

    def sparse_encode(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Nonzero activations as (indices, values): indices [nnz, x.ndim] hold x's leading indices and then
        the feature id (as `acts.nonzero()`), values [nnz] the activations, in the same order."""
        acts = self.encode(layer, x)
        indices = acts.nonzero()
        return indices, acts[indices.unbind(-1)]

    def skip(self, layer: int, x: Tensor) -> Tensor:
        """The skip term `x @ W_skip.T` [..., d_model] on the layer's device; zeros when the set has none."""
        weights = self._layer(layer)
        if weights.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_model, dtype=self.dtype, device=weights.W_enc.device)
        return x.to(weights.W_skip) @ weights.W_skip.T

    def decode(self, acts: Sequence[Tensor | None], out_layer: int) -> Tensor:
        """Decoder contributions to MLP output `out_layer` plus its b_dec (no skip term).

        `acts` holds one entry per layer ([..., d_features] or None for "no active features"); with every
        entry that is read None, the result is b_dec alone, of shape [d_model]. Each source layer's product is
        taken on its own device and summed on the output layer's.
        """
        if len(acts) != self.n_layers:
            raise CircuitmapError(f"decode needs one entry per layer ({self.n_layers}), got {len(acts)}")
        out = self._layer(out_layer).b_dec
        for source in self._sources_of(out_layer):
            a = acts[source]
            if a is not None:
                decoder = self.decoder_vectors(source, slice(None), out_layer)
                out = out + (a.to(device=decoder.device, dtype=self.dtype) @ decoder).to(out.device)
        return out

    def _sources_of(self, out_layer: int) -> range:
        """The layers whose features write to MLP output `out_layer`."""
        raise NotImplementedError

    def output_layers(self, layer: int) -> range:
        """The MLP outputs that the features of `layer` write to."""
        raise NotImplementedError

    def decoder_vectors(
        self, layer: int, feature_ids: Tensor | slice, out_layer: int | None = None
    ) -> Tensor:
        """Decoder rows of features `feature_ids` of `layer` ([n, d_model] for one output layer)."""
        raise NotImplementedError

    def encoder_vectors(self, layer: int, feature_ids: Tensor) -> Tensor:
        """Encoder rows [n, d_model] of features `feature_ids` of `layer`."""
        return self._layer(layer).W_enc[feature_ids]

    def reconstruct(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        """Predicted MLP outputs [..., d_model] (skip included), one per layer, from all MLP inputs."""
        if len(inputs) != self.n_layers:
            raise CircuitmapError(
                f"reconstruct needs the MLP inputs of all {self.n_layers} layers, got {len(inputs)}"
            )
        acts = [self.encode(i, x) for i, x in enumerate(inputs)]
        return [self.decode(acts, m) + self.skip(m, x) for m, x in enumerate(inputs)]

    def fingerprint(self) -> str:
        """A hash that tells transcoder sets apart: kind, shapes, activation and a sample of every layer's
        weights (encoder bias, first and last encoder and decoder rows) rounded to float32, so that the same
        set loaded in another precision or on another device has the same fingerprint."""
        digest = hashlib.sha256()
        described = (
            f"{self.kind} {self.n_layers} {self.d_features} {self.d_model} {self.activation_name} {self.k}"
        )
        digest.update(described.encode())
        ends = torch.tensor([0, self.d_features - 1])
        with torch.no_grad():
            for layer in range(self.n_layers):
                for tensor in (
                    self._layer(layer).b_enc,
                    self.encoder_vectors(layer, ends),
                    self.decoder_vectors(layer, ends),
                ):
                    digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def check_fingerprint(self, recorded: str | None, what: str) -> None:
        """A one-line error when ``recorded`` (the fingerprint kept with ``what``: a graph, a database)
        names another set than this one; None (nothing recorded) passes."""
        if recorded is None:
            return
        mine = self.fingerprint()
        if recorded != mine:
            raise IncompatibleTranscodersError(
                f"{what} was made with another transcoder set (fingerprint {str(recorded)[:12]}), "
                f"not this one (fingerprint {mine[:12]})"
            )

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the set to `folder` in the circuit-tracer layout (see `circuitmap.transcoders.io`)."""
        from circuitmap.transcoders.io import save_transcoders  # io imports this module

        return save_transcoders(self, folder, overwrite=overwrite)


class PerLayerTranscoders(Transcoders):
    """Per-layer transcoders: layer i's features read MLP input i and write only to MLP output i.

    W_enc [d_features, d_model], b_enc [d_features], W_dec [d_features, d_model], b_dec [d_model] per layer.
    """

    kind = "plt"

    @staticmethod
    def file_key(name: str, layer: int) -> str:
        return {"threshold": "activation_function.threshold", "k": "activation_function.k"}.get(name, name)

    def _decoder_shape(self, layer: int) -> tuple[int, ...]:
        return (self.d_features, self.d_model)

    def _sources_of(self, out_layer: int) -> range:
        return range(out_layer, out_layer + 1)

    def output_layers(self, layer: int) -> range:
        return range(layer, layer + 1)

    def decoder_vectors(
        self, layer: int, feature_ids: Tensor | slice, out_layer: int | None = None
    ) -> Tensor:
        """Rows [n, d_model] of W_dec; `out_layer`, if given, must be `layer` (the only one they write to)."""
        if out_layer is not None and out_layer != layer:
            raise CircuitmapError(
                f"per-layer transcoder features of layer {layer} do not write to layer {out_layer}"
            )
        return self._layer(layer).W_dec[feature_ids]


class CrossLayerTranscoder(Transcoders):
    """A cross-layer transcoder: layer i's features read MLP input i and write to MLP outputs i..L-1.

    Per source layer i: W_enc [d_features, d_model], b_enc [d_features], b_dec [d_model] (the bias of MLP
    output i) and W_dec [d_features, L-i, d_model], whose slot j is the vector written to output i+j.
    """

    kind = "clt"

    @staticmethod
    def file_key(name: str, layer: int) -> str:
        return f"{name}_{layer}"

    def _decoder_shape(self, layer: int) -> tuple[int, ...]:
        return (self.d_features, self.n_layers - layer, self.d_model)

    def _sources_of(self, out_layer: int) -> range:
        return range(out_layer + 1)

    def _first_decoder(self, layer: int, n_layers: int) -> Tensor:
        return self._layer(layer).W_dec[:, : n_layers - layer]

    def output_layers(self, layer: int) -> range:
        return range(layer, self.n_layers)

    def decoder_vectors(
        self, layer: int, feature_ids: Tensor | slice, out_layer: int | None = None
    ) -> Tensor:
        """Vectors [n, d_model] written to `out_layer` (layer ≤ out_layer < L), or [n, L-layer, d_model]."""
        W_dec = self._layer(layer).W_dec
        if out_layer is None:
            return W_dec[feature_ids]
        if not layer <= out_layer < self.n_layers:
            raise CircuitmapError(
                f"features of layer {layer} write to layers {layer}..{self.n_layers - 1}, "
                f"not to layer {out_layer}"
            )
        return W_dec[feature_ids, out_layer - layer]

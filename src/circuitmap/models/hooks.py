"""Hook points and controls on a Hugging Face model, through its own extension points.

Hook points (per layer ``l``):

- ``resid_pre``: the residual stream entering layer ``l`` (``resid_pre`` of layer 0 is the embedding output,
  position embeddings and any embedding scale included);
- ``attn_out``: what the attention block adds to the residual (after any post-attention norm);
- ``mlp_in``: the MLP's input, i.e. the output of the pre-MLP norm (what a transcoder reads);
- ``mlp_out``: what the MLP block adds to the residual (after any post-MLP norm; what a transcoder predicts);
- ``resid_post``: the residual stream leaving layer ``l``.

Model-wide points: ``resid_final`` (the residual entering the final norm) and ``final_norm`` (its output,
which the unembedding reads).

Controls: attention patterns and normalisation denominators can be recorded on a clean run and replayed as
constants (so gradients flow only through values and the numerators of norms), on the whole input or, by
causality exactly, on a prefix of it; and any point can be observed or rewritten by a function. Attention
runs through a function registered in transformers' attention registry under the name ``circuitmap``;
everything else uses ordinary module hooks.

Devices: a model placed by a device map (``load_model(..., device_map=...)``) runs each module on its own
device through accelerate's hooks, and an offloaded module keeps its weights in CPU memory (its parameters on
the meta device) between calls. A hook function sees, and returns, tensors on the device where the module it
is installed on computes (``execution_device``); the norm controls read weights through ``resident_tensor``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from circuitmap.errors import CircuitmapError
from circuitmap.models.adapters import Adapter, get_module

ATTENTION_IMPLEMENTATION = "circuitmap"
LAYER_POINTS = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
MODEL_POINTS = ("resid_final", "final_norm")

TensorFn = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class _AttentionControl:
    """Per-attention-module state: record the pattern of the next call, or replay a recorded one (its first
    ``prefix`` positions when set)."""

    mode: str = "record"
    pattern: torch.Tensor | None = None
    prefix: int | None = None


_attention_controls: dict[int, _AttentionControl] = {}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32; float32 and float64 keep their precision."""
    return torch.promote_types(dtype, torch.float32)


def circuitmap_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager scaled dot-product attention whose softmax pattern can be recorded and replayed as a constant."""
    if getattr(module, "sinks", None) is not None:
        raise CircuitmapError("attention sinks are not supported by circuitmap's attention function")
    batch, heads, length, width = query.shape
    kv_heads = key.shape[1]
    n_rep = heads // kv_heads
    control = _attention_controls.get(id(module))
    if control is not None and control.mode == "replay" and not (dropout and module.training):
        return _replayed_attention(control, value, heads)
    # Grouped-query attention without copying keys and values: the n_rep query heads that share a key head
    # are stacked along the sequence axis, so one batched product serves them all.
    grouped_query = query.reshape(batch, kv_heads, n_rep * length, width)
    if scaling is None:
        scaling = width**-0.5
    scores = torch.matmul(grouped_query, key.transpose(2, 3)).view(batch, heads, length, -1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=_compute_dtype(query.dtype)).to(query.dtype)
    if control is not None:
        pattern = _apply_attention_control(control, pattern)
    if dropout and module.training:
        pattern = nn.functional.dropout(pattern, p=dropout)
    grouped_pattern = pattern.reshape(batch, kv_heads, n_rep * length, -1)
    output = torch.matmul(grouped_pattern, value).view(batch, heads, length, width)
    output = output.transpose(1, 2).contiguous()
    return output, pattern


def _apply_attention_control(control: _AttentionControl, pattern: torch.Tensor) -> torch.Tensor:
    if control.mode == "record":
        control.pattern = pattern.detach()
        return pattern
    recorded = _recorded_pattern(control, pattern.shape[-2])
    return recorded.expand(pattern.shape[0], *recorded.shape[1:]).to(pattern.dtype)


def _recorded_pattern(control: _AttentionControl, length: int) -> torch.Tensor:
    """The recorded pattern [1, heads, n, n] for an input of ``length`` positions: all of it, or its first
    ``control.prefix`` positions; an error for any other length."""
    recorded = control.pattern
    if control.prefix is not None:
        recorded = recorded[:, :, : control.prefix, : control.prefix]
    if recorded.shape[-1] != length:
        raise CircuitmapError(
            f"frozen attention was recorded for {recorded.shape[-1]} tokens but the model now sees "
            f"{length}; freeze again for the new input"
        )
    return recorded


def _replayed_attention(control: _AttentionControl, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Head outputs [B, n, heads, width] under a replayed pattern, without computing scores.

    The pattern is the same for every batch element, so all heads are one batched product: each head's [n, n]
    pattern times the values of all batch elements side by side ([n, B·width]). The pattern is read where it
    was recorded, never copied: on a prefix it is a strided view of the whole prompt's pattern, which the
    product reads in place and which the backward pass keeps at no cost (a copy would be kept by every graph
    built on a prefix, the patterns' size each time). The values, much smaller, are repeated for the query
    heads that share them.
    """
    batch, kv_heads, length, width = value.shape
    recorded = _recorded_pattern(control, length)
    pattern = recorded[0].to(value.dtype)
    columns = value.permute(1, 2, 0, 3).reshape(kv_heads, 1, length, batch * width)
    columns = columns.expand(kv_heads, heads // kv_heads, length, batch * width).reshape(heads, length, -1)
    outputs = torch.bmm(pattern, columns)
    output = outputs.view(heads, length, batch, width).permute(2, 1, 0, 3).contiguous()
    return output, recorded.expand(batch, *recorded.shape[1:]).to(value.dtype)


def register_attention() -> None:
    """Register circuitmap's attention function and its (eager, additive) mask with transformers."""
    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, circuitmap_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)


def _accelerate_hooks(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` itself (several when they are chained)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: on a model dispatched by accelerate, the execution device of the first
    accelerate hook on it or on a module inside it (an offloaded module's parameters wait on the meta device);
    otherwise the device of its first parameter or buffer; None for a module that has neither."""
    for part in module.modules():
        for hook in _accelerate_hooks(part):
            device = getattr(hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return None if tensor is None else tensor.device


def resident_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s parameter or buffer ``name`` (None when it has none) with its values: a tensor that
    accelerate offloaded (on the meta device between calls) is read from the offloading hook's weights, on the
    device they are kept on."""
    tensor = getattr(module, name, None)
    if tensor is None or tensor.device.type != "meta":
        return tensor
    for hook in _accelerate_hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None:
            with contextlib.suppress(KeyError):
                return weights[name]
    raise CircuitmapError(f"the {name} of a {type(module).__name__} is on the meta device, with no values")


def _first_tensor(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, tensor: torch.Tensor):
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


def hook_input(
    module: nn.Module, fn: TensorFn, name: str = "hidden_states", device: torch.device | None = None
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn`` on a module's first input, moved to ``device`` when given; a returned tensor replaces that
    input. The input of a module may come from another device (accelerate's own hook moves it only after this
    one runs); a moved input is passed on, so it crosses devices once."""

    def pre_hook(_module, args, kwargs):
        from_kwargs = not args
        arrived = kwargs[name] if from_kwargs else args[0]
        tensor = arrived if device is None else arrived.to(device)
        new = fn(tensor)
        if new is None:
            if tensor is arrived:
                return None
            new = tensor
        if from_kwargs:
            return args, {**kwargs, name: new}
        return (new, *args[1:]), kwargs

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def hook_output(module: nn.Module, fn: TensorFn) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn`` on a module's output (its first element for tuples); a returned tensor replaces it."""

    def post_hook(_module, _args, output):
        new = fn(_first_tensor(output))
        return None if new is None else _replace_first(output, new)

    return module.register_forward_hook(post_hook)


class HookHandle:
    """Hooks installed on a model until ``remove()``; also a context manager that removes them on exit."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]):
        self._handles = handles

    def remove(self) -> None:
        """Take the hooks out (a second call does nothing)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def add_vector(
    resid: torch.Tensor, vector: torch.Tensor, positions: Sequence[int] | None, offset: int = 0
) -> torch.Tensor:
    """``resid`` ``[B, n, d]`` plus ``vector`` at ``positions`` (None: every position).

    Positions are absolute; ``offset`` is the position of the pass's first token (a KV-cached pass feeds a
    few tokens only): positions outside the pass are left alone, except in a pass from position 0, where a
    position beyond its end is an error. Negative positions count from the end of a pass from position 0.
    """
    delta = vector.to(device=resid.device, dtype=resid.dtype)
    if positions is None:
        return resid + delta
    n_tokens = resid.shape[1]
    local = []
    for position in positions:
        if offset == 0 and not -n_tokens <= position < n_tokens:
            raise CircuitmapError(f"position {position} is beyond the {n_tokens}-token input")
        here = position % n_tokens if offset == 0 else position - offset
        if 0 <= here < n_tokens:
            local.append(here)
    if not local:
        return resid
    resid = resid.clone()
    resid[:, local] += delta
    return resid


class HookPoints:
    """Resolves the adapter's paths on one model and installs hooks at named points."""

    def __init__(self, hf_model: nn.Module, adapter: Adapter):
        self.hf_model = hf_model
        self.adapter = adapter
        self.layers: nn.ModuleList = get_module(hf_model, adapter.layers)
        self.final_norm = get_module(hf_model, adapter.final_norm)

    def layer_module(self, layer: int, path: str) -> nn.Module:
        return get_module(self.layers[layer], path)

    def attention_modules(self) -> list[nn.Module]:
        return [self.layer_module(i, self.adapter.attn) for i in range(len(self.layers))]

    def norm_modules(self) -> list[nn.Module]:
        norms = [
            self.layer_module(i, p) for i in range(len(self.layers)) for p in self.adapter.residual_norms
        ]
        return [*norms, self.final_norm]

    def install(self, point: str, layer: int | None, fn: TensorFn) -> torch.utils.hooks.RemovableHandle:
        """Install ``fn`` at ``point`` (of ``layer`` for per-layer points)."""
        if point in MODEL_POINTS:
            if point == "resid_final":
                return hook_input(self.final_norm, fn, device=execution_device(self.final_norm))
            return hook_output(self.final_norm, fn)
        if point not in LAYER_POINTS:
            raise CircuitmapError(
                f"unknown hook point {point!r}; known: {', '.join(LAYER_POINTS + MODEL_POINTS)}"
            )
        if layer is None or not -len(self.layers) <= layer < len(self.layers):
            raise CircuitmapError(f"layer {layer} is out of range for a model with {len(self.layers)} layers")
        block = self.layers[layer]
        if point == "resid_pre":
            return hook_input(block, fn, device=execution_device(block))
        if point == "resid_post":
            return hook_output(block, fn)
        if point == "mlp_in":
            mlp = self.layer_module(layer, self.adapter.mlp)
            return hook_input(mlp, fn, device=execution_device(mlp))
        if point == "mlp_out":
            return hook_output(self.layer_module(layer, self.adapter.mlp_out), fn)
        return hook_output(self.layer_module(layer, self.adapter.attn_out), fn)


@dataclass
class _NormControl:
    """Per-norm state: record the inverse denominator of the next call, or replay a recorded one."""

    module: nn.Module
    weight_offset: float
    mode: str = "record"
    inverse: torch.Tensor | None = None
    prefix: int | None = None

    def __call__(self, _module, args, output):
        """Recompute the norm with the recorded scale, in at least float32 (some models round to float32), on
        the device its output is on (its input may still be on the previous module's)."""
        x = args[0].to(_first_tensor(output).device)
        work = x.to(_compute_dtype(x.dtype))
        is_layer_norm = isinstance(self.module, nn.LayerNorm)
        centred = work - work.mean(-1, keepdim=True) if is_layer_norm else work
        if self.mode == "record":
            eps = getattr(self.module, "variance_epsilon", None)
            if eps is None:
                eps = self.module.eps
            self.inverse = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + eps)
        inverse = self.inverse if self.prefix is None else self.inverse[:, : self.prefix]
        if inverse.shape[1:] != x.shape[1:-1] + (1,):
            raise CircuitmapError("frozen norms were recorded for another input length; freeze again")
        normed = centred * inverse.to(work.dtype)
        weight = resident_tensor(self.module, "weight").to(work) + self.weight_offset
        result = normed * weight
        bias = resident_tensor(self.module, "bias")
        if bias is not None:
            result = result + bias.to(work)
        return result.to(x.dtype)


@dataclass
class FrozenState:
    """Constants recorded on a clean run; active while the ``freeze`` context is open."""

    logits: torch.Tensor
    mlp_outputs: list[torch.Tensor] = field(default_factory=list)
    controls: list[_AttentionControl | _NormControl] = field(default_factory=list)

    @contextmanager
    def prefix(self, length: int) -> Iterator[None]:
        """Context: replay the constants of the first ``length`` positions, for inputs that are a prefix of
        the recorded one (by causality its patterns and norm scales are exactly those of the whole input)."""
        for control in self.controls:
            control.prefix = length
        try:
            yield
        finally:
            for control in self.controls:
                control.prefix = None


@contextmanager
def freeze(
    points: HookPoints,
    run: Callable[[], torch.Tensor],
    *,
    attention: bool = True,
    norms: bool = True,
    mlps: bool = False,
) -> Iterator[FrozenState]:
    """Record patterns, norm denominators (and MLP outputs) on ``run()``, then replay them as constants.

    Inside the context the model computes with the clean run's attention patterns and normalisation scales;
    with ``mlps=True`` every MLP block also returns its clean output, which makes the whole model affine in
    the residual stream.
    """
    with ExitStack() as stack:
        attention_controls: list[_AttentionControl] = []
        if attention:
            for module in points.attention_modules():
                control = _AttentionControl()
                _attention_controls[id(module)] = control
                attention_controls.append(control)
                stack.callback(_attention_controls.pop, id(module), None)
        norm_controls: list[_NormControl] = []
        if norms:
            for module in points.norm_modules():
                control = _NormControl(module, points.adapter.rms_weight_offset)
                stack.enter_context(module.register_forward_hook(control))
                norm_controls.append(control)
        mlp_outputs: list[torch.Tensor] = []
        recorders = (
            [
                points.install("mlp_out", layer, lambda t: mlp_outputs.append(t.detach()))
                for layer in range(len(points.layers))
            ]
            if mlps
            else []
        )
        with torch.no_grad():
            logits = run()
        for handle in recorders:
            handle.remove()
        for control in attention_controls + norm_controls:
            control.mode = "replay"
        if mlps:
            for layer, clean in enumerate(mlp_outputs):
                stack.enter_context(points.install("mlp_out", layer, _constant(clean)))
        yield FrozenState(logits, mlp_outputs, [*attention_controls, *norm_controls])


@contextmanager
def bypass(
    replacements: Sequence[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]],
) -> Iterator[None]:
    """Context: each module's computation is replaced by a cheap function of its first input (hooks on the
    module still run; on a model placed by accelerate its device hooks are skipped, so the function gets the
    input where it arrives). For passes whose values do not matter, only which tensors they depend on."""
    saved = []
    for module, function in replacements:
        saved.append((module, module.__dict__.get("forward")))
        module.forward = lambda *args, _function=function, **kwargs: _function(_first_input(args, kwargs))
    try:
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _constant(clean: torch.Tensor) -> TensorFn:
    def replace(current: torch.Tensor) -> torch.Tensor:
        return clean.expand_as(current).to(current.dtype)

    return replace

"""``Model``: a Hugging Face causal LM with its tokenizer, hook points and the controls circuitmap needs."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from circuitmap.errors import CircuitmapError
from circuitmap.models.adapters import Adapter, adapter_for, get_module
from circuitmap.models.generation import PositionCallback, generate_ids, sampling_generator, stop_ids
from circuitmap.models.hooks import (
    ATTENTION_IMPLEMENTATION,
    LAYER_POINTS,
    MODEL_POINTS,
    FrozenState,
    HookHandle,
    HookPoints,
    TensorFn,
    add_vector,
    execution_device,
    freeze,
    register_attention,
    resident_tensor,
)
from circuitmap.validation import check_text

Inputs = str | torch.Tensor


def _shallow_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its parameters, buffers and submodules, with its own table of
    submodules (replacing one in the copy leaves the original alone). An accelerate hook on ``module`` (a
    model placed by a device map) is attached to the copy afresh, since the hooked ``forward`` the copy
    inherits calls the original."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    hook = module.__dict__.get("_hf_hook")
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        for attribute in ("_hf_hook", "_old_forward", "forward"):
            twin.__dict__.pop(attribute, None)
        add_hook_to_module(twin, hook)
    return twin


def _copied_path(root: nn.Module, parts: Sequence[str]) -> list[nn.Module]:
    """The modules along ``parts`` below ``root``."""
    found, module = [], root
    for part in parts:
        module = module._modules[part]
        found.append(module)
    return found


class Model:
    """A causal LM ready for circuit tracing: tokenise, run, read and patch its internals."""

    def __init__(self, hf_model: nn.Module, tokenizer, name: str = "model"):
        register_attention()
        hf_model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
        hf_model.eval()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.adapter: Adapter = adapter_for(hf_model)
        self.points = HookPoints(hf_model, self.adapter)
        self._vocabulary: list[str] | None = None

    def __repr__(self) -> str:
        return (
            f"Model({self.name!r}, family={self.adapter.family}, layers={self.n_layers}, "
            f"d_model={self.d_model}, vocab={self.d_vocab}, dtype={self.dtype})"
        )

    @property
    def n_layers(self) -> int:
        return len(self.points.layers)

    def first_layers(self, n_layers: int) -> Model:
        """This model cut after its first ``n_layers`` layers, every weight shared: its final norm reads the
        residual entering layer ``n_layers``, so a read-out of that residual (a ``Direction`` target) is
        computed by exactly the layers it depends on. The model itself is left as it is."""
        if not 1 <= n_layers <= self.n_layers:
            raise CircuitmapError(f"a model can be cut after 1..{self.n_layers} layers, not {n_layers}")
        cut = _shallow_module(self.hf_model)
        *parents, name = self.adapter.layers.split(".")
        holder = cut
        for part in parents:
            holder._modules[part] = _shallow_module(holder._modules[part])
            holder = holder._modules[part]
        holder._modules[name] = nn.ModuleList(list(holder._modules[name])[:n_layers])
        config = copy.deepcopy(self.hf_model.config)
        text_config = config.get_text_config()
        text_config.num_hidden_layers = n_layers
        for key in ("n_layer", "num_layers"):
            if hasattr(text_config, key) and isinstance(getattr(text_config, key), int):
                setattr(text_config, key, n_layers)
        if isinstance(getattr(text_config, "layer_types", None), list):
            text_config.layer_types = text_config.layer_types[:n_layers]
        for module in [cut, *_copied_path(cut, parents)]:
            if hasattr(module, "config"):
                module.config = text_config if module is not cut else config
        return Model(cut, self.tokenizer, name=f"{self.name} (first {n_layers} layers)")

    @property
    def d_model(self) -> int:
        return self.hf_model.config.get_text_config().hidden_size

    @property
    def d_vocab(self) -> int:
        return self.unembedding.shape[0]

    @property
    def device(self) -> torch.device:
        """Where inputs go and outputs come back: the device the input embedding computes on."""
        return execution_device(self.hf_model.get_input_embeddings())

    def layer_device(self, layer: int) -> torch.device:
        """The device layer ``layer`` computes on, where hooks at its points see and return tensors (one
        device for all layers unless the model was loaded with a ``device_map``)."""
        return execution_device(self.points.layers[layer])

    def layer_devices(self) -> list[torch.device]:
        """``layer_device`` of every layer, in order."""
        return [self.layer_device(layer) for layer in range(self.n_layers)]

    @property
    def dispatched(self) -> bool:
        """Whether accelerate runs the model over a device map (``load_model(..., device_map=...)``)."""
        return hasattr(self.hf_model, "_hf_hook")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def unembedding(self) -> torch.Tensor:
        """The unembedding matrix, ``d_vocab × d_model`` (rows are output-token directions); where a device
        map offloads it, the copy its offloading keeps."""
        return resident_tensor(get_module(self.hf_model, self.adapter.unembed), "weight")

    @property
    def unembedding_bias(self) -> torch.Tensor | None:
        return resident_tensor(get_module(self.hf_model, self.adapter.unembed), "bias")

    @property
    def logit_softcap(self) -> float | None:
        """Final logit soft-capping (Gemma 2/3), applied as ``cap · tanh(logits / cap)``; None elsewhere."""
        return getattr(self.hf_model.config.get_text_config(), "final_logit_softcapping", None)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Model:
        """Move and/or cast the model; a model placed by a device map stays as it was loaded."""
        if self.dispatched:
            raise CircuitmapError("a model loaded with a device_map cannot be moved or cast; load it again")
        self.hf_model.to(device=device, dtype=dtype)
        return self

    @property
    def context_length(self) -> int | None:
        """The most tokens the model reads at once (its position embeddings or rotary table), if it says."""
        return getattr(self.hf_model.config.get_text_config(), "max_position_embeddings", None)

    def check_length(self, n_tokens: int, what: str = "the prompt") -> None:
        """A one-line error when ``n_tokens`` tokens exceed the model's context."""
        context = self.context_length
        if context is not None and n_tokens > context:
            raise CircuitmapError(f"{what} has {n_tokens:,} tokens but the model's context is {context:,}")

    def encode(self, text: Inputs) -> torch.Tensor:
        """Token ids ``[1, T]``, special tokens added as the tokenizer does by default; ids pass through.
        Text must be valid and not empty, and no longer than the model's context."""
        if isinstance(text, torch.Tensor):
            ids = text if text.ndim == 2 else text.unsqueeze(0)
            self.check_length(ids.shape[-1], "the input")
        else:
            check_text("the prompt", text)
            ids = self.tokenizer(text, return_tensors="pt").input_ids
            self.check_length(ids.shape[-1])
        return ids.to(self.device)

    def decode_after(self, ids: torch.Tensor, new_ids: Sequence[int] | torch.Tensor) -> str:
        """Text that ``new_ids`` add after ``ids``, leading space included.

        Decoding in context matters: SentencePiece-style decoders drop the leading space of a sequence's
        first token, and byte-fallback tokens only form characters together.
        """
        prefix = [int(i) for i in ids.reshape(-1)]
        new = [int(i) for i in torch.as_tensor(new_ids).reshape(-1)]
        base = self.tokenizer.decode(prefix, skip_special_tokens=True)
        full = self.tokenizer.decode(prefix + new, skip_special_tokens=True)
        return (
            full[len(base) :]
            if full.startswith(base)
            else self.tokenizer.decode(new, skip_special_tokens=True)
        )

    def token_strings(self, ids: torch.Tensor) -> list[str]:
        """The text of each token of the sequence ``ids``, as it reads there: what it adds to the decoded
        text of the tokens before it (SentencePiece drops a token's leading space when decoded alone)."""
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1)]
        strings, before = [], ""
        for n in range(1, len(ids) + 1):
            text = self.tokenizer.decode(ids[:n])
            strings.append(
                text[len(before) :] if text.startswith(before) else self.tokenizer.decode(ids[n - 1 : n])
            )
            before = text
        return strings

    def token_text(self, token: int) -> str:
        """The text of vocabulary entry ``token`` as it reads after another token (its leading space kept)."""
        return self.vocabulary()[token]

    def vocabulary(self) -> list[str]:
        """The text of every vocabulary entry as it reads after another token: what it adds to the decoded
        text of a one-letter token (decoding it alone loses a SentencePiece token's leading space)."""
        if self._vocabulary is None:
            anchor = self.tokenizer("a", add_special_tokens=False).input_ids[-1:]
            before = self.tokenizer.decode(anchor)
            pairs = self.tokenizer.batch_decode([[*anchor, token] for token in range(self.d_vocab)])
            self._vocabulary = [
                pair[len(before) :] if pair.startswith(before) else self.tokenizer.decode([token])
                for token, pair in enumerate(pairs)
            ]
        return self._vocabulary

    def logits(self, inputs: Inputs) -> torch.Tensor:
        """Logits ``[batch, T, d_vocab]`` for text or ids."""
        with torch.no_grad():
            return self.hf_model(input_ids=self.encode(inputs), use_cache=False).logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids`` with gradients enabled (for attribution and tests)."""
        return self.hf_model(input_ids=input_ids, use_cache=False).logits

    def top_tokens(self, ids: torch.Tensor, logits: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` most likely tokens after ``ids`` under next-token ``logits`` ``[vocab]``, with their
        probabilities (computed in float64), each decoded in context."""
        probs = logits.detach().double().softmax(-1)
        values, indices = probs.topk(min(k, probs.numel()))
        return [
            (self.decode_after(ids, [i]), float(p)) for i, p in zip(indices.tolist(), values, strict=True)
        ]

    def top_next_tokens(self, text: Inputs, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` most likely next tokens after ``text`` with their probabilities."""
        ids = self.encode(text)
        return self.top_tokens(ids, self.logits(ids)[0, -1], k)

    def generate(
        self,
        text: Inputs,
        max_new_tokens: int = 40,
        greedy: bool = True,
        temperature: float = 1.0,
        seed: int | None = None,
        *,
        before_forward: PositionCallback | None = None,
    ) -> str:
        """Continue ``text`` and return only the new text: greedy by default, else sampled at ``temperature``
        (seeded with ``seed``, on a private generator). ``before_forward(start)`` is called before each
        forward pass with the position of its first token (see ``circuitmap.models.generation``)."""
        ids = self.encode(text)
        self.check_length(ids.shape[1] + max_new_tokens, "the prompt with its continuation")
        generator = None if greedy else sampling_generator(self.device, seed)
        new = generate_ids(
            self.hf_model,
            ids,
            max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            generator=generator,
            stop=stop_ids(self.hf_model, self.tokenizer),
            before_forward=before_forward,
        )
        return self.decode_after(ids, new[0])

    def run_with_cache(
        self, inputs: Inputs, points: Sequence[str] = LAYER_POINTS + MODEL_POINTS
    ) -> tuple[torch.Tensor, dict[tuple[str, int | None], torch.Tensor]]:
        """Run once and return the logits and every requested point's activation.

        Keys are ``(point, layer)`` for per-layer points and ``(point, None)`` for model-wide ones.
        """
        with self.capturing(points) as cache:
            logits = self.logits(inputs)
        return logits, cache

    def activations(
        self, inputs: Inputs, points: Sequence[str]
    ) -> dict[tuple[str, int | None], torch.Tensor]:
        """Like ``run_with_cache`` but without the unembedding: runs only the base model (the module holding
        the layers), which saves the vocabulary-sized product when only internals are wanted."""
        base = get_module(self.hf_model, self.adapter.layers.rsplit(".", 1)[0])
        with self.capturing(points) as cache, torch.no_grad():
            base(input_ids=self.encode(inputs), use_cache=False)
        return cache

    @contextmanager
    def capturing(self, points: Sequence[str]) -> Iterator[dict[tuple[str, int | None], torch.Tensor]]:
        """Context: store a detached copy of every requested point's activation in the yielded dict (each
        forward pass replaces the previous pass's entries)."""
        cache: dict[tuple[str, int | None], torch.Tensor] = {}
        hooks = [
            (point, layer, _saver(cache, (point, layer)))
            for point in points
            for layer in ([None] if point in MODEL_POINTS else range(self.n_layers))
        ]
        with self.hooks(*hooks):
            yield cache

    def add_hooks(self, *hooks: tuple[str, int | None, TensorFn]) -> HookHandle:
        """Install ``(point, layer, fn)`` hooks until the returned handle's ``remove()``; ``fn`` may return a
        replacement tensor. ``hooks`` is the same as a context manager."""
        handles = []
        try:
            for point, layer, fn in hooks:
                handles.append(self.points.install(point, layer, fn))
        except BaseException:
            HookHandle(handles).remove()
            raise
        return HookHandle(handles)

    @contextmanager
    def hooks(self, *hooks: tuple[str, int | None, TensorFn]) -> Iterator[HookHandle]:
        """Context: ``add_hooks`` on entry, removed on exit."""
        with self.add_hooks(*hooks) as handle:
            yield handle

    def patch_mlp_output(self, layer: int, replacement: torch.Tensor | TensorFn) -> HookHandle:
        """Replace layer ``layer``'s MLP output by a tensor or by ``fn(clean_output)`` until the handle is
        removed (or, used with ``with``, inside the block)."""
        fn = replacement if callable(replacement) else (lambda current: replacement.expand_as(current))
        return self.add_hooks(("mlp_out", layer, fn))

    def add_to_residual(
        self,
        layer: int,
        vector: torch.Tensor,
        positions: Sequence[int] | None = None,
        point: str = "resid_pre",
    ) -> HookHandle:
        """Add ``vector`` to the residual at ``layer`` (all positions, or only ``positions``; negative ones
        count from the end of the input) until the handle is removed (or, used with ``with``, inside the
        block)."""
        if point not in ("resid_pre", "resid_post"):
            raise CircuitmapError(f"add_to_residual acts on resid_pre or resid_post, not {point!r}")
        return self.add_hooks((point, layer, lambda resid: add_vector(resid, vector, positions)))

    def freeze(
        self, inputs: Inputs, *, attention: bool = True, norms: bool = True, mlps: bool = False
    ) -> AbstractContextManager[FrozenState]:
        """Context: record the clean run on ``inputs`` and replay its attention patterns and norm scales.

        Inside, gradients flow only through attention values and norm numerators; with ``mlps=True`` MLP
        outputs are held at their clean values too, so the model is affine in the residual stream.
        """
        ids = self.encode(inputs)
        return freeze(self.points, lambda: self.forward(ids), attention=attention, norms=norms, mlps=mlps)


def _saver(cache: dict, key: tuple[str, int | None]) -> TensorFn:
    """A hook function that stores a detached copy of what it sees under ``key``."""

    def save(tensor: torch.Tensor) -> None:
        cache[key] = tensor.detach()

    return save

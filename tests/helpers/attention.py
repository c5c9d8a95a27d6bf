"""The frozen local replacement model rebuilt with hooks only, for the head-loading and QK tests.

``FrozenReplacement`` runs the model with attention patterns and norm scales (the residual norms, and the
per-head query/key norms of one chosen layer in families that have them) replayed from the clean run, and
each MLP output replaced by its transcoder-side constant plus the skip term of the current MLP input plus
any change asked for. Attention goes through a wrapper of circuitmap's attention function that records
queries and keys and may rewrite the head outputs: from an edited pattern (paths cut at chosen heads) or as
fixed tensors (heads held as nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from circuitmap.models.hooks import ATTENTION_IMPLEMENTATION, circuitmap_attention, register_attention

# (layer, pattern [1, H, T, T], value [1, KV, T, Dh], output [1, T, H, Dh]) -> new output or None
OutputEdit = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass
class Reading:
    """What one run of the oracle saw."""

    mlp_in: list[torch.Tensor]
    final_norm: torch.Tensor
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def score(self, layer: int, head: int, query_position: int, key_position: int) -> float:
        """``scaling · query · key`` of one head at one position pair, in float64."""
        query, key = self.queries[layer], self.keys[layer]
        group = head // (query.shape[1] // key.shape[1])
        product = query[0, head, query_position].double() @ key[0, group, key_position].double()
        return float(self.scaling[layer] * product)


class _HeadNormFreeze:
    """Replays the clean inverse RMS of a per-head query or key norm (recorded on its first call)."""

    def __init__(self, offset: float):
        self.offset, self.inverse = offset, None

    def __call__(self, module, args, _output):
        x = args[0]
        if self.inverse is None:
            eps = getattr(module, "variance_epsilon", None) or module.eps
            self.inverse = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + eps)
        return x * self.inverse * (module.weight + self.offset)


def diagonal_pattern(cut: Callable[[int, int], bool]) -> OutputEdit:
    """An edit that keeps only the diagonal of the pattern of the heads ``cut(layer, head)`` names: those
    heads no longer move anything between positions."""

    def edit(layer, pattern, value, _output):
        heads = pattern.shape[1]
        chosen = torch.tensor([cut(layer, head) for head in range(heads)])
        if not chosen.any():
            return None
        eye = torch.eye(pattern.shape[-1], dtype=torch.bool)
        edited = torch.where(chosen[:, None, None] & ~eye, torch.zeros_like(pattern[0]), pattern[0])
        values = value[0].repeat_interleave(heads // value.shape[1], dim=0)
        return (edited @ values).transpose(0, 1).unsqueeze(0)

    return edit


def fixed_outputs(outputs: dict[int, torch.Tensor]) -> OutputEdit:
    """An edit that replaces the head outputs of the layers in ``outputs`` by the given tensors."""

    def edit(layer, _pattern, _value, _output):
        return outputs.get(layer)

    return edit


class FrozenReplacement:
    """The frozen local replacement model of ``ids``; ``close()`` when done.

    The per-head query/key norms are frozen at layer ``head_norm_layer`` only (where a QK attribution reads
    them): elsewhere they act on queries and keys only, which frozen patterns make irrelevant, and the clean
    run that records the patterns must compute them as the model does (as ``attribute`` does)."""

    def __init__(self, model, transcoders, ids: torch.Tensor, head_norm_layer: int | None = None):
        self.model, self.transcoders, self.ids = model, transcoders, ids
        self.layer_of = {id(module): i for i, module in enumerate(model.points.attention_modules())}
        self.edit: OutputEdit | None = None
        self.reading: Reading | None = None
        attentions = model.points.attention_modules()
        self.handles = [
            getattr(attentions[head_norm_layer], name).register_forward_hook(
                _HeadNormFreeze(model.adapter.rms_weight_offset)
            )
            for name in ("q_norm", "k_norm")
            if head_norm_layer is not None and hasattr(attentions[head_norm_layer], name)
        ]
        ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, self._attention)
        self.frozen = model.freeze(ids)
        self.frozen.__enter__()
        _, cache = model.run_with_cache(ids, points=["mlp_in", "mlp_out", "resid_pre"])
        n = model.n_layers
        self.clean_in = [cache["mlp_in", layer][0] for layer in range(n)]
        self.clean_out = [cache["mlp_out", layer][0] for layer in range(n)]
        self.embed = cache["resid_pre", 0][0]
        self.acts = [transcoders.encode(layer, self.clean_in[layer]) for layer in range(n)]
        self.const = [self.clean_out[m] - transcoders.skip(m, self.clean_in[m]) for m in range(n)]
        self.clean = self.run()

    def close(self) -> None:
        self.frozen.__exit__(None, None, None)
        register_attention()
        for handle in self.handles:
            handle.remove()

    def _attention(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw
    ):
        output, pattern = circuitmap_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, softcap=softcap, **kw
        )
        layer = self.layer_of[id(module)]
        if self.reading is not None:
            self.reading.queries[layer], self.reading.keys[layer] = query.detach(), key.detach()
            self.reading.scaling[layer] = query.shape[-1] ** -0.5 if scaling is None else scaling
        if self.edit is not None:
            edited = self.edit(layer, pattern, value, output)
            output = output if edited is None else edited
        if self.reading is not None:
            self.reading.outputs[layer] = output.detach()
        return output, pattern

    def run(
        self,
        mlp_deltas: dict[int, torch.Tensor] | None = None,
        embed_delta: torch.Tensor | None = None,
        edit: OutputEdit | None = None,
    ) -> Reading:
        """One run of the replacement model with extra MLP outputs, a change of the embedding, an edit."""
        n = self.model.n_layers
        mlp_deltas = mlp_deltas or {}
        inputs: list[torch.Tensor | None] = [None] * n
        readouts = {}

        def keep_input(layer):
            def keep(x):
                inputs[layer] = x[0]

            return keep

        def replace_output(layer):
            def replace(out):
                new = (
                    self.const[layer] + self.transcoders.skip(layer, inputs[layer]) + mlp_deltas.get(layer, 0)
                )
                return new.unsqueeze(0).to(out.dtype)

            return replace

        def keep_final(x):
            readouts["final_norm"] = x[0]

        hooks = [("mlp_in", layer, keep_input(layer)) for layer in range(n)]
        hooks += [("mlp_out", layer, replace_output(layer)) for layer in range(n)]
        hooks.append(("final_norm", None, keep_final))
        if embed_delta is not None:
            hooks.append(("resid_pre", 0, lambda x: x + embed_delta))
        self.reading = Reading(mlp_in=inputs, final_norm=torch.empty(0))
        self.edit = edit
        try:
            with self.model.hooks(*hooks), torch.no_grad():
                self.model.forward(self.ids)
        finally:
            self.edit = None
        reading, self.reading = self.reading, None
        reading.final_norm = readouts["final_norm"]
        return reading

    def feature_deltas(self, layer: int, position: int, index: int) -> dict[int, torch.Tensor]:
        """MLP-output changes that add a feature's output once more (every layer it writes to)."""
        deltas = {}
        for out_layer in self.transcoders.output_layers(layer):
            delta = torch.zeros_like(self.embed)
            vector = self.transcoders.decoder_vectors(layer, torch.tensor([index]), out_layer)[0]
            delta[position] = self.acts[layer][position, index] * vector
            deltas[out_layer] = delta
        return deltas

    def error_deltas(self, layer: int, position: int) -> dict[int, torch.Tensor]:
        """The MLP-output change that adds an error node's output (every active feature kept) once more."""
        acts = [a if i <= layer else None for i, a in enumerate(self.acts)]
        error = self.const[layer] - self.transcoders.decode(acts, layer)
        delta = torch.zeros_like(self.embed)
        delta[position] = error[position]
        return {layer: delta}

    def token_delta(self, position: int) -> torch.Tensor:
        """The embedding change that adds one token's embedding once more."""
        delta = torch.zeros_like(self.embed)
        delta[position] = self.embed[position]
        return delta


def model_scores(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """The queries, keys and scaling of every layer in a plain run of the model (nothing frozen)."""
    layer_of = {id(module): i for i, module in enumerate(model.points.attention_modules())}
    seen = {}

    def attention(module, query, key, value, attention_mask, scaling=None, **kw):
        seen[layer_of[id(module)]] = (
            query.detach(),
            key.detach(),
            query.shape[-1] ** -0.5 if scaling is None else scaling,
        )
        return circuitmap_attention(module, query, key, value, attention_mask, scaling=scaling, **kw)

    ALL_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, attention)
    try:
        model.logits(ids)
    finally:
        register_attention()
    return seen

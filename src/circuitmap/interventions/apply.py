"""Hook functions that apply resolved edits while the model runs.

Every MLP output ``m`` receives, for each edited feature of a layer ``l`` whose features write to ``m`` (only
``l`` itself for per-layer transcoders, every ``m ≥ l`` for cross-layer ones), ``(new − old) × decoder``:
``old`` is the feature's activation computed from the current MLP input (open loop) or its clean activation
(constrained), ``new`` the edited one. In open-loop mode the rest of the MLP output is the real MLP's; in
constrained mode it is the clean output plus the skip term's change, which is the local replacement model the
graph describes. Positions are absolute: ``offset`` shifts them when a KV cache feeds one token at a time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuitmap.interventions.edits import ResidualEdit, ResolvedFeatureEdit
from circuitmap.transcoders import Transcoders


@dataclass
class CleanRun:
    """The clean run's MLP inputs and outputs [T, d] and feature activations [T, f], per layer, and the final
    norm's output at the last position [d]."""

    mlp_in: list[torch.Tensor]
    mlp_out: list[torch.Tensor]
    pre: list[torch.Tensor]
    acts: list[torch.Tensor]
    readout: torch.Tensor


class EditHooks:
    """Applies feature and residual edits; with ``record``, keeps every layer's pre-activations and
    activations (edits included) and the final norm's last-position output of the last forward pass. In
    constrained mode the recorded activations are the ones the run used: clean, or edited."""

    def __init__(
        self,
        transcoders: Transcoders,
        feature_edits: Sequence[ResolvedFeatureEdit],
        residual_edits: Sequence[ResidualEdit],
        *,
        constrained: CleanRun | None = None,
        record: bool = False,
    ):
        self.transcoders = transcoders
        self.constrained = constrained
        self.record = record
        self.offset = 0
        self.by_layer: dict[int, list[ResolvedFeatureEdit]] = defaultdict(list)
        for edit in feature_edits:
            self.by_layer[edit.layer].append(edit)
        self.residual_edits = list(residual_edits)
        self.inputs: dict[int, torch.Tensor] = {}
        self.pending: dict[int, torch.Tensor] = {}
        self.pre: list[torch.Tensor | None] = [None] * transcoders.n_layers
        self.acts: list[torch.Tensor | None] = [None] * transcoders.n_layers
        self.readout: torch.Tensor | None = None

    def hooks(self) -> list[tuple]:
        """``(point, layer, fn)`` triples for ``Model.hooks``."""
        hooks = [(edit.point, edit.layer, self._residual(edit)) for edit in self.residual_edits]
        for layer in range(self.transcoders.n_layers):
            hooks += [("mlp_in", layer, self._keep_input(layer)), ("mlp_out", layer, self._output(layer))]
        if self.record:
            hooks.append(("final_norm", None, self._keep_readout))
        return hooks

    def _keep_readout(self, normed: torch.Tensor) -> None:
        self.readout = normed.detach()[0, -1]

    def _local(self, position: int | None, n_local: int) -> slice | int | None:
        """Where an absolute position falls in the current chunk: a slice for every position, an index, or
        None when it is outside the chunk."""
        if position is None:
            return slice(None)
        local = position - self.offset
        return local if 0 <= local < n_local else None

    def _residual(self, edit: ResidualEdit):
        def add(resid: torch.Tensor) -> torch.Tensor:
            vector = edit.vector.to(device=resid.device, dtype=resid.dtype)
            if edit.positions is None:
                return resid + vector
            local = [p - self.offset for p in edit.positions if 0 <= p - self.offset < resid.shape[1]]
            if not local:
                return resid
            resid = resid.clone()
            resid[:, local] += vector
            return resid

        return add

    def _keep_input(self, layer: int):
        def keep(x: torch.Tensor) -> None:
            if layer == 0:
                self.pending.clear()
            self.inputs[layer] = x

        return keep

    def _output(self, layer: int):
        def replace(output: torch.Tensor) -> torch.Tensor:
            x = self.inputs[layer]
            if layer in self.by_layer or self.record:
                self._edit_features(layer, x)
            if self.constrained is not None:
                clean_in = self.constrained.mlp_in[layer]
                change = self.transcoders.skip(layer, x) - self.transcoders.skip(layer, clean_in)
                output = self.constrained.mlp_out[layer].to(output.dtype) + change.to(output.dtype)
            extra = self.pending.pop(layer, None)
            return output if extra is None else output + extra.to(output.dtype)

        return replace

    def _edit_features(self, layer: int, x: torch.Tensor) -> None:
        """Encode the current MLP input, apply this layer's edits and queue their decoder outputs."""
        tc = self.transcoders
        pre = tc.pre_activations(layer, x)
        acts = tc.activate(layer, pre)
        old = acts if self.constrained is None else self.constrained.acts[layer].to(acts).expand_as(acts)
        new = old.clone()
        edited = torch.zeros_like(new, dtype=torch.bool)
        for edit in self.by_layer.get(layer, ()):
            where = self._local(edit.position, x.shape[1])
            if where is None:
                continue
            new[:, where, edit.index] = edit.apply(new[:, where, edit.index])
            edited[:, where, edit.index] = True
        indices = edited.any(1).any(0).nonzero(as_tuple=True)[0]
        if len(indices):
            delta = (new - old)[..., indices]
            for out_layer in tc.output_layers(layer):
                contribution = delta @ tc.decoder_vectors(layer, indices, out_layer)
                previous = self.pending.get(out_layer)
                self.pending[out_layer] = contribution if previous is None else previous + contribution
        if self.record:
            self.pre[layer] = pre.detach()[0].cpu()
            used = acts if self.constrained is None else old
            self.acts[layer] = torch.where(edited, new, used).detach()[0].cpu()

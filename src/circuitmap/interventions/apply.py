"""Edits in place on a model: hook functions that apply resolved edits while it runs, behind a handle.

Every MLP output ``m`` receives, for each edited feature of a layer ``l`` whose features write to ``m`` (only
``l`` itself for per-layer transcoders, every ``m ≥ l`` for cross-layer ones), ``(new − old) × decoder``:
``old`` is the feature's activation computed from the current MLP input (open loop) or its clean activation
(constrained), ``new`` the edited one. In open-loop mode the rest of the MLP output is the real MLP's; in
constrained mode it is the clean output plus the skip term's change, which is the local replacement model the
graph describes. Positions are absolute: ``offset`` shifts them when a KV cache feeds one token at a time.

``EditHandle`` keeps the hooks installed until ``remove()`` (or the end of a ``with`` block); ``intervene``,
``generate_with`` and the explorer all apply their edits through it.

On a model spread over several devices the hooks work on each layer's device: feature edits are computed
where the edited layer's transcoder is, and what they add comes to the device of the MLP output it reaches.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.interventions.edits import (
    Edit,
    FeatureEdit,
    ResidualEdit,
    ResolvedFeatureEdit,
    residual_edits,
    resolve_feature_edits,
)
from circuitmap.models import Model
from circuitmap.models.hooks import add_vector
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
    constrained mode the recorded activations are the ones the run used: clean, or edited. Without feature
    edits, recording or constraint, ``transcoders`` may be None and only the residual is touched."""

    def __init__(
        self,
        transcoders: Transcoders | None,
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
        n_layers = 0 if transcoders is None else transcoders.n_layers
        self.pre: list[torch.Tensor | None] = [None] * n_layers
        self.acts: list[torch.Tensor | None] = [None] * n_layers
        self.readout: torch.Tensor | None = None

    def hooks(self) -> list[tuple]:
        """``(point, layer, fn)`` triples for ``Model.add_hooks``."""
        hooks = [(edit.point, edit.layer, self._residual(edit)) for edit in self.residual_edits]
        if self.by_layer or self.record or self.constrained is not None:
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
            return add_vector(resid, edit.vector, edit.positions, self.offset)

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
                output = self.constrained.mlp_out[layer].to(output) + change.to(output)
            extra = self.pending.pop(layer, None)
            return output if extra is None else output + extra.to(output)

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
                self.pending[out_layer] = (
                    contribution if previous is None else previous + contribution.to(previous)
                )
        if self.record:
            self.pre[layer] = pre.detach()[0].cpu()
            used = acts if self.constrained is None else old
            self.acts[layer] = torch.where(edited, new, used).detach()[0].cpu()


class EditHandle:
    """Edits installed on a model until ``remove()``; also a context manager that removes them on exit.

    ``at_position(start)`` tells the edits where the next forward pass starts, for passes that feed only
    new tokens through a KV cache (``Model.generate(..., before_forward=handle.at_position)``). With
    recording on, ``recorded`` holds what the last pass saw (see ``EditHooks``)."""

    def __init__(self, model: Model, recorded: EditHooks):
        self.recorded = recorded
        self._hooks = model.add_hooks(*recorded.hooks())

    def at_position(self, start: int) -> None:
        self.recorded.offset = start

    def remove(self) -> None:
        self._hooks.remove()

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def clean_run(model: Model, transcoders: Transcoders, ids: torch.Tensor) -> tuple[torch.Tensor, CleanRun]:
    """The last position's logits and the clean run's MLP inputs, outputs, feature activations and
    read-out."""
    with model.capturing(["mlp_in", "mlp_out", "final_norm"]) as cache:
        logits = model.logits(ids)[0, -1]
    mlp_in = [cache["mlp_in", layer][0] for layer in range(model.n_layers)]
    mlp_out = [cache["mlp_out", layer][0] for layer in range(model.n_layers)]
    with torch.no_grad():
        pre = [transcoders.pre_activations(layer, x) for layer, x in enumerate(mlp_in)]
        acts = [transcoders.activate(layer, p) for layer, p in enumerate(pre)]
    return logits, CleanRun(mlp_in, mlp_out, pre, acts, cache["final_norm", None][0, -1])


def check_active(features: Sequence[ResolvedFeatureEdit], clean: CleanRun) -> None:
    """A clear error for an edit that needs an active feature (see ``needs_active``) but names an inactive
    one."""
    for edit in features:
        if edit.needs_active and clean.acts[edit.layer][edit.position, edit.index] == 0:
            raise CircuitmapError(
                f"feature {edit.source} is not active on this prompt (layer {edit.layer}, position "
                f"{edit.position}, index {edit.index}); only 'set' or 'add' on a (layer, position, index) "
                "can switch a feature on"
            )


def as_list(edits: Iterable[Edit] | Edit) -> list[Edit]:
    """One edit or any iterable of edits, as a list."""
    if isinstance(edits, (FeatureEdit, ResidualEdit)):
        return [edits]
    try:
        return list(edits)
    except TypeError:
        raise CircuitmapError(f"cannot apply {edits!r}: edits are FeatureEdit or ResidualEdit") from None


def prepare_edits(
    model: Model, transcoders: Transcoders | None, edits: list[Edit], ids: torch.Tensor | None
) -> tuple[list[ResolvedFeatureEdit], list[ResidualEdit]]:
    """Resolve the edits and check them against the model, the transcoders and the prompt's length (no
    prompt: positions must be absolute). Feature edits need the transcoders."""
    if ids is not None and ids.shape[0] != 1:
        raise CircuitmapError(f"interventions run one prompt at a time, got a batch of {ids.shape[0]}")
    n_tokens = None if ids is None else ids.shape[1]
    residual = residual_edits(edits, model.n_layers, model.d_model, n_tokens)
    if transcoders is None:
        if any(not isinstance(edit, ResidualEdit) for edit in edits):
            raise CircuitmapError("feature edits need the transcoder set whose features they name")
        return [], residual
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    features = resolve_feature_edits(edits, transcoders.n_layers, transcoders.d_features, n_tokens)
    largest = torch.finfo(model.dtype).max
    for edit in features:
        if abs(edit.value) > largest:
            raise CircuitmapError(
                f"the value {edit.value:g} of the edit of feature {edit.source} is beyond what "
                f"{str(model.dtype).removeprefix('torch.')} holds"
            )
    return features, residual


def patch_edits(
    model: Model,
    transcoders: Transcoders | None,
    edits: Sequence[Edit] | Edit,
    prompt: str | torch.Tensor | None = None,
) -> EditHandle:
    """Put ``edits`` in place on ``model``: every forward pass and generation runs with them until the
    returned handle's ``remove()``. ``apply_edits`` is the same as a context manager.

    With ``prompt``, positions are checked against it (negative ones count from its end) and a feature named
    by node id, or scaled, must be active on it; without, positions must be absolute. ``transcoders`` may be
    None when every edit is a ``ResidualEdit`` (steering vectors).
    """
    ids = None if prompt is None else model.encode(prompt)
    features, residual = prepare_edits(model, transcoders, as_list(edits), ids)
    if ids is not None and any(edit.needs_active for edit in features):
        check_active(features, clean_run(model, transcoders, ids)[1])
    return EditHandle(model, EditHooks(transcoders, features, residual))


@contextmanager
def apply_edits(
    model: Model,
    transcoders: Transcoders | None,
    edits: Sequence[Edit] | Edit,
    prompt: str | torch.Tensor | None = None,
) -> Iterator[EditHandle]:
    """Context: ``patch_edits`` on entry, the edits removed on exit."""
    with patch_edits(model, transcoders, edits, prompt) as handle:
        yield handle

"""``intervene``: run a prompt with edited features or residual stream and compare with the clean run.

Two modes:

- ``open_loop`` (default): the real model runs, its MLPs and norms recomputed, so an edit's effect propagates
  through everything downstream; with ``freeze_attention`` the attention patterns are the clean run's.
- ``constrained``: attention patterns and norm scales frozen, every MLP output held at its clean value plus
  the edited features' decoder outputs and the skip term's change. The model is then the local replacement
  model of the attribution graph, whose edges predict the result exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from circuitmap.attribution.targets import token_id
from circuitmap.errors import CircuitmapError
from circuitmap.interventions.apply import (
    EditHandle,
    EditHooks,
    as_list,
    check_active,
    clean_run,
    prepare_edits,
)
from circuitmap.interventions.edits import Edit
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders

MODES = ("open_loop", "constrained")
SHOWN_EDITS = 8


@dataclass
class TokenChange:
    """A token's logit and probability at the last position, before and after the edits."""

    token: str
    token_id: int
    logit_before: float
    logit_after: float
    prob_before: float
    prob_after: float


@dataclass
class InterventionResult:
    """The clean and edited runs of one prompt.

    ``logits_before``/``logits_after`` [vocab] are the last position's logits (as the model outputs them,
    soft-capped where it caps); ``readout_*`` [d_model] the final norm's output there in float64, which the
    unembedding reads (the graph's logit targets are read from it before any capping); ``activations_*`` and
    ``pre_activations_*`` hold one [T, d_features] tensor per layer (after the edits, the edited features show
    their new values); ``targets`` the requested tokens' changes; ``top_before``/``top_after`` the most
    likely next tokens with their probabilities.
    """

    prompt: str
    token_strings: list[str]
    mode: str
    edits: list[str]
    logits_before: torch.Tensor
    logits_after: torch.Tensor
    readout_before: torch.Tensor
    readout_after: torch.Tensor
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]
    targets: list[TokenChange]
    pre_activations_before: list[torch.Tensor]
    pre_activations_after: list[torch.Tensor]
    activations_before: list[torch.Tensor]
    activations_after: list[torch.Tensor]

    def activation(self, layer: int, position: int, index: int) -> tuple[float, float]:
        """A feature's activation before and after."""
        return (
            float(self.activations_before[layer][position, index]),
            float(self.activations_after[layer][position, index]),
        )

    def feature_changes(self, count: int = 10) -> list[tuple[int, int, int, float, float]]:
        """The ``count`` features whose activation changed most, as ``(layer, position, index, before,
        after)``."""
        changes = []
        for layer, (before, after) in enumerate(
            zip(self.activations_before, self.activations_after, strict=True)
        ):
            diff = (after - before).abs().reshape(-1)
            top = diff.topk(min(count, diff.numel()))
            for value, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if value > 0:
                    position, index = divmod(flat, before.shape[1])
                    changes.append((value, layer, position, index))
        changes.sort(key=lambda change: -change[0])
        return [
            (layer, position, index, *self.activation(layer, position, index))
            for _, layer, position, index in changes[:count]
        ]

    def summary(self) -> str:
        """A plain-text report: the edits, the target tokens and the top next tokens before and after."""
        lines = [f"prompt: {self.prompt!r} ({self.mode.replace('_', '-')})"]
        lines += [f"edit: {edit}" for edit in self.edits[:SHOWN_EDITS]]
        if len(self.edits) > SHOWN_EDITS:
            lines.append(f"… and {len(self.edits) - SHOWN_EDITS} more edits")
        lines.append(f"{'token':<20} {'logit before':>13} {'after':>9} {'prob before':>12} {'after':>8}")
        for t in self.targets:
            lines.append(
                f"{t.token!r:<20} {t.logit_before:>13.3f} {t.logit_after:>9.3f} "
                f"{t.prob_before:>12.4f} {t.prob_after:>8.4f}"
            )
        lines.append(f"{'top before':<31} top after")
        for (tb, pb), (ta, pa) in zip(self.top_before, self.top_after, strict=True):
            lines.append(f"{tb!r:<20} {pb:>8.4f}   {ta!r:<20} {pa:>8.4f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """In a notebook: the edits, targets, top tokens and feature changes as HTML tables."""
        from circuitmap.notebook import intervention_html

        return intervention_html(self)

    def as_json(self) -> dict:
        """The result without the activation tensors, as plain JSON types."""
        return {
            "prompt": self.prompt,
            "mode": self.mode,
            "edits": self.edits,
            "top_before": [[token, prob] for token, prob in self.top_before],
            "top_after": [[token, prob] for token, prob in self.top_after],
            "targets": [vars(target) for target in self.targets],
            "feature_changes": [
                {"layer": layer, "position": p, "index": i, "before": b, "after": a}
                for layer, p, i, b, a in self.feature_changes()
            ],
        }


def intervene(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    edits: Sequence[Edit] | Edit,
    *,
    mode: str = "open_loop",
    freeze_attention: bool = True,
    targets: Sequence[str | int] | None = None,
    top_k: int = 10,
) -> InterventionResult:
    """Run ``prompt`` with ``edits`` and report what changed at the last position.

    ``targets``: tokens whose logits to report (default: the most likely token before and after).
    ``freeze_attention`` (open loop only): replay the clean run's attention patterns. In constrained mode the
    clean run itself is computed inside the freeze, so that both runs share its arithmetic exactly.
    """
    if mode not in MODES:
        raise CircuitmapError(f"unknown mode {mode!r}; use open_loop or constrained")
    if mode == "constrained" and not freeze_attention:
        raise CircuitmapError("constrained mode always freezes attention; use open_loop to recompute it")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise CircuitmapError(f"top_k must be a positive whole number, got {top_k!r}")
    ids = model.encode(prompt)
    edit_list = as_list(edits)
    features, residual = prepare_edits(model, transcoders, edit_list, ids)
    constrained = mode == "constrained"
    with ExitStack() as stack:
        if not constrained:
            logits_before, clean = clean_run(model, transcoders, ids)
        if constrained or freeze_attention:
            stack.enter_context(model.freeze(ids, attention=True, norms=constrained))
        if constrained:
            logits_before, clean = clean_run(model, transcoders, ids)
        check_active(features, clean)
        recorded = EditHooks(
            transcoders, features, residual, constrained=clean if constrained else None, record=True
        )
        stack.enter_context(EditHandle(model, recorded))
        logits_after = model.logits(ids)[0, -1]
    if not bool(torch.isfinite(logits_after).all()):
        raise CircuitmapError("the edits make the model's output NaN or infinite: try a smaller value")
    return _result(
        model,
        ids,
        prompt,
        mode,
        [edit.describe() for edit in edit_list],
        logits_before,
        logits_after,
        clean,
        recorded,
        targets,
        top_k,
    )


def _result(model, ids, prompt, mode, edits, logits_before, logits_after, clean, recorded, targets, top_k):
    if targets is None:
        target_ids = list(dict.fromkeys([int(logits_before.argmax()), int(logits_after.argmax())]))
    else:
        target_ids = [token_id(model, t) for t in ([targets] if isinstance(targets, (str, int)) else targets)]
    before, after = logits_before.double().cpu(), logits_after.double().cpu()
    p_before, p_after = before.softmax(-1), after.softmax(-1)
    changes = [
        TokenChange(
            model.decode_after(ids, [i]),
            i,
            float(before[i]),
            float(after[i]),
            float(p_before[i]),
            float(p_after[i]),
        )
        for i in target_ids
    ]
    return InterventionResult(
        prompt=prompt if isinstance(prompt, str) else model.tokenizer.decode(ids[0].tolist()),
        token_strings=model.token_strings(ids),
        mode=mode,
        edits=edits,
        logits_before=_kept(logits_before),
        logits_after=_kept(logits_after),
        readout_before=clean.readout.detach().cpu().double(),
        readout_after=recorded.readout.detach().cpu().double(),
        top_before=model.top_tokens(ids, logits_before, top_k),
        top_after=model.top_tokens(ids, logits_after, top_k),
        targets=changes,
        pre_activations_before=[_kept(p) for p in clean.pre],
        pre_activations_after=[_kept(p) for p in recorded.pre],
        activations_before=[_kept(a) for a in clean.acts],
        activations_after=[_kept(a) for a in recorded.acts],
    )


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy for the result, half precision promoted to float32."""
    return tensor.detach().cpu().to(torch.promote_types(tensor.dtype, torch.float32))

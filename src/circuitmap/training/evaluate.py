"""Quality of a transcoder set on held-out text: per-layer FVU, L0 and dead features, and the spliced model.

FVU, L0 and dead fractions are measured on every position but the first (as in training). The spliced
model replaces every MLP's output by its transcoders' reconstruction at once; the increase of the mean
next-token loss and the mean KL divergence from the original next-token distribution say how much of the
model's behaviour the replacement keeps.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.training.data import CorpusContexts
from circuitmap.transcoders import Transcoders

EVAL_CONTEXT_LENGTH = 128
"""Tokens per context (BOS included) when a corpus is measured."""


@dataclass
class Evaluation:
    """Per-layer metrics and the spliced model's loss increase and KL divergence (nats per token)."""

    fvu: list[float]
    l0: list[float]
    dead_fraction: list[float]
    loss: float
    spliced_loss: float
    kl: float
    tokens: int

    def report(self) -> dict:
        """The machine-readable form: a list of per-layer records and the overall figures."""
        layers = [
            {"layer": layer, "fvu": fvu, "l0": l0, "dead_fraction": dead}
            for layer, (fvu, l0, dead) in enumerate(zip(self.fvu, self.l0, self.dead_fraction, strict=True))
        ]
        n = len(layers)
        return {
            "layers": layers,
            "mean_fvu": sum(self.fvu) / n,
            "mean_l0": sum(self.l0) / n,
            "mean_dead_fraction": sum(self.dead_fraction) / n,
            "ce_loss": self.loss,
            "ce_loss_spliced": self.spliced_loss,
            "ce_loss_increase": self.spliced_loss - self.loss,
            "kl": self.kl,
            "tokens": self.tokens,
        }


def _next_token_losses(logits: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), contexts[:, 1:].flatten(), reduction="sum"
    )


def _replacement(reconstruction: torch.Tensor):
    def replace(output: torch.Tensor) -> torch.Tensor:
        return reconstruction.to(output.dtype)

    return replace


def evaluate_transcoders(
    model: Model,
    transcoders: Transcoders,
    contexts: Iterable[torch.Tensor],
    *,
    n_tokens: int = 50_000,
    batch_size: int = 8,
) -> Evaluation:
    """Measure ``transcoders`` on up to ``n_tokens`` tokens of ``contexts`` (equal-length token id rows)."""
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.follow(model.layer_devices(), model.dtype)
    n_layers = model.n_layers
    residual = torch.zeros(n_layers, dtype=torch.float64)
    total = torch.zeros(n_layers, dtype=torch.float64)
    active = torch.zeros(n_layers, dtype=torch.float64)
    fired = torch.zeros(n_layers, transcoders.d_features, dtype=torch.bool)
    loss = spliced = kl = 0.0
    tokens = 0
    contexts = iter(contexts)
    while tokens < n_tokens:
        batch = [context for _, context in zip(range(batch_size), contexts, strict=False)]
        if not batch:
            break
        ids = torch.stack(batch).to(model.device)
        logits, cache = model.run_with_cache(ids, points=["mlp_in", "mlp_out"])
        inputs = [cache["mlp_in", layer] for layer in range(n_layers)]
        reconstructions = transcoders.reconstruct(inputs)
        for layer in range(n_layers):
            target = cache["mlp_out", layer][:, 1:].double()
            error = (target - reconstructions[layer][:, 1:].double()).pow(2).sum()
            residual[layer] += error.cpu()
            total[layer] += (target - target.mean(dim=(0, 1))).pow(2).sum().cpu()
            acts = transcoders.encode(layer, inputs[layer][:, 1:])
            active[layer] += (acts != 0).sum().double().cpu()
            fired[layer] |= (acts != 0).flatten(0, 1).any(0).cpu()
        hooks = [("mlp_out", layer, _replacement(reconstructions[layer])) for layer in range(n_layers)]
        with model.hooks(*hooks):
            spliced_logits = model.logits(ids)
        loss += float(_next_token_losses(logits, ids))
        spliced += float(_next_token_losses(spliced_logits, ids))
        original = logits[:, :-1].float().log_softmax(-1)
        replaced = spliced_logits[:, :-1].float().log_softmax(-1)
        kl += float((original.exp() * (original - replaced)).sum())
        tokens += ids[:, 1:].numel()
    if tokens == 0:
        raise CircuitmapError("the evaluation corpus is too small to fill a single context")
    return Evaluation(
        fvu=(residual / total.clamp_min(1e-30)).tolist(),
        l0=(active / tokens).tolist(),
        dead_fraction=(~fired).double().mean(1).tolist(),
        loss=loss / tokens,
        spliced_loss=spliced / tokens,
        kl=kl / tokens,
        tokens=tokens,
    )


def evaluate_corpus(
    model: Model,
    transcoders: Transcoders,
    sources: list[str],
    *,
    n_tokens: int = 50_000,
    text_field: str = "text",
    context_length: int = EVAL_CONTEXT_LENGTH,
) -> Evaluation:
    """``evaluate_transcoders`` on the first ``n_tokens`` tokens of corpus ``sources``, packed into
    contexts of ``context_length`` (or of the model's context, if shorter); a warning on stderr when the
    corpus holds fewer."""
    context_length = min(context_length, model.context_length or context_length)
    contexts = CorpusContexts.from_sources(model.tokenizer, sources, context_length, text_field)
    n_contexts = -(-n_tokens // (context_length - 1))
    evaluation = evaluate_transcoders(
        model, transcoders, contexts.heldout(0, n_contexts, n_contexts), n_tokens=n_tokens
    )
    if evaluation.tokens < n_tokens:
        print(
            f"circuitmap: warning: the corpus holds {evaluation.tokens:,} tokens, fewer than the "
            f"{n_tokens:,} requested; measured on what exists",
            file=sys.stderr,
        )
    return evaluation

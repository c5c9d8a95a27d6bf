"""The local replacement model for one prompt, built as a single autograd graph.

Inside ``model.freeze`` (attention patterns and norm scales replayed from the clean run) the model runs once
more with three changes made through hook points:

- the embedding output becomes a leaf tensor (the token nodes' outputs);
- each MLP output becomes ``clean output (a constant) + leaf`` plus, for skip transcoders, the skip term's
  gradient path ``W_skip · mlp_in`` (its value is already in the clean output); the zero leaf's gradient is
  the gradient at that MLP output, which every source written there is dotted with;
- MLP inputs and the read-out points (``resid_final``, ``final_norm``) are kept, to inject target vectors.

With those freezes the map from any node's output to any later MLP input or read-out is linear, so one
backward pass per batch of target rows yields exact direct effects.

On a model spread over several devices each hook works on its layer's device: the transcoders compute where
their layer's weights are, and their reconstruction and skip path come back to the layer's device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from circuitmap.models import Model
from circuitmap.models.hooks import FrozenState
from circuitmap.transcoders import Transcoders


@dataclass
class ReplacementRun:
    """Tensors of one replacement-model run. Per-layer lists have one entry per layer.

    ``embed`` [1, T, d] and ``leaves`` [1, T, d] are differentiable inputs; ``mlp_in`` and ``readouts`` are
    the graph tensors where targets are injected. ``pre``/``acts`` [T, f] hold feature pre-activations and
    activations, ``errors`` [T, d] the MLP output minus the transcoders' reconstruction (skip included), all
    detached. ``last_logits`` [vocab] are the model's last-position logits, soft-capped like its output;
    ``frozen`` holds the replayed constants, which stay in force while the run's context is open.
    Per-layer tensors are on their layer's device (``pre`` and ``acts`` on its transcoder's).
    """

    embed: torch.Tensor
    leaves: list[torch.Tensor]
    mlp_in: list[torch.Tensor]
    readouts: dict[str, torch.Tensor]
    pre: list[torch.Tensor]
    acts: list[torch.Tensor]
    errors: list[torch.Tensor]
    last_logits: torch.Tensor
    frozen: FrozenState


@contextmanager
def replacement_run(model: Model, transcoders: Transcoders, ids: torch.Tensor) -> Iterator[ReplacementRun]:
    """Build the replacement model's autograd graph for ``ids`` [1, T]; valid inside the context."""
    n_layers = model.n_layers
    embed: list[torch.Tensor] = []
    leaves: list[torch.Tensor] = []
    mlp_in: list[torch.Tensor] = []
    readouts: dict[str, torch.Tensor] = {}
    pre: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []
    errors: list[torch.Tensor] = []

    def embedding_leaf(hidden: torch.Tensor) -> torch.Tensor:
        leaf = hidden.detach().clone().requires_grad_(True)
        embed.append(leaf)
        return leaf

    def keep_mlp_input(hidden: torch.Tensor) -> None:
        mlp_in.append(hidden)

    def replace_mlp_output(layer: int):
        def replace(output: torch.Tensor) -> torch.Tensor:
            x = mlp_in[layer]
            clean_x = x.detach()[0]
            pre.append(transcoders.pre_activations(layer, clean_x))
            acts.append(transcoders.encode(layer, clean_x))
            skip = transcoders.skip(layer, clean_x)
            reconstruction = transcoders.decode(acts + [None] * (n_layers - layer - 1), layer) + skip
            errors.append(output.detach()[0] - reconstruction.to(output.device))
            leaf = torch.zeros_like(output).requires_grad_(True)
            leaves.append(leaf)
            result = output.detach() + leaf
            if transcoders.has_skip:
                skip_path = transcoders.skip(layer, x)
                result = result + (skip_path - skip_path.detach()).to(result.device)
            return result

        return replace

    def keep_readout(point: str):
        def keep(hidden: torch.Tensor) -> None:
            readouts[point] = hidden

        return keep

    hooks = [("resid_pre", 0, embedding_leaf)]
    for layer in range(n_layers):
        hooks += [("mlp_in", layer, keep_mlp_input), ("mlp_out", layer, replace_mlp_output(layer))]
    hooks += [
        ("resid_final", None, keep_readout("resid_final")),
        ("final_norm", None, keep_readout("final_norm")),
    ]
    with model.freeze(ids) as frozen, torch.enable_grad():
        with model.hooks(*hooks):
            logits = model.forward(ids).detach()[0, -1]
        yield ReplacementRun(embed[0], leaves, mlp_in, readouts, pre, acts, errors, logits, frozen)

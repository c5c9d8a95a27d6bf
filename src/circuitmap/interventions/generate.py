"""``generate_with``: continue a prompt while edits stay applied, on the prompt and on every new token.

It is ``Model.generate`` (the one generation loop, token by token through the KV cache) with the edits'
handle in place. The handle is told where each forward pass starts, so edits at prompt positions act once
(their effect persists in the cache) and edits at every position (``position=None``, residual edits without
positions) act on each generated token too. Attention is not frozen: generated positions have no clean
pattern to replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from circuitmap.interventions.apply import patch_edits
from circuitmap.interventions.edits import Edit
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders


def generate_with(
    model: Model,
    transcoders: Transcoders | None,
    prompt: str | torch.Tensor,
    edits: Sequence[Edit] | Edit,
    max_new_tokens: int = 40,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int | None = None,
) -> str:
    """The text ``prompt`` continues with under ``edits`` (greedy, or sampled at ``temperature``).
    ``transcoders`` may be None when every edit is a ``ResidualEdit``."""
    ids = model.encode(prompt)
    with patch_edits(model, transcoders, edits, ids) as handle:
        return model.generate(
            ids, max_new_tokens, greedy, temperature, seed, before_forward=handle.at_position
        )

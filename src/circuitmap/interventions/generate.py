"""``generate_with``: continue a prompt while edits stay applied, on the prompt and on every new token.

Generation feeds one token at a time through the model's KV cache; the edit hooks know each chunk's absolute
position, so edits at prompt positions act once (their effect persists in the cache) and edits at every
position (``position=None``, residual edits without positions) act on each generated token too. Attention is
not frozen: generated positions have no clean pattern to replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.interventions.apply import EditHooks
from circuitmap.interventions.edits import Edit
from circuitmap.interventions.intervene import as_list, check_active, clean_run, prepare_edits
from circuitmap.models import Model
from circuitmap.transcoders import Transcoders


def generate_with(
    model: Model,
    transcoders: Transcoders,
    prompt: str | torch.Tensor,
    edits: Sequence[Edit] | Edit,
    max_new_tokens: int = 40,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int | None = None,
) -> str:
    """The text ``prompt`` continues with under ``edits`` (greedy, or sampled at ``temperature``)."""
    if max_new_tokens < 1:
        raise CircuitmapError("max_new_tokens must be at least 1")
    if not greedy and not temperature > 0:
        raise CircuitmapError("temperature must be positive when sampling")
    ids = model.encode(prompt)
    edit_list = as_list(edits)
    features, residual = prepare_edits(model, transcoders, edit_list, ids)
    if any(edit.needs_active for edit in features):
        check_active(features, clean_run(model, transcoders, ids)[1])
    hooks = EditHooks(transcoders, features, residual)
    generator = None
    if not greedy:
        generator = torch.Generator(device=model.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    stop = _stop_ids(model)
    new: list[int] = []
    with model.hooks(*hooks.hooks()), torch.no_grad():
        output = model.hf_model(input_ids=ids, use_cache=True)
        for step in range(max_new_tokens):
            logits = output.logits[0, -1].float()
            if greedy:
                next_id = int(logits.argmax())
            else:
                probs = (logits / temperature).softmax(-1)
                next_id = int(torch.multinomial(probs, 1, generator=generator))
            new.append(next_id)
            if next_id in stop or step == max_new_tokens - 1:
                break
            hooks.offset = ids.shape[1] + step
            token = torch.tensor([[next_id]], device=ids.device)
            output = model.hf_model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
    return model.decode_after(ids, new)


def _stop_ids(model: Model) -> set[int]:
    """Token ids that end generation, as the model's generation config names them."""
    config = getattr(model.hf_model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

"""Chat prompts, batched answers and batched residual reads: the model runs persona vectors are made of.

- ``chat_ids``: a question (with an optional system prompt) through the model's chat template, ending where
  the assistant's answer begins;
- ``generate_answers``: the model's answers to many prompts, through the one generation loop
  (``circuitmap.models.generation``): prompts of equal length are batched together, so no padding is
  needed; one seeded generator serves the whole run, so the same prompts and settings give the same
  answers; each answer ends before its first end-of-text token;
- ``answer_nll``: how surprising each answer is to the model as it stands (mean negative log-likelihood
  per answer token, in nats), the coherence measure of steering: a steered answer that the unsteered
  model finds much less likely than its own answers has stopped making sense;
- ``read_residuals``: for each (prompt, response) pair, the residual stream entering every layer
  (``resid_pre``) at the prompt's last token and at every response token. Sequences of similar length are
  batched, padded on the right: the model is causal, so padding after a sequence changes nothing before it,
  and one forward pass of the base model (no unembedding) serves a whole batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.models.generation import (
    PositionCallback,
    generate_ids,
    preallocated_cache,
    sampling_generator,
    stop_ids,
)
from circuitmap.validation import check_text

PAD_ID = 0
"""The token that pads sequences on the right (any id works: nothing before it reads it)."""


def chat_ids(model: Model, question: str, system: str | None = None) -> torch.Tensor:
    """Token ids ``[T]`` of ``question`` as the user's turn (after ``system``, when given) in the model's chat
    template, with the prompt that starts the assistant's answer."""
    template = getattr(model.tokenizer, "chat_template", None)
    if not template:
        raise CircuitmapError(
            f"{model.name}'s tokenizer has no chat template; persona vectors need a chat model"
        )
    messages = [{"role": "user", "content": check_text("the question", question)}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": check_text("the system prompt", system)})
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor(model.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    model.check_length(len(ids))
    return ids


def response_ids(model: Model, response: str) -> torch.Tensor:
    """Token ids ``[n]`` of an answer's text, without special tokens."""
    return torch.tensor(
        model.tokenizer(check_text("the response", response), add_special_tokens=False).input_ids,
        dtype=torch.long,
    )


def generate_answers(
    model: Model,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    seed: int | None = 0,
    batch_size: int = 16,
    before_forward: PositionCallback | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """The answer to each of ``prompts`` (1-D ids): at most ``max_new_tokens`` ids, end-of-text excluded.
    ``before_forward(start)`` is called before every forward pass with the position it starts at (the rows
    of a batch have the same length, so the same positions)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        model.check_length(len(prompt) + max_new_tokens, "a prompt with its answer")
        by_length[len(prompt)].append(index)
    batches = [
        indices[first : first + batch_size]
        for _, indices in sorted(by_length.items())
        for first in range(0, len(indices), batch_size)
    ]
    generator = None if greedy else sampling_generator(model.device, seed)
    stop = stop_ids(model.hf_model, model.tokenizer)
    answers: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(prompts)
    for batch in tqdm(batches, desc="answers", unit="batch", disable=not progress):
        ids = torch.stack([prompts[i] for i in batch]).to(model.device)
        new = generate_ids(
            model.hf_model,
            ids,
            max_new_tokens,
            greedy=greedy,
            temperature=temperature,
            generator=generator,
            stop=stop,
            before_forward=before_forward,
            cache=preallocated_cache(model.hf_model, ids.shape[1] + max_new_tokens),
        ).cpu()
        for index, row in zip(batch, new, strict=True):
            ends = [position for position, token in enumerate(row.tolist()) if token in stop]
            answers[index] = row[: ends[0]] if ends else row
    return answers


def read_residuals(
    model: Model,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Iterator[tuple[int, torch.Tensor]]:
    """For each ``(prompt_ids, response_ids)`` pair (1-D ids), its index and the residual entering every layer
    at the prompt's last token and at each response token: ``[n_layers, 1 + n_response, d_model]``, on the
    CPU, in at least float32. Pairs come in batches of similar length, not in order."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="activations", unit="batch", disable=not progress):
        sequences = [torch.cat(pairs[i]) for i in batch]
        ids = _padded(sequences)
        cache = model.activations(ids, ["resid_pre"])
        for row, index in enumerate(batch):
            start, end = len(pairs[index][0]) - 1, len(sequences[row])
            layers = [cache["resid_pre", layer][row, start:end] for layer in range(model.n_layers)]
            yield index, torch.stack(layers).to("cpu", torch.promote_types(model.dtype, torch.float32))


def _padded(sequences: list[torch.Tensor]) -> torch.Tensor:
    """``sequences`` (1-D ids) as one batch ``[B, longest]``, padded on the right with ``PAD_ID``."""
    ids = torch.full((len(sequences), max(len(sequence) for sequence in sequences)), PAD_ID, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    return ids


def answer_nll(
    model: Model,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch_size: int = 8,
) -> list[float]:
    """For each ``(prompt_ids, answer_ids)`` pair, the model's mean negative log-likelihood of the answer's
    tokens given what precedes them, in nats per token (NaN for an empty answer)."""
    found = [float("nan")] * len(pairs)
    answered = [index for index, (_, answer) in enumerate(pairs) if len(answer)]
    for first in range(0, len(answered), batch_size):
        batch = answered[first : first + batch_size]
        ids = _padded([torch.cat(pairs[index]) for index in batch]).to(model.device)
        with torch.no_grad():
            logits = model.hf_model(input_ids=ids, use_cache=False).logits
        for row, index in enumerate(batch):
            prompt, answer = pairs[index]
            start = len(prompt)
            predicted = logits[row, start - 1 : start - 1 + len(answer)].double().log_softmax(-1)
            chosen = predicted.gather(1, answer.to(predicted.device).long()[:, None])
            found[index] = float(-chosen.mean())
    return found

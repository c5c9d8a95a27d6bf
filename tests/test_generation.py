"""The one generation loop: the same tokens as transformers' own greedy ``generate``, rows of a batch
continued independently, stop tokens, seeded sampling on a private generator, and the position callbacks."""

from __future__ import annotations

import pytest
import torch
from helpers.models import FAMILIES, tiny_model

from circuitmap.errors import CircuitmapError
from circuitmap.models.generation import (
    bfloat16_unembedding,
    draw,
    generate_ids,
    next_tokens,
    preallocated_cache,
    sampling_generator,
    stop_ids,
)

PROMPT = "The cat sat on"


def _until_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    for n, token in enumerate(tokens):
        if token in stops:
            return tokens[: n + 1]
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family):
    model = tiny_model(family, torch.float64)
    ids = model.encode(PROMPT)
    stops = stop_ids(model.hf_model, model.tokenizer)
    ours = generate_ids(model.hf_model, ids, 12, stop=stops)[0].tolist()
    with torch.no_grad():
        theirs = model.hf_model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )[0, ids.shape[1] :].tolist()
    assert ours == _until_stop(theirs, stops)
    assert model.generate(PROMPT, 12) == model.decode_after(ids, ours)


def test_rows_of_a_batch_are_continued_independently():
    model = tiny_model("llama", torch.float64)
    rows = torch.stack([model.encode("abcd")[0], model.encode("wxyz")[0]])
    batch = generate_ids(model.hf_model, rows, 8)
    for row, tokens in zip(rows, batch, strict=True):
        assert generate_ids(model.hf_model, row[None], 8)[0].tolist() == tokens.tolist()


def test_stop_tokens_end_a_continuation():
    model = tiny_model("llama", torch.float64)
    ids = model.encode(PROMPT)
    free = generate_ids(model.hf_model, ids, 10)[0].tolist()
    stopped = generate_ids(model.hf_model, ids, 10, stop=frozenset({free[3]}))[0].tolist()
    assert stopped == _until_stop(free, frozenset({free[3]}))
    assert len(stopped) <= 4


def test_sampling_is_seeded_and_leaves_the_global_generator_alone():
    model = tiny_model("gpt2", torch.float64)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = model.generate(PROMPT, 10, greedy=False, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == model.generate(PROMPT, 10, greedy=False, temperature=1.5, seed=7)
    others = {model.generate(PROMPT, 10, greedy=False, temperature=1.5, seed=seed) for seed in range(6)}
    assert len(others) > 1
    generator = sampling_generator(model.device, None)
    assert isinstance(generator, torch.Generator)


def test_position_callbacks_see_every_pass():
    model = tiny_model("llama", torch.float64)
    ids = model.encode(PROMPT)
    seen: list[tuple[str, int]] = []
    new = generate_ids(
        model.hf_model,
        ids,
        4,
        feed_last=True,
        before_forward=lambda start: seen.append(("before", start)),
        after_forward=lambda start: seen.append(("after", start)),
    )
    n = ids.shape[1]
    starts = [0, n, n + 1, n + 2, n + 3]
    assert seen == [(when, start) for start in starts for when in ("before", "after")]
    assert new.shape == (1, 4)
    seen.clear()
    generate_ids(model.hf_model, ids, 4, before_forward=lambda start: seen.append(("before", start)))
    assert [start for _, start in seen] == starts[:-1], "without feed_last the last token is not fed"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": 3, "greedy": False, "temperature": 0.0}, "temperature must be positive"),
    ],
)
def test_bad_settings(settings, message):
    model = tiny_model("llama", torch.float64)
    with pytest.raises(CircuitmapError, match=message):
        generate_ids(model.hf_model, model.encode(PROMPT), **settings)


def test_the_model_context_bounds_prompts_and_continuations():
    model = tiny_model("llama", torch.float64)
    assert model.context_length == 64
    with pytest.raises(CircuitmapError, match="the prompt has 65 tokens but the model.s context is 64"):
        model.top_next_tokens("x" * 65)
    with pytest.raises(CircuitmapError, match="the prompt with its continuation has 73 tokens"):
        model.generate("x" * 9, 64)
    assert len(model.generate("x" * 9, 55)) > 0


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    generator = torch.Generator().manual_seed(0)
    probs = torch.zeros(1, 1000)  # not a multiple of the block: the last block is padded
    probs[0, [3, 511, 512, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    drawn = draw(probs.expand(40_000, -1), generator)[:, 0]
    counts = torch.bincount(drawn, minlength=1000).double() / len(drawn)
    assert set(drawn.unique().tolist()) == {3, 511, 512, 999}
    torch.testing.assert_close(
        counts[[3, 511, 512, 999]], probs[0, [3, 511, 512, 999]].double(), atol=0.01, rtol=0
    )
    scaled = draw(probs.expand(8, -1) * 7.0, torch.Generator().manual_seed(1))
    assert torch.equal(scaled, draw(probs.expand(8, -1), torch.Generator().manual_seed(1))), (
        "masses need no norm"
    )


def test_draw_refuses_probabilities_that_are_not_finite():
    with pytest.raises(CircuitmapError, match="NaN or infinite"):
        next_tokens(torch.tensor([[0.0, float("inf"), 1.0]]), False, 1.0, torch.Generator().manual_seed(0))
    with pytest.raises(CircuitmapError, match="NaN or infinite"):
        next_tokens(torch.tensor([[0.0, float("nan")]]), True, 1.0, None)


def test_bfloat16_unembedding_changes_only_the_logits_and_is_undone():
    model = tiny_model("llama")
    ids = model.encode(PROMPT)
    original = model.hf_model.get_output_embeddings()
    with torch.no_grad():
        expected = model.hf_model(input_ids=ids).logits
        with bfloat16_unembedding(model.hf_model):
            fast = model.hf_model(input_ids=ids).logits
    assert model.hf_model.get_output_embeddings() is original
    torch.testing.assert_close(fast.float(), expected, rtol=0.02, atol=0.05)


def test_a_preallocated_cache_continues_exactly_as_a_growing_one():
    model = tiny_model("llama", torch.float64)
    ids = model.encode(PROMPT).expand(3, -1)
    grown = generate_ids(model.hf_model, ids, 9)
    cache = preallocated_cache(model.hf_model, ids.shape[1] + 9)
    assert cache is not None
    assert torch.equal(generate_ids(model.hf_model, ids, 9, cache=cache), grown)

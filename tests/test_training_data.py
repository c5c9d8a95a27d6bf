"""Training data: corpus sources, packing, activation pairs and the shuffle buffer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import SHARED_DATA, needs_shared, tiny_model

from circuitmap import CircuitmapError
from circuitmap.training import (
    ShuffleBuffer,
    collect_pairs,
    corpus_files,
    iter_documents,
    iter_pairs,
    pack_contexts,
    sample_documents,
    shuffled_batches,
)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("First doc\nline two.\n\n\nSecond doc.\n")
    nested = tmp_path / "nested"
    nested.mkdir()
    lines = [json.dumps({"text": "Third doc."}), "", json.dumps({"text": "Fourth doc.", "id": 4})]
    (nested / "b.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y\n")
    return tmp_path


def test_documents_from_files_folders_and_globs(corpus):
    assert list(iter_documents(corpus / "a.txt")) == ["First doc\nline two.", "Second doc."]
    assert list(iter_documents(corpus)) == [
        "First doc\nline two.",
        "Second doc.",
        "Third doc.",
        "Fourth doc.",
    ]
    assert list(iter_documents(str(corpus / "**" / "*.jsonl"))) == ["Third doc.", "Fourth doc."]
    assert [p.name for p in corpus_files(corpus)] == ["a.txt", "b.jsonl"]


def test_bad_corpus_sources(corpus, tmp_path):
    with pytest.raises(CircuitmapError, match="no such corpus file or folder"):
        list(iter_documents(tmp_path / "missing.txt"))
    with pytest.raises(CircuitmapError, match="must be .txt or .jsonl"):
        list(iter_documents(corpus / "ignored.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(CircuitmapError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(bad))
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(CircuitmapError, match="no string field 'text'"):
        list(iter_documents(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CircuitmapError, match="holds no .txt or .jsonl files"):
        list(iter_documents(empty))


def test_packing_joins_documents_and_starts_each_context_with_bos():
    model = tiny_model("llama")
    tokenizer = model.tokenizer
    contexts = list(pack_contexts(["abcdef", "ghij", "klmnopq"], tokenizer, context_length=5))
    stream = tokenizer("abcdef", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    stream += tokenizer("ghij", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    stream += tokenizer("klmnopq", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(contexts) == len(stream) // 4
    for number, context in enumerate(contexts):
        assert context.tolist() == [tokenizer.bos_token_id] + stream[number * 4 : number * 4 + 4]
    with pytest.raises(CircuitmapError, match="context_length must be at least 2"):
        list(pack_contexts(["abc"], tokenizer, context_length=1))


def test_pairs_are_the_mlp_inputs_and_outputs_without_the_first_position():
    model = tiny_model("gemma2")
    contexts = torch.stack(list(pack_contexts(["Hello there, tiny model."] * 4, model.tokenizer, 8))[:3])
    inputs, outputs = collect_pairs(model, contexts)
    assert inputs.shape == outputs.shape == (model.n_layers, 3 * 7, model.d_model)
    _, cache = model.run_with_cache(contexts, points=["mlp_in", "mlp_out"])
    torch.testing.assert_close(inputs[1], cache["mlp_in", 1][:, 1:].reshape(-1, model.d_model))
    torch.testing.assert_close(outputs[2], cache["mlp_out", 2][:, 1:].reshape(-1, model.d_model))
    batches = list(iter_pairs(model, list(contexts), batch_size=2))
    assert [b[0].shape[1] for b in batches] == [14, 7]
    torch.testing.assert_close(torch.cat([b[0] for b in batches], dim=1), inputs)


def test_shuffle_buffer_hands_out_every_row_once_in_a_reproducible_order():
    def run(seed):
        pairs = [
            (
                torch.arange(i * 10, i * 10 + 10.0).repeat(2, 1)[..., None].expand(2, 10, 3),
                -torch.arange(i * 10, i * 10 + 10.0).repeat(2, 1)[..., None].expand(2, 10, 3),
            )
            for i in range(5)
        ]
        return list(shuffled_batches(pairs, batch_size=7, capacity=16, seed=seed))

    batches = run(0)
    rows = torch.cat(batches)
    assert rows.shape == (50, 2, 2, 3)
    ids = rows[:, 0, 0, 0]
    assert sorted(ids.tolist()) == list(range(50)), "each row exactly once"
    assert torch.equal(rows[:, 0, 1, 0], -ids), "inputs and outputs stay paired"
    assert ids.tolist() != list(range(50)), "shuffled"
    assert all(torch.equal(a, b) for a, b in zip(batches, run(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, run(1), strict=True))


def test_shuffle_buffer_errors():
    with pytest.raises(CircuitmapError, match="capacity of at least 1"):
        ShuffleBuffer(0)
    with pytest.raises(CircuitmapError, match="empty"):
        ShuffleBuffer(4).take(2)


def test_sampled_documents_are_reproducible_and_leave_the_callers_random_state():
    model = tiny_model("llama")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = list(sample_documents(model, 5, max_new_tokens=12, batch_size=2, seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    again = list(sample_documents(model, 5, max_new_tokens=12, batch_size=2, seed=7))
    assert first == again and 1 <= len(first) <= 5
    assert first != list(sample_documents(model, 5, max_new_tokens=12, batch_size=2, seed=8))


@needs_shared()
def test_real_corpus_is_split_into_stories():
    stories = list(iter_documents(SHARED_DATA / "corpora" / "tinystories_valid.txt"))
    assert len(stories) > 500 and all(story.strip() == story and story for story in stories[:50])


def test_training_lowers_fvu_and_saves_a_set_that_predicts_in_raw_units(tmp_path):
    from circuitmap import attribute, load_transcoders
    from circuitmap.training.plt import Standardiser, TrainablePLT
    from circuitmap.training.trainer import TrainConfig, train_plt

    model = tiny_model("llama")
    documents = ["The quick brown fox jumps over the lazy dog. " * 3] * 200
    config = TrainConfig(
        d_features=64,
        k=8,
        skip=True,
        n_tokens=20_000,
        batch_size=256,
        lr=3e-3,
        context_length=32,
        buffer_tokens=2048,
        seed=1,
    )
    result = train_plt(model, documents, config, progress=False)
    summary = result.summary()
    one_step = train_plt(model, documents, replace(config, n_tokens=config.batch_size), progress=False)
    assert summary["mean_fvu"] < 0.75 * one_step.summary()["mean_fvu"]
    assert summary["mean_l0"] <= 8
    assert result.steps == 20_000 // 256 and len(result.fvu) == model.n_layers

    pairs = torch.stack(list(pack_contexts(documents[:4], model.tokenizer, 32))[:2])
    inputs, outputs = collect_pairs(model, pairs)
    predicted = result.transcoders.reconstruct(list(inputs))
    fvu = [
        float((o - p).pow(2).sum() / (o - o.mean(0)).pow(2).sum())
        for o, p in zip(outputs, predicted, strict=True)
    ]
    assert max(fvu) < 0.8

    module = TrainablePLT(model.n_layers, model.d_model, 16, 4, skip=True, seed=0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    batch = torch.stack([inputs, outputs], dim=1).permute(2, 0, 1, 3)
    standardiser = Standardiser.fit(batch)
    x, _ = standardiser.apply(batch)
    trained_units = module.decode(module.encode(x), x) * standardiser.scale_out[:, None].float()
    trained_units = trained_units + standardiser.mean_out.float()
    folded = module.to_transcoders(standardiser).reconstruct(list(inputs))
    torch.testing.assert_close(
        torch.stack(folded), trained_units.permute(1, 0, 2).detach(), rtol=1e-4, atol=1e-4
    )

    result.transcoders.save(tmp_path / "trained")
    graph = attribute(model, load_transcoders(tmp_path / "trained"), "The quick brown", progress=False)
    assert graph.n_features > 0

"""Training data: corpus sources, packing and activation pairs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import SHARED_DATA, needs_shared, tiny_model

from circuitmap import CircuitmapError
from circuitmap.training import collect_pairs, corpus_files, iter_documents, pack_contexts


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


@needs_shared()
def test_real_corpus_is_split_into_stories():
    stories = list(iter_documents(SHARED_DATA / "corpora" / "tinystories_valid.txt"))
    # The shared data README describes the file as about the first 1,000 stories of TinyStories validation.
    assert len(stories) > 500 and all(story.strip() == story and story for story in stories[:50])

"""Hugging Face dataset sources (``hf:`` specs): parsing, streaming from local dataset folders, errors."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from circuitmap.errors import CircuitmapError
from circuitmap.training import iter_documents
from circuitmap.training.hf_datasets import DatasetSpec, iter_dataset_documents, parse_spec

TRAIN = ["Once upon a time.", "The cat sat.", "It rained all day."]
VALIDATION = ["A held-out story.", "Another one."]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """``datasets`` cut off from the network, with every cache under tmp_path.

    datasets and huggingface_hub read these variables once at import, so their constants are set as well.
    """
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    home = tmp_path / "hf_home"
    cache = home / "datasets"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return home


@pytest.fixture
def stories(tmp_path, offline_hf) -> Path:
    """A local dataset folder with train and validation splits, one blank record among them."""
    folder = tmp_path / "stories"
    train = [{"text": text, "title": f"t{i}"} for i, text in enumerate(TRAIN)]
    train.insert(1, {"text": "  \n ", "title": "blank"})
    write_jsonl(folder / "data" / "train-00000.jsonl", train)
    write_jsonl(folder / "data" / "validation-00000.jsonl", [{"text": t, "title": "v"} for t in VALIDATION])
    return folder


def test_parse_spec_grammar():
    assert parse_spec("hf:roneneldan/TinyStories") == DatasetSpec("roneneldan/TinyStories", None, "train")
    assert parse_spec("hf:roneneldan/TinyStories@validation").split == "validation"
    assert parse_spec("hf:wikitext:wikitext-2-raw-v1@test") == DatasetSpec(
        "wikitext", "wikitext-2-raw-v1", "test"
    )
    assert parse_spec("hf:./my_dataset") == DatasetSpec("./my_dataset")
    assert parse_spec("/abs/folder@validation") == DatasetSpec("/abs/folder", None, "validation")
    for bad in ("hf:", "hf:@train", "hf:name@", "hf:name:@train"):
        with pytest.raises(CircuitmapError):
            parse_spec(bad)


def test_missing_datasets_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CircuitmapError, match=r"pip install 'circuitmap\[datasets\]'"):
        next(iter_documents("hf:roneneldan/TinyStories"))


def test_documents_stream_in_order_from_each_split(stories, tmp_path, monkeypatch):
    assert list(iter_documents("hf:" + str(stories))) == TRAIN
    assert list(iter_documents(f"hf:{stories}@validation")) == VALIDATION
    monkeypatch.chdir(tmp_path)
    assert list(iter_dataset_documents("hf:./stories@validation")) == VALIDATION


def test_dataset_sources_mix_with_files(stories, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("A local note.\n", encoding="utf-8")
    assert list(iter_documents([notes, f"hf:{stories}@validation"])) == ["A local note.", *VALIDATION]


def test_text_field_option_and_missing_field(stories):
    assert list(iter_documents(f"hf:{stories}@validation", text_field="title")) == ["v", "v"]
    with pytest.raises(CircuitmapError, match="'body'") as caught:
        list(iter_documents("hf:" + str(stories), text_field="body"))
    assert "'text'" in str(caught.value) and "'title'" in str(caught.value)


def test_unknown_dataset_while_offline_is_one_line(offline_hf):
    with pytest.raises(CircuitmapError, match="no-such-org/no-such-dataset") as caught:
        list(iter_documents("hf:no-such-org/no-such-dataset"))
    assert "\n" not in str(caught.value)


def test_missing_local_folder_and_bad_split(stories, tmp_path):
    with pytest.raises(CircuitmapError, match="not found") as caught:
        list(iter_documents(f"hf:{tmp_path / 'absent'}"))
    assert "\n" not in str(caught.value)
    with pytest.raises(CircuitmapError, match="nope") as caught:
        list(iter_documents(f"hf:{stories}@nope"))
    assert "\n" not in str(caught.value) and "validation" in str(caught.value)


def test_streaming_reads_only_what_is_taken(tmp_path, offline_hf):
    """The first documents come back without reading the later shards, which here would not even parse."""
    folder = tmp_path / "big"
    write_jsonl(folder / "data" / "train-00000.jsonl", [{"text": f"doc {i}"} for i in range(20_000)])
    broken = folder / "data" / "train-00001.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    assert list(itertools.islice(iter_documents("hf:" + str(folder)), 2)) == ["doc 0", "doc 1"]
    with pytest.raises(CircuitmapError, match="hf:") as caught:
        list(iter_documents("hf:" + str(folder)))
    assert "\n" not in str(caught.value)

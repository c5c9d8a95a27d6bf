"""Text for training and dashboards: documents from files or Hugging Face datasets, or sampled from the model.

A source is a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON object per
line, its text under ``text_field``), a folder (every ``.txt``/``.jsonl`` file below it, in sorted order) or
a glob pattern. A source string that starts with ``hf:`` names a Hugging Face dataset, streamed record by
record (the ``datasets`` extra): ``hf:NAME[:CONFIG][@SPLIT]``, where NAME is a Hub dataset id or a local
dataset folder, CONFIG one of its configurations and SPLIT defaults to ``train``, as in
``hf:roneneldan/TinyStories@validation``, ``hf:wikitext:wikitext-2-raw-v1@test`` or ``hf:./my_dataset``
(see ``circuitmap.training.hf_datasets``). With no corpus at hand, ``sample_documents`` lets the model write
its own text, in batches, from its beginning-of-text token: the offline default.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from circuitmap.errors import CircuitmapError
from circuitmap.models import Model
from circuitmap.training.hf_datasets import is_dataset_spec, iter_dataset_documents

TEXT_SUFFIXES = (".txt", ".jsonl")


def corpus_files(source: str | Path) -> list[Path]:
    """The files a source names, in a stable order; a clear error when it names none."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise CircuitmapError(f"{path}: a corpus file must be .txt or .jsonl")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise CircuitmapError(f"{path}: the folder holds no .txt or .jsonl files")
        return files
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in matches if p.is_file() and p.suffix in TEXT_SUFFIXES]
    if not files:
        raise CircuitmapError(f"{source}: no such corpus file or folder, and no .txt/.jsonl file matches it")
    return files


def _text_documents(path: Path) -> Iterator[str]:
    """Blank-line-separated documents of a text file, read line by line."""
    lines: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip()
                lines = []
    if lines:
        yield "".join(lines).strip()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CircuitmapError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CircuitmapError(f"{path}:{number}: no string field {text_field!r}")
            if text.strip():
                yield text


def iter_documents(sources: str | Path | Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Every document of one or several sources (files, folders, globs, ``hf:`` datasets), in order."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    for source in sources:
        if is_dataset_spec(source):
            yield from iter_dataset_documents(str(source), text_field)
            continue
        for path in corpus_files(source):
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _text_documents(path)


def sample_documents(
    model: Model,
    n_documents: int,
    max_new_tokens: int = 128,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
) -> Iterator[str]:
    """Documents written by the model itself from its beginning-of-text token.

    Sampling uses its own random state seeded by ``seed`` (the caller's state is left as it was), so the same
    seed gives the same documents whatever else draws random numbers in between.
    """
    start = model.tokenizer.bos_token_id
    if start is None:
        start = model.tokenizer.eos_token_id
    if start is None:
        raise CircuitmapError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    pad = model.tokenizer.eos_token_id if model.tokenizer.eos_token_id is not None else start
    caller_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    sampling_state = torch.random.get_rng_state()
    torch.random.set_rng_state(caller_state)
    for first in range(0, n_documents, batch_size):
        count = min(batch_size, n_documents - first)
        ids = torch.full((count, 1), start, dtype=torch.long, device=model.device)
        caller_state = torch.random.get_rng_state()
        torch.random.set_rng_state(sampling_state)
        with torch.no_grad():
            out = model.hf_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_k=None,
                top_p=None,
                pad_token_id=pad,
            )
        sampling_state = torch.random.get_rng_state()
        torch.random.set_rng_state(caller_state)
        for row in out[:, 1:]:
            text = model.tokenizer.decode(row, skip_special_tokens=True).strip()
            if text:
                yield text

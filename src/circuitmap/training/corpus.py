"""Text for training and dashboards: documents from files or Hugging Face datasets, or sampled from the model.

A source is a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one JSON object per
line, its text under ``text_field``), a folder (every ``.txt``/``.jsonl`` file below it, in sorted order) or
a glob pattern. A source string that starts with ``hf:`` names a Hugging Face dataset, streamed record by
record (the ``datasets`` extra): ``hf:NAME[:CONFIG][@SPLIT]``, where NAME is a Hub dataset id or a local
dataset folder, CONFIG one of its configurations and SPLIT defaults to ``train``, as in
``hf:roneneldan/TinyStories@validation``, ``hf:wikitext:wikitext-2-raw-v1@test`` or ``hf:./my_dataset``
(see ``circuitmap.training.hf_datasets``). With no corpus at hand, the model writes its own text
(``circuitmap.training.data.SampledContexts``): the offline default.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from circuitmap.errors import CircuitmapError
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

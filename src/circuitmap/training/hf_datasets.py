"""Documents streamed from a Hugging Face dataset, named by a spec such as ``hf:roneneldan/TinyStories``.

A spec reads ``hf:NAME[:CONFIG][@SPLIT]``: NAME is a Hub dataset id (``wikitext``, ``roneneldan/TinyStories``)
or a local dataset folder (``./my_dataset``, ``/abs/folder``, ``~/data``); CONFIG picks one of the dataset's
configurations; SPLIT defaults to ``train``. Examples: ``hf:roneneldan/TinyStories@validation``,
``hf:wikitext:wikitext-2-raw-v1@test``. NAME may hold ``/`` but not ``:`` or ``@``, which separate the parts.
Records stream one by one (nothing is downloaded in full), and the ``datasets`` package is imported only
when a spec is read, so it stays an optional extra.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from circuitmap.errors import CircuitmapError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
INSTALL_HINT = "pip install 'circuitmap[datasets]'"
_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class DatasetSpec:
    """The parts of an ``hf:`` spec: what ``datasets.load_dataset`` is called with."""

    name: str
    config: str | None = None
    split: str = DEFAULT_SPLIT


def is_dataset_spec(source: object) -> bool:
    """Whether a corpus source names a Hugging Face dataset rather than local text files."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_spec(spec: str) -> DatasetSpec:
    """Split ``[hf:]NAME[:CONFIG][@SPLIT]`` into its parts; a clear error for an empty part."""
    body = spec.removeprefix(PREFIX)
    split = DEFAULT_SPLIT
    if "@" in body:
        body, split = body.rsplit("@", 1)
        if not split:
            raise CircuitmapError(f"{spec}: empty split after '@' (write e.g. {PREFIX}NAME@validation)")
    name, separator, config = body.partition(":")
    if not name:
        raise CircuitmapError(f"{spec}: no dataset name (write {PREFIX}NAME[:CONFIG][@SPLIT])")
    if separator and not config:
        raise CircuitmapError(f"{spec}: empty config after ':' (write {PREFIX}NAME:CONFIG)")
    return DatasetSpec(name=os.path.expanduser(name), config=config or None, split=split)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line and of bounded length, for a CircuitmapError."""
    message = " ".join(str(error).split()) or type(error).__name__
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    return message


def _load_error(spec: str, error: Exception) -> CircuitmapError:
    """A one-line CircuitmapError for a failure of ``datasets`` to open or read a dataset."""
    if isinstance(error, ConnectionError):
        what = "cannot reach the Hugging Face Hub (offline, or no such dataset)"
    elif isinstance(error, FileNotFoundError):
        what = "dataset not found"
    else:
        what = "cannot load the dataset"
    return CircuitmapError(f"{spec}: {what}: {_one_line(error)}")


def _records(
    dataset: Iterable[dict[str, Any]], spec: str, errors: tuple[type[Exception], ...]
) -> Iterator[dict[str, Any]]:
    """The dataset's records, with read errors met while streaming turned into CircuitmapErrors."""
    iterator = iter(dataset)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except errors as error:
            raise _load_error(spec, error) from None
        yield record


def iter_dataset_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` string of every record of the dataset ``spec`` names, streamed in order.

    Records whose text is empty or only whitespace are skipped; a record without a string ``text_field``
    is an error that lists the fields it has.
    """
    parts = parse_spec(spec)
    try:
        import datasets
        from datasets.exceptions import DatasetsError
    except ImportError:
        raise CircuitmapError(f"{spec}: reading Hugging Face datasets needs {INSTALL_HINT}") from None
    # What datasets raises for bad input: ConnectionError (Hub unreachable or offline) and FileNotFoundError
    # (DatasetNotFoundError, no data files), both OSErrors; ValueError (bad split or config, unparsable
    # data); and its own DatasetsError family (e.g. DatasetGenerationError).
    errors = (DatasetsError, OSError, ValueError)
    try:
        dataset = datasets.load_dataset(parts.name, parts.config, split=parts.split, streaming=True)
    except errors as error:
        raise _load_error(spec, error) from None
    for number, record in enumerate(_records(dataset, spec, errors), start=1):
        text = record.get(text_field)
        if not isinstance(text, str):
            fields = ", ".join(repr(field) for field in record) or "none"
            raise CircuitmapError(
                f"{spec}: record {number} has no string field {text_field!r} (its fields: {fields})"
            )
        if text.strip():
            yield text

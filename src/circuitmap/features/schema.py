"""The feature database: one SQLite file per transcoder set, its schema and the checks made on opening it.

The schema is documented in ``docs/feature-store.md``; ``SCHEMA_VERSION`` changes whenever a table or a
column changes meaning. A reader refuses a file written with a newer version, or for another transcoder set.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from circuitmap.errors import CircuitmapError
from circuitmap.transcoders import Transcoders

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE vocab (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE contexts (
    id INTEGER PRIMARY KEY,
    tokens BLOB NOT NULL
);
CREATE TABLE build_state (
    layer INTEGER PRIMARY KEY,
    tensors BLOB NOT NULL
);
CREATE TABLE features (
    layer INTEGER NOT NULL,
    feature INTEGER NOT NULL,
    active_tokens INTEGER NOT NULL,
    density REAL NOT NULL,
    max_activation REAL NOT NULL,
    mean_activation REAL NOT NULL,
    histogram_first INTEGER NOT NULL,
    histogram BLOB NOT NULL,
    output_top BLOB NOT NULL,
    output_bottom BLOB NOT NULL,
    input_top BLOB NOT NULL,
    PRIMARY KEY (layer, feature)
);
CREATE TABLE examples (
    layer INTEGER NOT NULL,
    feature INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('top', 'sample')),
    contexts BLOB NOT NULL,
    starts BLOB NOT NULL,
    maxima BLOB NOT NULL,
    activations BLOB NOT NULL,
    PRIMARY KEY (layer, feature, kind)
);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    layer INTEGER NOT NULL,
    feature INTEGER NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('auto', 'manual', 'llm')),
    text TEXT NOT NULL,
    confidence REAL,
    author TEXT,
    created TEXT NOT NULL,
    evidence TEXT
);
CREATE INDEX labels_by_feature ON labels (layer, feature, source, id);
CREATE INDEX labels_by_text ON labels (text COLLATE NOCASE);
CREATE VIRTUAL TABLE search USING fts5 (label, tokens, tokenize = 'unicode61 remove_diacritics 2');
"""


def connect(path: str | Path, *, readonly: bool) -> sqlite3.Connection:
    """Open a feature database (read-only through a URI when asked; never creates a file then)."""
    path = Path(path)
    if readonly:
        if not path.is_file():
            raise CircuitmapError(f"{path}: no such feature database")
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout = 10000")
    return connection


def create(connection: sqlite3.Connection, meta: dict[str, str]) -> None:
    """Create every table in an empty database and write its metadata."""
    with connection:
        connection.executescript(SCHEMA)
        connection.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("schema_version", str(SCHEMA_VERSION)), *meta.items()],
        )


def read_meta(connection: sqlite3.Connection, path: str | Path) -> dict[str, str]:
    """The metadata of a feature database; a clear error for files that are not one, or are too new."""
    try:
        rows = connection.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as error:
        raise CircuitmapError(f"{path}: not a circuitmap feature database ({error})") from None
    meta = dict(rows)
    version = meta.get("schema_version", "")
    if not version.isdigit():
        raise CircuitmapError(f"{path}: not a circuitmap feature database (no schema version)")
    if int(version) > SCHEMA_VERSION:
        raise CircuitmapError(
            f"{path}: written with feature-database schema {version}, newer than the {SCHEMA_VERSION} this "
            "circuitmap reads; upgrade circuitmap"
        )
    return meta


def check_transcoders(meta: dict[str, str], transcoders: Transcoders, path: str | Path) -> None:
    """Refuse a database built for another transcoder set, naming both."""
    transcoders.check_fingerprint(meta.get("fingerprint", "?"), f"{path} ({meta.get('transcoders', '?')})")

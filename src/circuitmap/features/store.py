"""Reading a feature database: dashboards by (layer, feature), search by label or token, label editing.

Reads go through a read-only connection, so any number of processes can read while a label is edited; a
label edit opens a short write transaction of its own. See ``docs/feature-store.md`` for the tables.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import threading
import zlib
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from circuitmap.cache import default_database_path
from circuitmap.errors import CircuitmapError
from circuitmap.features import schema
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_text

LABEL_SOURCES = ("auto", "manual", "llm")
MAX_LABEL_LENGTH = 500
_DIRECT = re.compile(r"^\s*L?(\d+)\s*[/:_. ]\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Example:
    """A window of one context: its tokens, the feature's activation on each, and where the maximum is."""

    context: int
    start: int
    tokens: list[str]
    activations: list[float]
    max_activation: float
    peak: int


@dataclass(frozen=True)
class QuantileGroup:
    """Sampled contexts whose maximum lies in one quantile range of the sampled active contexts."""

    low_quantile: float
    high_quantile: float
    examples: list[Example]


@dataclass(frozen=True)
class Label:
    """One label of a feature: its text, where it came from, and (for automatic ones) a confidence."""

    text: str
    source: str
    confidence: float | None = None
    author: str | None = None
    created: str = ""
    evidence: dict | None = None


@dataclass(frozen=True)
class FeatureDashboard:
    """Everything known about one feature from the corpus and from its weights."""

    layer: int
    feature: int
    active_tokens: int
    density: float
    max_activation: float
    mean_activation: float
    histogram: list[int]
    histogram_edges: list[float]
    top_examples: list[Example]
    quantile_groups: list[QuantileGroup]
    output_top: list[tuple[str, float]]
    output_bottom: list[tuple[str, float]]
    input_top: list[tuple[str, float]]
    label: Label | None
    labels: list[Label] = field(default_factory=list)

    def as_json(self) -> dict:
        """A JSON-ready dict (tuples become lists), built field by field: ``asdict`` is several times
        slower on the thousand values of a dashboard."""
        data = _fields(self)
        data["top_examples"] = [_fields(example) for example in self.top_examples]
        data["quantile_groups"] = [
            {**_fields(group), "examples": [_fields(example) for example in group.examples]}
            for group in self.quantile_groups
        ]
        for name in ("output_top", "output_bottom", "input_top"):
            data[name] = [[token, value] for token, value in getattr(self, name)]
        data["label"] = None if self.label is None else _fields(self.label)
        data["labels"] = [_fields(label) for label in self.labels]
        return data

    def as_text(self, contexts: int = 5) -> str:
        """A plain-text dashboard: label, statistics, lens, input tokens and the top ``contexts`` contexts
        with the peak token in [brackets]."""
        label = self.label
        title = (
            "(no label)"
            if label is None
            else f"{label.text}  [{label.source}"
            + (f", confidence {label.confidence:.2f}]" if label.confidence is not None else "]")
        )
        lines = [
            f"layer {self.layer} feature {self.feature}: {title}",
            f"density {self.density:.3e} ({self.active_tokens:,} tokens), max {self.max_activation:.4g}, "
            f"mean when active {self.mean_activation:.4g}",
            "promotes: " + ", ".join(f"{token!r} {value:+.2f}" for token, value in self.output_top[:8]),
            "suppresses: " + ", ".join(f"{token!r} {value:+.2f}" for token, value in self.output_bottom[:8]),
            "input tokens: " + ", ".join(f"{token!r} {value:+.2f}" for token, value in self.input_top[:8]),
            "top contexts:",
        ]
        for example in self.top_examples[:contexts]:
            text = "".join(
                f"[{token}]" if i == example.peak else token for i, token in enumerate(example.tokens)
            ).replace("\n", "⏎")
            lines.append(f"  {example.max_activation:8.4g}  {text}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """In a notebook: a compact HTML table of the dashboard."""
        from circuitmap.notebook import dashboard_html

        return dashboard_html(self)


def _fields(instance) -> dict:
    """A dataclass instance's fields as a dict, lists copied (one level)."""
    return {
        field.name: list(value) if isinstance(value, list) else value
        for field in fields(instance)
        for value in (getattr(instance, field.name),)
    }


@dataclass(frozen=True)
class SearchHit:
    """A feature found by ``FeatureStore.search``."""

    layer: int
    feature: int
    label: str
    tokens: str


def current_label(labels: list[Label]) -> Label | None:
    """The label to show: the latest manual one (an empty manual label clears it), else the latest LLM
    label, else the latest automatic one."""
    for source in ("manual", "llm", "auto"):
        latest = next((label for label in reversed(labels) if label.source == source), None)
        if latest is not None and latest.text:
            return latest
    return None


class FeatureStore:
    """A feature database opened for reading; ``set_label`` writes manual labels.

    ``transcoders``, when given, must be the set the database was built for.
    """

    def __init__(self, path: str | Path, transcoders: Transcoders | None = None):
        self.path = Path(path)
        self._connection = schema.connect(self.path, readonly=True)
        self._lock = threading.Lock()
        self.meta = schema.read_meta(self._connection, self.path)
        if self.meta.get("status") != "complete":
            done, total = self.meta.get("tokens_done", "0"), self.meta.get("tokens", "?")
            raise CircuitmapError(
                f"{self.path}: the build is not finished ({done} of {total} tokens); "
                "run `circuitmap features "
                "build` with the same arguments to resume it"
            )
        if transcoders is not None:
            schema.check_transcoders(self.meta, transcoders, self.path)
        self.n_layers = int(self.meta["n_layers"])
        self.d_features = int(self.meta["d_features"])
        self.histogram_edges: list[float] = json.loads(self.meta["histogram_edges"])
        self.quantiles = int(self.meta["quantiles"])
        self._vocab: list[str] | None = None

    @classmethod
    def open_for(cls, transcoders: Transcoders | None, path: str | Path | None = None) -> FeatureStore | None:
        """The database to label ``transcoders``' features with: ``path`` (refused when built for another
        set), else the set's default database when it exists and is usable (a note on stderr when it is not),
        else None."""
        if path is not None:
            return cls(path, transcoders=transcoders)
        if transcoders is None:
            return None
        default = default_database_path(transcoders)
        if not default.is_file():
            return None
        try:
            return cls(default, transcoders=transcoders)
        except CircuitmapError as error:
            print(f"warning: the default feature database is not used: {error}", file=sys.stderr)
            return None

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, {self.meta.get('transcoders')}, {self.n_layers} layers × "
            f"{self.d_features} features, {self.meta.get('tokens_done')} tokens)"
        )

    @property
    def vocab(self) -> list[str]:
        """Token strings by id, as the model's tokenizer decodes each token alone."""
        if self._vocab is None:
            with self._lock:
                rows = self._connection.execute("SELECT text FROM vocab ORDER BY id").fetchall()
            self._vocab = [text for (text,) in rows]
        return self._vocab

    def check_feature(self, layer: int, feature: int) -> None:
        """Raise a clear error for a (layer, feature) outside the set."""
        if not 0 <= layer < self.n_layers or not 0 <= feature < self.d_features:
            raise CircuitmapError(
                f"no feature {feature} in layer {layer}: the set has {self.n_layers} layers of "
                f"{self.d_features} features"
            )

    def get(self, layer: int, feature: int) -> FeatureDashboard:
        """The dashboard of one feature."""
        self.check_feature(layer, feature)
        vocab = self.vocab
        with self._lock:
            row = self._connection.execute(
                "SELECT active_tokens, density, max_activation, mean_activation, histogram_first, histogram, "
                "output_top, "
                "output_bottom, input_top FROM features WHERE layer = ? AND feature = ?",
                (layer, feature),
            ).fetchone()
            examples = dict(
                (kind, rest)
                for kind, *rest in self._connection.execute(
                    "SELECT kind, contexts, starts, maxima, activations FROM examples "
                    "WHERE layer = ? AND feature = ?",
                    (layer, feature),
                )
            )
            context_ids = sorted(
                {int(c) for kind in examples for c in np.frombuffer(examples[kind][0], dtype="<i8")}
            )
            tokens = self._contexts(context_ids)
            labels = feature_labels(self._connection, layer, feature)
        if row is None:
            raise CircuitmapError(f"{self.path}: no record of feature {feature} in layer {layer}")
        active, density, maximum, mean, first, histogram, output_top, output_bottom, input_top = row
        counts = np.zeros(len(self.histogram_edges) - 1, dtype=np.int64)
        stored = np.frombuffer(histogram, dtype="<i8")
        counts[first : first + stored.size] = stored
        top = _examples(examples.get("top"), tokens, vocab)
        sample = _examples(examples.get("sample"), tokens, vocab)
        return FeatureDashboard(
            layer=layer,
            feature=feature,
            active_tokens=active,
            density=density,
            max_activation=maximum,
            mean_activation=mean,
            histogram=counts.tolist(),
            histogram_edges=self.histogram_edges,
            top_examples=top,
            quantile_groups=_quantile_groups(sample, self.quantiles),
            output_top=_named(output_top, vocab),
            output_bottom=_named(output_bottom, vocab),
            input_top=_named(input_top, vocab),
            label=current_label(labels),
            labels=labels,
        )

    def label(self, layer: int, feature: int) -> Label | None:
        """The current label of one feature (see ``current_label``)."""
        return current_label(self.label_history(layer, feature))

    def label_history(self, layer: int, feature: int) -> list[Label]:
        """Every label one feature has had, oldest first."""
        self.check_feature(layer, feature)
        with self._lock:
            return feature_labels(self._connection, layer, feature)

    def checked(self, features: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
        """``features`` as (int, int) pairs, in order, each checked against the set; every feature of the
        set when None."""
        if features is None:
            return [(layer, feature) for layer in range(self.n_layers) for feature in range(self.d_features)]
        pairs = [(int(layer), int(feature)) for layer, feature in features]
        for layer, feature in pairs:
            self.check_feature(layer, feature)
        return pairs

    def labels_of(self, features: list[tuple[int, int]]) -> dict[tuple[int, int], Label]:
        """Current labels of many features at once (features without a label are left out)."""
        wanted = set(features)
        found: dict[tuple[int, int], list[Label]] = {}
        with self._lock:
            for layer in sorted({layer for layer, _ in wanted}):
                indices = sorted(feature for lay, feature in wanted if lay == layer)
                for start in range(0, len(indices), 500):
                    chunk = indices[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for row in self._connection.execute(
                        "SELECT layer, feature, text, source, confidence, author, created, evidence "
                        "FROM labels "
                        f"WHERE layer = ? AND feature IN ({marks}) ORDER BY id",
                        (layer, *chunk),
                    ):
                        found.setdefault((row[0], row[1]), []).append(_label(row[2:]))
        labels = {key: current_label(value) for key, value in found.items()}
        return {key: label for key, label in labels.items() if label is not None}

    def search(self, text: str, limit: int = 20) -> list[SearchHit]:
        """Features whose label or characteristic tokens match ``text`` (every word, as a prefix), best first.
        ``12/3071`` (or ``L12:3071``) finds that feature directly."""
        direct = _DIRECT.match(text)
        if direct:
            layer, feature = int(direct.group(1)), int(direct.group(2))
            if 0 <= layer < self.n_layers and 0 <= feature < self.d_features:
                return [self._hit(layer * self.d_features + feature)]
        words = re.findall(r"\w+", text)
        with self._lock:
            if words:
                query = " AND ".join(f'"{word}"*' for word in words)
                rows = self._connection.execute(
                    "SELECT rowid, label, tokens FROM search WHERE search MATCH ? ORDER BY rank LIMIT ?",
                    (query, limit),
                ).fetchall()
            elif text.strip():
                pattern = (
                    "%" + text.strip().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                )
                rows = self._connection.execute(
                    "SELECT rowid, label, tokens FROM search WHERE label LIKE ?1 ESCAPE '\\' "
                    "OR tokens LIKE ?1 ESCAPE '\\' LIMIT ?2",
                    (pattern, limit),
                ).fetchall()
            else:
                rows = []
        return [self._row_hit(row) for row in rows]

    def set_label(
        self, layer: int, feature: int, text: str, *, author: str | None = None, source: str = "manual"
    ) -> Label:
        """Store a label (manual by default) with the time and author; an empty manual label clears the
        manual one. Opens the file for writing only for this edit."""
        self.check_feature(layer, feature)
        check_text("a label", text, empty=True)
        if author is not None:
            check_text("the author", author, empty=True)
        text = " ".join(text.split())
        if len(text) > MAX_LABEL_LENGTH:
            raise CircuitmapError(f"a label has at most {MAX_LABEL_LENGTH} characters, got {len(text)}")
        if source not in LABEL_SOURCES:
            raise CircuitmapError(f"label source must be one of {', '.join(LABEL_SOURCES)}, got {source!r}")
        label = Label(text=text, source=source, author=author or None, created=now())
        write_labels(self.path, [(layer, feature, label)], self.d_features)
        return label

    def _contexts(self, ids: list[int]) -> dict[int, np.ndarray]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._connection.execute(f"SELECT id, tokens FROM contexts WHERE id IN ({marks})", ids)
        return {id_: np.frombuffer(blob, dtype="<i4") for id_, blob in rows}

    def _hit(self, key: int) -> SearchHit:
        with self._lock:
            row = self._connection.execute(
                "SELECT rowid, label, tokens FROM search WHERE rowid = ?", (key,)
            ).fetchone()
        if row is None:
            return SearchHit(key // self.d_features, key % self.d_features, "", "")
        return self._row_hit(row)

    def _row_hit(self, row) -> SearchHit:
        key, label, tokens = row
        return SearchHit(
            layer=key // self.d_features, feature=key % self.d_features, label=label, tokens=tokens
        )


def now() -> str:
    """The current UTC time in ISO 8601, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def write_labels(path: str | Path, labels: list[tuple[int, int, Label]], d_features: int) -> None:
    """Append labels in one transaction and refresh the search index's label text of their features."""
    connection = schema.connect(path, readonly=False)
    try:
        with connection:
            connection.executemany(
                "INSERT INTO labels (layer, feature, source, text, confidence, author, created, evidence) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        layer,
                        feature,
                        label.source,
                        label.text,
                        label.confidence,
                        label.author,
                        label.created or now(),
                        None if label.evidence is None else json.dumps(label.evidence),
                    )
                    for layer, feature, label in labels
                ],
            )
            refresh_search_labels(connection, {(layer, feature) for layer, feature, _ in labels}, d_features)
    except sqlite3.OperationalError as error:
        raise CircuitmapError(f"{path}: cannot write the label ({error})") from None
    finally:
        connection.close()


def refresh_search_labels(
    connection: sqlite3.Connection, features: set[tuple[int, int]], d_features: int
) -> None:
    """Set the search index's label text of each feature to its current label."""
    for layer, feature in sorted(features):
        label = current_label(feature_labels(connection, layer, feature))
        connection.execute(
            "UPDATE search SET label = ? WHERE rowid = ?",
            ("" if label is None else label.text, layer * d_features + feature),
        )


def feature_labels(connection: sqlite3.Connection, layer: int, feature: int) -> list[Label]:
    """Every label row of one feature, oldest first."""
    rows = connection.execute(
        "SELECT text, source, confidence, author, created, evidence FROM labels "
        "WHERE layer = ? AND feature = ? ORDER BY id",
        (layer, feature),
    )
    return [_label(row) for row in rows]


def _label(row) -> Label:
    text, source, confidence, author, created, evidence = row
    return Label(
        text=text,
        source=source,
        confidence=confidence,
        author=author,
        created=created,
        evidence=None if evidence is None else json.loads(evidence),
    )


def _named(blob: bytes, vocab: list[str]) -> list[tuple[str, float]]:
    """(token, value) pairs from a blob of int32 ids followed by float32 values."""
    n = len(blob) // 8
    ids, values = np.frombuffer(blob, dtype="<i4", count=n), np.frombuffer(blob, dtype="<f4", offset=4 * n)
    return [(vocab[token], value) for token, value in zip(ids.tolist(), values.tolist(), strict=True)]


def _examples(row, tokens: dict[int, np.ndarray], vocab: list[str]) -> list[Example]:
    if row is None or not row[0]:
        return []
    contexts, starts, maxima, activations = row
    contexts = np.frombuffer(contexts, dtype="<i8")
    starts = np.frombuffer(starts, dtype="<i8")
    maxima = np.frombuffer(maxima, dtype="<f4")
    windows = np.frombuffer(zlib.decompress(activations), dtype="<f4").reshape(len(contexts), -1)
    examples = []
    for context, start, maximum, window in zip(contexts, starts, maxima, windows, strict=True):
        ids = tokens[int(context)][start : start + window.shape[0]]
        values = window[: len(ids)]
        examples.append(
            Example(
                context=int(context),
                start=int(start),
                tokens=[vocab[i] for i in ids],
                activations=values.tolist(),
                max_activation=float(maximum),
                peak=int(values.argmax()),
            )
        )
    return examples


def _quantile_groups(sample: list[Example], quantiles: int) -> list[QuantileGroup]:
    """Split the sampled contexts, ordered by maximum, into ``quantiles`` groups of (nearly) equal size."""
    ordered = sorted(sample, key=lambda example: example.max_activation)
    if not ordered:
        return []
    bounds = np.linspace(0, len(ordered), quantiles + 1).round().astype(int)
    return [
        QuantileGroup(low_quantile=i / quantiles, high_quantile=(i + 1) / quantiles, examples=ordered[a:b])
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
        if b > a
    ]

"""Export feature dashboards in Neuronpedia's layout, for upload or for a local Neuronpedia instance.

Neuronpedia keeps one ``Neuron`` record per feature, ``Activation`` records for its example contexts and
``Explanation`` records for its labels. Its ids are strings: ``modelId`` names the model, and ``layer`` is
the *source id* ``{layer}-{source set}`` (for example ``6-res-jb``); ``index`` is the feature's number.

Two layouts are written:

- one feature: a single JSON object, the ``Neuron`` record with its ``activations`` and ``explanations``
  nested, as Neuronpedia's feature API returns it;
- many features (a list, or the whole set): Neuronpedia's dataset-export folder, the layout its importer
  reads, with records flattened into gzipped JSON lines in batches of 128 features by index::

      PATH/{model}/{layer}-{source set}/features/batch-{n}.jsonl.gz
      PATH/{model}/{layer}-{source set}/activations/batch-{n}.jsonl.gz
      PATH/{model}/{layer}-{source set}/explanations/batch-{n}.jsonl.gz

  where batch ``n`` holds features ``128 n`` to ``128 n + 127``. The model, source and release records are
  not written: they belong to a Neuronpedia account and are created there.

Numbers are the store's own, never rounded: activations are float32 values given as Python floats, so
``numpy.float32(x) == stored`` holds for every one. Ids that Neuronpedia expects to belong to one of its
users (``creatorId``, ``authorId``) are ``creator_id`` when given, else null for the importer to fill in.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from circuitmap.atomic import atomic_write
from circuitmap.errors import CircuitmapError
from circuitmap.features.store import Example, FeatureDashboard, FeatureStore, Label

BATCH_FEATURES = 128
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote: the features, activation and explanation records, and the files."""

    path: Path
    features: int
    activations: int
    explanations: int
    files: list[Path] = field(default_factory=list)


def default_ids(store: FeatureStore) -> tuple[str, str]:
    """Model id and source set name derived from the store's metadata (last path part, as a slug)."""
    return _slug(store.meta.get("model", ""), "model"), _slug(
        store.meta.get("transcoders", ""), "transcoders"
    )


def source_name(layer: int, source_id: str) -> str:
    """Neuronpedia's source id of one layer of a source set: ``{layer}-{source set}``."""
    return f"{layer}-{source_id}"


def feature_json(
    store: FeatureStore,
    layer: int,
    feature: int,
    *,
    model_id: str | None = None,
    source_id: str | None = None,
    creator_id: str | None = None,
) -> dict:
    """One feature as Neuronpedia's ``Neuron`` record with ``activations`` and ``explanations`` nested.

    ``source_id`` names the source set (default: the store's transcoder name); the record's ``layer`` is
    ``{layer}-{source_id}``. Fields:

    - ``maxActApprox``: the feature's largest activation over the corpus; ``frac_nonzero``: its density;
    - ``freq_hist_data_bar_heights``: token counts of the activation histogram, and
      ``freq_hist_data_bar_values``: the *geometric centres* ``sqrt(lo * hi)`` of its log-spaced bins
      (the store's ``histogram_edges``), both trimmed to the bins from the first to the last non-empty one;
      the two end bins of the store also count activations beyond them;
    - ``pos_str``/``pos_values`` and ``neg_str``/``neg_values``: the tokens the feature's output promotes
      and suppresses most (logit lens), strongest first;
    - ``activations``: the top contexts (``binMin`` -1, ``binMax`` the maximum, ``binContains`` -1, as
      Neuronpedia marks its top group), then the sampled contexts of each quantile group, highest first,
      with ``binMin``/``binMax`` the range of their maxima and ``binContains`` the share of the sampled
      contexts in the group; ``qualifyingTokenIndex`` is the peak;
    - ``explanations``: the current label, if any, with its source, author and confidence in ``notes``.
    """
    model_id, source_id = _ids(store, model_id, source_id)
    dashboard = store.get(layer, feature)
    record = neuron_record(dashboard, model_id, source_id, creator_id)
    record["activations"] = activation_records(dashboard, model_id, source_id, creator_id)
    record["explanations"] = explanation_records(dashboard, model_id, source_id, creator_id)
    return record


def neuron_record(dashboard: FeatureDashboard, model_id: str, source_id: str, creator_id: str | None) -> dict:
    """The ``Neuron`` fields of one feature (statistics, histogram, logit lens)."""
    heights, values = histogram_bars(dashboard.histogram, dashboard.histogram_edges)
    return {
        "modelId": model_id,
        "layer": source_name(dashboard.layer, source_id),
        "index": str(dashboard.feature),
        "sourceSetName": source_id,
        "creatorId": creator_id,
        "maxActApprox": float(dashboard.max_activation),
        "frac_nonzero": float(dashboard.density),
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": values,
        "pos_str": [token for token, _ in dashboard.output_top],
        "pos_values": [float(value) for _, value in dashboard.output_top],
        "neg_str": [token for token, _ in dashboard.output_bottom],
        "neg_values": [float(value) for _, value in dashboard.output_bottom],
    }


def histogram_bars(counts: list[int], edges: list[float]) -> tuple[list[int], list[float]]:
    """Bar heights and geometric bin centres (the bins are log-spaced), first to last non-empty bin."""
    occupied = [i for i, count in enumerate(counts) if count]
    if not occupied:
        return [], []
    first, last = occupied[0], occupied[-1]
    heights = [int(count) for count in counts[first : last + 1]]
    centres = [math.sqrt(edges[i] * edges[i + 1]) for i in range(first, last + 1)]
    return heights, centres


def activation_records(
    dashboard: FeatureDashboard, model_id: str, source_id: str, creator_id: str | None
) -> list[dict]:
    """``Activation`` records: the top contexts, then each quantile group's contexts, highest first."""
    source = source_name(dashboard.layer, source_id)
    base = {"modelId": model_id, "layer": source, "index": str(dashboard.feature), "creatorId": creator_id}
    prefix = f"{model_id}@{source}:{dashboard.feature}"
    records = [
        _activation(example, base, f"{prefix}:top-{n}", -1.0, float(dashboard.max_activation), -1.0)
        for n, example in enumerate(dashboard.top_examples)
    ]
    sampled = sum(len(group.examples) for group in dashboard.quantile_groups)
    for group in reversed(dashboard.quantile_groups):
        maxima = [example.max_activation for example in group.examples]
        share = len(group.examples) / sampled
        for n, example in enumerate(sorted(group.examples, key=lambda e: -e.max_activation)):
            tag = f"{prefix}:q{group.low_quantile:g}-{n}"
            records.append(_activation(example, base, tag, min(maxima), max(maxima), share))
    return records


def explanation_records(
    dashboard: FeatureDashboard, model_id: str, source_id: str, creator_id: str | None
) -> list[dict]:
    """The current label as an ``Explanation`` record (none when the feature has no label)."""
    label = dashboard.label
    if label is None:
        return []
    source = source_name(dashboard.layer, source_id)
    return [
        {
            "id": f"{model_id}@{source}:{dashboard.feature}:{label.source}",
            "modelId": model_id,
            "layer": source,
            "index": str(dashboard.feature),
            "description": label.text,
            "authorId": creator_id,
            "typeName": None,
            "explanationModelName": None,
            "notes": label_notes(label),
            "createdAt": label.created or None,
        }
    ]


def label_notes(label: Label) -> str:
    """Where a label came from, in a line: source, author and confidence when known."""
    parts = [f"circuitmap {label.source} label"]
    if label.author:
        parts.append(f"author {label.author}")
    if label.confidence is not None:
        parts.append(f"confidence {label.confidence:g}")
    return "; ".join(parts)


def export_neuronpedia(
    store: FeatureStore,
    path: str | Path,
    *,
    features: list[tuple[int, int]] | None = None,
    model_id: str | None = None,
    source_id: str | None = None,
    creator_id: str | None = None,
    progress: bool = True,
) -> ExportReport:
    """Write features in Neuronpedia's layout: a ``.json`` path takes exactly one feature (one nested
    record); any other path is a folder in the dataset-export layout (see the module docstring) for the
    listed features, or every feature of the set when ``features`` is None."""
    path = Path(path)
    model_id, source_id = _ids(store, model_id, source_id)
    wanted = _features(store, features)
    if path.suffix.lower() == ".json":
        return _export_one(store, path, wanted, model_id, source_id, creator_id)
    return _export_folder(store, path, wanted, model_id, source_id, creator_id, progress)


def _export_one(
    store: FeatureStore,
    path: Path,
    wanted: list[tuple[int, int]],
    model_id: str,
    source_id: str,
    creator_id: str | None,
) -> ExportReport:
    """One feature as a single JSON file."""
    if len(wanted) != 1:
        raise CircuitmapError(
            f"{path}: a .json file holds one feature, got {len(wanted)}; give a folder for several features"
        )
    layer, feature = wanted[0]
    record = feature_json(
        store, layer, feature, model_id=model_id, source_id=source_id, creator_id=creator_id
    )
    _write_bytes(path, (json.dumps(record, ensure_ascii=False, allow_nan=False, indent=1) + "\n").encode())
    return ExportReport(path, 1, len(record["activations"]), len(record["explanations"]), [path])


def _export_folder(
    store: FeatureStore,
    path: Path,
    wanted: list[tuple[int, int]],
    model_id: str,
    source_id: str,
    creator_id: str | None,
    progress: bool,
) -> ExportReport:
    """Features as gzipped JSON lines in Neuronpedia's dataset-export folders, a batch at a time."""
    counts = {"features": 0, "activations": 0, "explanations": 0}
    files: list[Path] = []
    bar = tqdm(total=len(wanted), desc="neuronpedia export", unit="feature", disable=not progress)
    try:
        for layer, batch, members in _batches(wanted):
            tables: dict[str, list[dict]] = {"features": [], "activations": [], "explanations": []}
            for feature in members:
                dashboard = store.get(layer, feature)
                tables["features"].append(neuron_record(dashboard, model_id, source_id, creator_id))
                tables["activations"] += activation_records(dashboard, model_id, source_id, creator_id)
                tables["explanations"] += explanation_records(dashboard, model_id, source_id, creator_id)
                bar.update(1)
            folder = path / model_id / source_name(layer, source_id)
            for table, records in tables.items():
                target = folder / table / f"batch-{batch}.jsonl.gz"
                _write_bytes(target, gzip.compress(_json_lines(records), compresslevel=6, mtime=0))
                counts[table] += len(records)
                files.append(target)
    finally:
        bar.close()
    return ExportReport(path, counts["features"], counts["activations"], counts["explanations"], files)


def _batches(wanted: list[tuple[int, int]]) -> Iterator[tuple[int, int, list[int]]]:
    """(layer, batch number, feature indices) in order; batch ``n`` holds indices ``128 n`` on."""
    groups: dict[tuple[int, int], list[int]] = {}
    for layer, feature in sorted(set(wanted)):
        groups.setdefault((layer, feature // BATCH_FEATURES), []).append(feature)
    for (layer, batch), members in groups.items():
        yield layer, batch, members


def _features(store: FeatureStore, features: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """The features to export, checked against the set; every feature when None."""
    checked = store.checked(features)
    if not checked:
        raise CircuitmapError("no features to export")
    return checked


def _activation(
    example: Example, base: dict, id_: str, bin_min: float, bin_max: float, bin_contains: float
) -> dict:
    """One context as an ``Activation`` record."""
    values = [float(value) for value in example.activations]
    return {
        "id": id_,
        **base,
        "tokens": list(example.tokens),
        "values": values,
        "maxValue": float(example.max_activation),
        "maxValueTokenIndex": int(example.peak),
        "minValue": min(values) if values else 0.0,
        "qualifyingTokenIndex": int(example.peak),
        "dataIndex": str(example.context),
        "dataSource": None,
        "binMin": float(bin_min),
        "binMax": float(bin_max),
        "binContains": float(bin_contains),
    }


def _ids(store: FeatureStore, model_id: str | None, source_id: str | None) -> tuple[str, str]:
    """The model id and source set name to use: the given ones (checked) or the store's defaults."""
    default_model, default_source = default_ids(store)
    model_id = default_model if model_id is None else model_id
    source_id = default_source if source_id is None else source_id
    for name, value in (("model id", model_id), ("source id", source_id)):
        if not _ID.match(value):
            raise CircuitmapError(
                f"Neuronpedia {name} {value!r} must be lowercase letters, digits, '.', '_' or '-' "
                f"(for example {_slug(value, 'x')!r})"
            )
    return model_id, source_id


def _slug(text: str, fallback: str) -> str:
    """The last path part of ``text`` as a Neuronpedia id: lowercase, other characters as dashes."""
    last = str(text).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-._")
    return slug or fallback


def _json_lines(records: list[dict]) -> bytes:
    """Records as JSON lines (UTF-8, no NaN)."""
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (``circuitmap.atomic``)."""
    atomic_write(path, lambda temporary: temporary.write_bytes(data))

"""Build a feature database: one streamed pass over a corpus, resumable, then the dashboards are written.

Contexts of the corpus are packed as for training, run through the model a batch at a time, and every
layer's features are encoded from the MLP inputs; ``LayerStatistics`` keeps the running top contexts, the
random sample, the histogram and the counts. Every few minutes the running state is saved inside the
database in one transaction, so a killed build resumes from its last checkpoint and never leaves a corrupt
file. At the end the logit lens, the input tokens and the automatic labels are computed and everything is
written in a single transaction.

Under torchrun the processes share the work batch by batch: every process reads the whole corpus (so all
agree on the batches), batch k is run through the model and counted by process k mod N, and each checkpoint
and the end merge every process's statistics into the main process's, which alone writes the database.
Merging is exact and independent of the order of the contexts (see ``bookkeeping``), and the batches (with
the random keys of each, seeded by its first context) are those of one process, so N processes build the
database that one process builds from the same contexts, given the same arithmetic (device and threads).
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from circuitmap import __version__
from circuitmap.atomic import atomic_write
from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError, Interrupted
from circuitmap.features import schema
from circuitmap.features.bookkeeping import LayerStatistics, histogram_edges
from circuitmap.features.labels import TokenSpace, automatic_labels, model_namer, name_concepts
from circuitmap.features.logit_lens import layer_input_lens, layer_output_lens
from circuitmap.features.store import now, refresh_search_labels
from circuitmap.models import Model
from circuitmap.training.activations import pack_contexts
from circuitmap.training.corpus import iter_documents
from circuitmap.training.distributed import ProcessGroup
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_number, check_seed


@dataclass(frozen=True)
class BuildConfig(Settings):
    """What one build computes."""

    tokens: int = 1_000_000
    """Corpus tokens to read (scored tokens: every position of a context but the first)."""
    context_length: int = 128
    """Tokens per context, the first (BOS) included."""
    batch_size: int = 16
    """Contexts per forward pass."""
    top: int = 20
    """Top activating contexts kept per feature."""
    samples: int = 20
    """Contexts sampled at random among those where a feature is active, shown in quantile groups."""
    quantiles: int = 5
    """Activation quantile groups the sampled contexts are shown in."""
    window: int = 32
    """Tokens of a context shown around its peak."""
    before: int = 24
    """Tokens of the window before the peak (changed with ``window``, it keeps the same share, 3/4)."""
    lens_tokens: int = 10
    """Output and input tokens listed in each feature's lens."""
    seed: int = 0
    """Seed of the random sample of contexts."""
    concept_names: bool = False
    """Ask the model to name every concept label now (minutes per thousand; graphs name their own)."""

    def with_changes(self, **changes) -> BuildConfig:
        """A copy with the given fields changed (``None`` keeps a field); a new ``window`` without a new
        ``before`` keeps three quarters of the window before the peak."""
        window = changes.get("window")
        if window is not None and changes.get("before") is None:
            changes["before"] = min(window * 3 // 4, window - 1)
        return super().with_changes(**changes)

    def check(self) -> None:
        """A clear error for settings that cannot work together."""
        for name in ("tokens", "batch_size", "top", "samples", "quantiles", "window", "lens_tokens"):
            check_number(name, getattr(self, name), low=1, whole=True)
        check_number("context_length", self.context_length, low=2, whole=True)
        check_number("before", self.before, low=0, whole=True)
        check_seed("seed", self.seed)
        if self.window > self.context_length:
            raise CircuitmapError(
                f"the window ({self.window}) cannot be longer than a context ({self.context_length})"
            )
        if not 0 <= self.before < self.window:
            raise CircuitmapError(f"before must lie in [0, window), got {self.before}")


@dataclass(frozen=True)
class BuildReport:
    """What a build did: tokens and contexts read, features without a full top list, time spent (in a
    distributed build, the processes other than the main one report tokens and contexts only)."""

    path: Path
    tokens: int
    contexts: int
    short_features: int
    dead_features: int
    corpus_exhausted: bool
    seconds: float
    finish_seconds: float = 0.0
    already_complete: bool = False


def build_features(
    model: Model,
    transcoders: Transcoders,
    corpus: str | Path | list[str | Path],
    path: str | Path,
    config: BuildConfig = BuildConfig(),
    *,
    model_name: str | None = None,
    transcoders_name: str | None = None,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
    stop: threading.Event | None = None,
    rebuild: bool = False,
    group: ProcessGroup | None = None,
) -> BuildReport:
    """Build (or resume building) the feature database of ``transcoders`` at ``path`` from ``corpus``.

    A finished database is left alone (``already_complete``) unless ``rebuild``, which also discards an
    unfinished build of other settings. An unfinished build that has read nothing yet is started again with
    the settings given. Setting ``stop`` ends the build at the next batch boundary after saving a
    checkpoint, with ``Interrupted``; running again resumes it. Settings, the model's context and the corpus
    (that it holds at least one context) are checked before anything is written.

    ``group``: the processes that share the build (default: those torchrun started, else this one alone);
    see the module docstring. Every process calls this with the same arguments, its model on its own
    device; a stop seen by any process stops them all, and a build resumes with any number of processes.
    """
    config.check()
    check_number("checkpoint_seconds", checkpoint_seconds, low=0)
    model.check_length(config.context_length, "a context (--context-length)")
    transcoders.check_model(model.n_layers, model.d_model)
    corpus_spec = corpus if isinstance(corpus, list) else [corpus]
    if next(_stream(model, corpus_spec, config, skip=0), None) is None:
        raise CircuitmapError(
            f"the corpus holds too little text for one context of {config.context_length} tokens"
        )

    def batches(skip: int) -> Iterator[Batch]:
        contexts = _stream(model, corpus_spec, config, skip)
        while (batch := _take(contexts, config.batch_size)) is not None:
            yield batch, None

    return _build(
        model,
        transcoders,
        path,
        config,
        [str(c) for c in corpus_spec],
        batches,
        model_name=model_name,
        transcoders_name=transcoders_name,
        progress=progress,
        checkpoint_seconds=checkpoint_seconds,
        stop=stop,
        rebuild=rebuild,
        group=group or ProcessGroup.from_environment(model.device),
    )


def build_features_from_activations(
    model: Model,
    transcoders: Transcoders,
    shards: Iterable[tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    config: BuildConfig,
    description: str,
    *,
    model_name: str | None = None,
    transcoders_name: str | None = None,
    progress: bool = True,
) -> BuildReport:
    """Build the feature database of ``transcoders`` from MLP inputs already computed, without running the
    model: ``shards`` yields contexts ``[n, T]`` and their MLP inputs ``[n, T − 1, L, d]`` at every position
    but the first (the layout a training run caches). ``description`` names the text in the database's
    settings. The dashboards show activations computed from these inputs (a training cache holds them in
    bfloat16, so values agree with the model's to about three digits). A finished database is rebuilt."""
    config.check()
    transcoders.check_model(model.n_layers, model.d_model)

    def batches(skip: int) -> Iterator[Batch]:
        """Batches of ``config.batch_size`` contexts whatever the shards' sizes (the random sample of
        contexts depends on the batches)."""
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen = 0
        for contexts, inputs in shards:
            if contexts.shape[1] != config.context_length:
                raise CircuitmapError(
                    f"the activations are of {contexts.shape[1]}-token contexts, not {config.context_length}"
                )
            if seen + len(contexts) > skip:
                start = max(0, skip - seen)
                held.append((contexts[start:], inputs[start:]))
            seen += len(contexts)
            while sum(len(c) for c, _ in held) >= config.batch_size:
                joined, inputs_joined = _joined(held)
                yield joined[: config.batch_size], inputs_joined[: config.batch_size]
                rest = joined[config.batch_size :], inputs_joined[config.batch_size :]
                held = [rest] if len(rest[0]) else []
        if held:
            yield _joined(held)

    return _build(
        model,
        transcoders,
        path,
        config,
        [description],
        batches,
        model_name=model_name,
        transcoders_name=transcoders_name,
        progress=progress,
        checkpoint_seconds=float("inf"),
        stop=None,
        rebuild=True,
        group=ProcessGroup(),
    )


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(parts) == 1:
        return parts[0]
    return torch.cat([c for c, _ in parts]), torch.cat([i for _, i in parts])


Batch = tuple[torch.Tensor, torch.Tensor | None]
"""Contexts ``[n, T]`` and, when already computed, their MLP inputs ``[n, T − 1, L, d]`` (else None: the
model is run)."""


def _build(
    model: Model,
    transcoders: Transcoders,
    path: str | Path,
    config: BuildConfig,
    sources: list[str],
    batches: Callable[[int], Iterator[Batch]],
    *,
    model_name: str | None,
    transcoders_name: str | None,
    progress: bool,
    checkpoint_seconds: float,
    stop: threading.Event | None,
    rebuild: bool,
    group: ProcessGroup,
) -> BuildReport:
    """The build loop of both entry points: ``batches(skip)`` yields the batches after the first ``skip``
    contexts; each round hands one batch to each process of ``group``."""
    path = Path(path)
    started = time.perf_counter()
    settings = json.dumps({**asdict(config), "corpus": sources}, sort_keys=True)
    device = _collective_device(group, model)
    meta = _opened(
        group,
        device,
        path,
        lambda: _open_or_create(
            path, model, transcoders, settings, model_name, transcoders_name, config, rebuild
        ),
    )
    if meta["status"] == "complete":
        return BuildReport(
            path,
            int(meta["tokens_done"]),
            0,
            0,
            0,
            False,
            time.perf_counter() - started,
            already_complete=True,
        )
    connection = schema.connect(path, readonly=False) if group.main else None
    try:
        state = _load_state(connection, transcoders.n_layers, transcoders.d_features, config)
        contexts_done = int(meta["contexts_done"])
        source = batches(contexts_done)
        needed = math.ceil(config.tokens / (config.context_length - 1))
        bar = tqdm(
            total=needed * (config.context_length - 1),
            initial=contexts_done * (config.context_length - 1),
            unit="tok",
            unit_scale=True,
            desc="features",
            disable=not (progress and group.main),
            dynamic_ncols=True,
        )
        pending: list[tuple[int, torch.Tensor]] = []
        last_save = time.monotonic()
        exhausted = False
        with bar:
            while contexts_done < needed:
                stopping, saving = _agreed(
                    group,
                    device,
                    stop is not None and stop.is_set(),
                    time.monotonic() - last_save >= checkpoint_seconds,
                )
                if stopping or saving:
                    _save(group, device, connection, state, pending, contexts_done, config)
                    last_save = time.monotonic()
                if stopping:
                    tokens = contexts_done * (config.context_length - 1)
                    raise Interrupted(
                        f"stopped after {tokens:,} tokens, saved in {path}; run the same command to resume"
                    )
                round_batches = _next_round(source, group.world, contexts_done, needed)
                if not round_batches:
                    exhausted = True
                    break
                for rank, (ids, batch, inputs) in enumerate(round_batches):
                    if rank == group.rank:
                        _process(model, transcoders, state, batch, inputs, ids, config)
                    if group.main:
                        pending.extend(zip(ids.tolist(), batch, strict=True))
                    contexts_done += len(batch)
                    bar.update(len(batch) * (config.context_length - 1))
        _save(group, device, connection, state, pending, contexts_done, config)
        tokens = contexts_done * (config.context_length - 1)
        seconds = time.perf_counter() - started
        if not group.main:
            return BuildReport(path, tokens, contexts_done, 0, 0, exhausted, seconds)
        if exhausted:
            print(
                f"the corpus has only {tokens:,} tokens ({config.tokens:,} asked for); "
                "the dashboards keep what it holds",
                file=sys.stderr,
            )
        finishing = time.perf_counter()
        short, dead = _finish(connection, model, transcoders, state, config, tokens, progress)
        connection.execute("VACUUM")  # gives back the space the build state held
        finish_seconds = time.perf_counter() - finishing
    finally:
        if connection is not None:
            connection.close()
    seconds = time.perf_counter() - started
    return BuildReport(path, tokens, contexts_done, short, dead, exhausted, seconds, finish_seconds)


def _next_round(
    source: Iterator[Batch], world: int, done: int, needed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The next batches as (context ids, contexts, MLP inputs or None), one for each of ``world`` processes
    in rank order; fewer where the corpus ends or the build reaches ``needed`` contexts (after ``done``)."""
    batches = []
    while len(batches) < world and done < needed:
        batch, inputs = next(source, (None, None))
        if batch is None:
            break
        batch = batch[: needed - done]
        ids = torch.arange(done, done + len(batch))
        batches.append((ids, batch, None if inputs is None else inputs[: len(batch)]))
        done += len(batch)
    return batches


def _collective_device(group: ProcessGroup, model: Model) -> torch.device:
    """Where the tensors the processes exchange live: the GPU under NCCL, else the CPU."""
    if group.world > 1 and dist.get_backend() == "nccl":
        return model.device
    return torch.device("cpu")


def _opened(
    group: ProcessGroup, device: torch.device, path: Path, open_database: Callable[[], dict[str, str]]
) -> dict[str, str]:
    """The database's metadata from ``open_database``, which the main process alone calls; the others
    learn the status and progress it found, or that it refused the database."""
    if group.world == 1:
        return open_database()
    meta: dict[str, str] = {}
    refusal = None
    if group.main:
        try:
            meta = open_database()
        except Exception as error:  # the others must hear of it before it is raised
            refusal = error
    found = [
        refusal is not None,
        meta.get("status") == "complete",
        int(meta.get("contexts_done", "0")),
        int(meta.get("tokens_done", "0")),
    ]
    values = torch.tensor(found, dtype=torch.long, device=device)
    dist.broadcast(values, src=0)
    if refusal is not None:
        raise refusal
    refused, complete, contexts_done, tokens_done = values.tolist()
    if refused:
        raise CircuitmapError(f"{path}: the main process refused the database (its error says why)")
    if group.main:
        return meta
    status = "complete" if complete else "building"
    return {"status": status, "contexts_done": str(contexts_done), "tokens_done": str(tokens_done)}


def _agreed(group: ProcessGroup, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag, raised if any process raised it."""
    if group.world == 1:
        return list(flags)
    raised = group.max(torch.tensor([float(flag) for flag in flags], device=device))
    return [bool(value) for value in raised.tolist()]


def _save(
    group: ProcessGroup,
    device: torch.device,
    connection: sqlite3.Connection | None,
    state: list[LayerStatistics],
    pending: list[tuple[int, torch.Tensor]],
    contexts_done: int,
    config: BuildConfig,
) -> None:
    """A checkpoint: every process's statistics merged into the main process's, which saves them with the
    contexts read and the progress; the other processes start their share of the statistics anew."""
    if group.world > 1:
        for layer, statistics in enumerate(state):
            shares = {name: _gathered(group, device, tensor) for name, tensor in statistics.tensors().items()}
            if not group.main:
                state[layer] = LayerStatistics.empty(
                    statistics.active.shape[0], config.top, config.samples, config.window
                )
                continue
            for rank in range(1, group.world):
                statistics.combine(
                    LayerStatistics.from_tensors({name: parts[rank] for name, parts in shares.items()})
                )
    if connection is not None:
        _checkpoint(connection, state, pending, contexts_done, config)


def _gathered(group: ProcessGroup, device: torch.device, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` in rank order, on the main process's CPU (nothing elsewhere)."""
    local = tensor.to(device)
    parts = [torch.empty_like(local) for _ in range(group.world)] if group.main else None
    dist.gather(local, parts, dst=0)
    return [part.cpu() for part in parts] if parts is not None else []


def _open_or_create(
    path: Path,
    model: Model,
    transcoders: Transcoders,
    settings: str,
    model_name: str | None,
    transcoders_name: str | None,
    config: BuildConfig,
    rebuild: bool,
) -> dict[str, str]:
    """The database's metadata, creating the file (atomically, by renaming a finished one into place) when
    there is none, when ``rebuild``, or when an unfinished build of other settings has read nothing."""
    if path.exists() and not rebuild:
        connection = schema.connect(path, readonly=True)
        try:
            meta = schema.read_meta(connection, path)
        finally:
            connection.close()
        schema.check_transcoders(meta, transcoders, path)
        unfinished = meta["status"] != "complete"
        if not (unfinished and meta["settings"] != settings):
            return meta
        if int(meta.get("contexts_done", "0") or 0) > 0:
            raise CircuitmapError(
                f"{path}: an unfinished build with other settings "
                f"({_difference(meta['settings'], settings)}); "
                "resume it with its own settings, or pass --rebuild to start over"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "status": "building",
        "fingerprint": transcoders.fingerprint(),
        "model": model_name or model.name,
        "transcoders": transcoders_name or "transcoders",
        "kind": transcoders.kind,
        "n_layers": str(transcoders.n_layers),
        "d_features": str(transcoders.d_features),
        "d_model": str(transcoders.d_model),
        "settings": settings,
        "tokens": str(config.tokens),
        "tokens_done": "0",
        "contexts_done": "0",
        "quantiles": str(config.quantiles),
        "histogram_edges": json.dumps(histogram_edges()),
        "created": now(),
        "circuitmap_version": __version__,
    }

    def create(temporary: Path) -> None:
        connection = sqlite3.connect(temporary)
        try:
            schema.create(connection, meta)
            with connection:
                rows = enumerate(model.vocabulary())
                connection.executemany("INSERT INTO vocab (id, text) VALUES (?, ?)", rows)
        finally:
            connection.close()

    atomic_write(path, create)
    return meta


def _difference(stored: str, wanted: str) -> str:
    old, new = json.loads(stored), json.loads(wanted)
    return ", ".join(
        f"{key} {old.get(key)} → {new.get(key)}" for key in sorted(new) if old.get(key) != new[key]
    )


def _stream(model: Model, corpus: list, config: BuildConfig, skip: int) -> Iterator[torch.Tensor]:
    contexts = pack_contexts(iter_documents(corpus), model.tokenizer, config.context_length)
    for _ in range(skip):
        if next(contexts, None) is None:
            break
    return contexts


def _take(contexts: Iterator[torch.Tensor], n: int) -> torch.Tensor | None:
    batch = [context for _, context in zip(range(n), contexts, strict=False)]
    return torch.stack(batch) if batch else None


def _process(
    model: Model,
    transcoders: Transcoders,
    state: list[LayerStatistics],
    batch: torch.Tensor,
    inputs: torch.Tensor | None,
    ids: torch.Tensor,
    config: BuildConfig,
) -> None:
    """Fold one batch's activations into every layer's running statistics, running the model for its MLP
    inputs unless ``inputs`` ``[n, T − 1, L, d]`` holds them."""
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + int(ids[0])) % 2**63)
    with torch.inference_mode():
        cache = None if inputs is not None else model.activations(batch, points=["mlp_in"])
        for layer, statistics in enumerate(state):
            if inputs is None:
                acts = transcoders.encode(layer, cache["mlp_in", layer]).to("cpu", torch.float32)
            else:
                encoded = transcoders.encode(layer, inputs[:, :, layer].to(model.device, model.dtype))
                acts = torch.nn.functional.pad(encoded, (0, 0, 1, 0)).to("cpu", torch.float32)  # position 0
            acts[:, 0] = 0
            keys = torch.rand(len(batch), transcoders.d_features, generator=generator)
            statistics.update(acts, ids, keys, config.before)


def _load_state(
    connection: sqlite3.Connection | None, n_layers: int, d_features: int, config: BuildConfig
) -> list[LayerStatistics]:
    """The saved running statistics, or empty ones for a new build and for the processes other than the
    main one (``connection`` None), which count only what they read from now on."""
    blobs = {} if connection is None else dict(connection.execute("SELECT layer, tensors FROM build_state"))
    if not blobs:
        return [
            LayerStatistics.empty(d_features, config.top, config.samples, config.window)
            for _ in range(n_layers)
        ]
    return [LayerStatistics.from_tensors(load_tensors(blobs[layer])) for layer in range(n_layers)]


def _checkpoint(
    connection: sqlite3.Connection,
    state: list[LayerStatistics],
    pending: list[tuple[int, torch.Tensor]],
    contexts_done: int,
    config: BuildConfig,
) -> None:
    """Save the running state, the new contexts and the progress in one transaction."""
    with connection:
        connection.executemany(
            "INSERT OR REPLACE INTO contexts (id, tokens) VALUES (?, ?)",
            [(id_, tokens.numpy().astype("<i4").tobytes()) for id_, tokens in pending],
        )
        connection.executemany(
            "INSERT OR REPLACE INTO build_state (layer, tensors) VALUES (?, ?)",
            [(layer, save_tensors(statistics.tensors())) for layer, statistics in enumerate(state)],
        )
        connection.executemany(
            "UPDATE meta SET value = ? WHERE key = ?",
            [
                (str(contexts_done), "contexts_done"),
                (str(contexts_done * (config.context_length - 1)), "tokens_done"),
            ],
        )
    pending.clear()


def _finish(
    connection: sqlite3.Connection,
    model: Model,
    transcoders: Transcoders,
    state: list[LayerStatistics],
    config: BuildConfig,
    tokens: int,
    progress: bool,
) -> tuple[int, int]:
    """Write every feature's dashboard, the search index and the automatic labels; mark the build complete.
    Returns the number of features with fewer than ``top`` contexts, and of features never active."""
    context_tokens = _all_contexts(connection, config.context_length)
    strings = model.vocabulary()
    space = TokenSpace.of_model(model)
    namer = model_namer(model) if config.concept_names else None
    short = dead = 0
    d_features = transcoders.d_features
    created = now()
    with connection:
        connection.execute("DELETE FROM features")
        connection.execute("DELETE FROM examples")
        connection.execute("DELETE FROM search")
        connection.execute("DELETE FROM labels WHERE source = 'auto'")
        for layer in tqdm(range(transcoders.n_layers), desc="dashboards", disable=not progress, leave=False):
            statistics = state[layer]
            top, sample = statistics.top.ranked(), statistics.sample.ranked()
            output = layer_output_lens(model, transcoders, layer, config.lens_tokens)
            inputs = layer_input_lens(model, transcoders, layer, config.lens_tokens)
            counts = (top.contexts >= 0).sum(0)
            short += int((counts < config.top).sum())
            dead += int((counts == 0).sum())
            peaks = peak_tokens(top, context_tokens)
            labels = automatic_labels(
                top, peaks, peak_tokens(top, context_tokens, 1), output[0], strings, space
            )
            if namer is not None:
                labels.update(name_concepts(labels, namer))
            connection.executemany(
                "INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _feature_rows(layer, statistics, top, output, inputs, tokens),
            )
            connection.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [*_example_rows(layer, "top", top), *_example_rows(layer, "sample", sample)],
            )
            connection.executemany(
                "INSERT INTO labels (layer, feature, source, text, confidence, author, created, evidence) "
                "VALUES (?, ?, 'auto', ?, ?, NULL, ?, ?)",
                [
                    (layer, feature, label.text, label.confidence, created, json.dumps(label.evidence))
                    for feature, label in labels.items()
                ],
            )
            connection.executemany(
                "INSERT INTO search (rowid, label, tokens) VALUES (?, '', ?)",
                [
                    (layer * d_features + feature, text)
                    for feature, text in enumerate(_search_tokens(peaks, output, inputs, strings))
                ],
            )
        manual = connection.execute("SELECT DISTINCT layer, feature FROM labels").fetchall()
        refresh_search_labels(connection, {(layer, feature) for layer, feature in manual}, d_features)
        referenced = {
            int(c) for s in state for lst in (s.top, s.sample) for c in lst.contexts.unique().tolist()
        }
        kept = sorted(c for c in referenced if c >= 0)
        connection.execute("CREATE TEMP TABLE keep (id INTEGER PRIMARY KEY)")
        connection.executemany("INSERT INTO keep VALUES (?)", [(c,) for c in kept])
        connection.execute("DELETE FROM contexts WHERE id NOT IN (SELECT id FROM keep)")
        connection.execute("DROP TABLE keep")
        connection.execute("DELETE FROM build_state")
        connection.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [
                ("status", "complete"),
                ("completed", now()),
                ("short_features", str(short)),
                ("dead_features", str(dead)),
            ],
        )
    return short, dead


def _all_contexts(connection: sqlite3.Connection, context_length: int) -> torch.Tensor:
    """Token ids of every stored context, ``[n, T]`` indexed by context id (contexts are numbered from 0)."""
    rows = connection.execute("SELECT id, tokens FROM contexts ORDER BY id").fetchall()
    tokens = torch.full((len(rows), context_length), -1, dtype=torch.long)
    for id_, blob in rows:
        tokens[id_] = torch.from_numpy(np.frombuffer(blob, dtype="<i4").astype(np.int64))
    return tokens


def _feature_rows(layer, statistics, top, output, inputs, tokens):
    """Rows of the ``features`` table for every feature of one layer."""
    top_ids, top_values, bottom_ids, bottom_values = (t.numpy() for t in output)
    input_ids, input_values = (t.numpy() for t in inputs)
    maxima = torch.where(top.contexts[0] >= 0, top.maxima[0], 0.0).tolist()
    active = statistics.active
    mean = torch.where(active > 0, statistics.total / active.clamp(min=1), 0.0).tolist()
    histogram = statistics.histogram.numpy()
    for feature, count in enumerate(active.tolist()):
        first, counts = trim_histogram(histogram[feature])
        yield (
            layer,
            feature,
            count,
            count / tokens if tokens else 0.0,
            maxima[feature],
            mean[feature],
            first,
            counts,
            pack_tokens(top_ids[feature], top_values[feature]),
            pack_tokens(bottom_ids[feature], bottom_values[feature]),
            pack_tokens(input_ids[feature], input_values[feature]),
        )


def trim_histogram(counts: np.ndarray) -> tuple[int, bytes]:
    """The first non-empty bin and the counts from there to the last non-empty one (int64)."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0, b""
    return int(nonzero[0]), counts[nonzero[0] : nonzero[-1] + 1].astype("<i8").tobytes()


def pack_tokens(ids: np.ndarray, values: np.ndarray) -> bytes:
    """Token ids (int32) followed by their values (float32), as one blob."""
    return ids.astype("<i4").tobytes() + values.astype("<f4").tobytes()


def _example_rows(layer: int, kind: str, contexts):
    """Rows of the ``examples`` table (the windows zlib-compressed) for one list of one layer."""
    valid = (contexts.contexts >= 0).numpy()
    ids, starts = contexts.contexts.numpy(), contexts.starts.numpy()
    maxima, windows = contexts.maxima.numpy(), contexts.windows.numpy()
    for feature in range(ids.shape[1]):
        keep = valid[:, feature]
        yield (
            layer,
            feature,
            kind,
            ids[keep, feature].astype("<i8").tobytes(),
            starts[keep, feature].astype("<i8").tobytes(),
            maxima[keep, feature].astype("<f4").tobytes(),
            zlib.compress(windows[keep, feature].astype("<f4").tobytes(), 1),
        )


def _search_tokens(peaks: torch.Tensor, output, inputs, strings: list[str]) -> list[str]:
    """Per feature, the distinct tokens that characterise it (``peaks``: the peak tokens of its top contexts;
    its top output and input tokens), as text for the search index."""
    texts = []
    for feature in range(peaks.shape[1]):
        ids = [*peaks[:, feature].tolist(), *output[0][feature].tolist(), *inputs[0][feature].tolist()]
        seen = dict.fromkeys(strings[i].strip() for i in ids if i >= 0)
        texts.append(" | ".join(token for token in seen if token))
    return texts


def peak_tokens(top, context_tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Token id at each listed context's maximum (plus ``offset`` positions), ``[size, F]``; -1 where empty or
    beyond the context."""
    valid = top.contexts >= 0
    position = top.starts + top.windows.argmax(-1) + offset
    inside = valid & (position < context_tokens.shape[1])
    rows = context_tokens[top.contexts.clamp(min=0), position.clamp(max=context_tokens.shape[1] - 1)]
    return torch.where(inside, rows, -1)

"""Many prompts → one graph folder each, resumable, shared among processes, then a summary table.

1. Read the prompts (``read_prompts``): one JSON object per line with ``prompt`` and, optionally, ``id``
   (or ``name``), the folder's name, and ``targets``. Every prompt is checked, against the model too (its
   length, its target tokens), before any graph is computed; an error names the line.
2. Record what each graph depends on: the prompt, its targets, the model, the transcoder set's fingerprint
   and the attribution, pruning and grouping settings. A folder whose graph carries that record (in
   ``info["batch"]``) is finished and skipped; any other is computed, replacing what the folder held.
3. Prompt i goes to process i mod N under torchrun (one device each), all of them to a single process.
   Each graph is computed by the pipeline of ``attribute`` (``pipeline.compute_graph``) and its folder is
   written as one unit, so an interrupted run leaves finished folders and never a half one.
4. The main process, its own share done, waits until every prompt's folder is finished: it watches the
   folders rather than waiting in a collective operation, which would time out when the processes' shares
   take very different times. Then it reads each graph's viewer document and writes the summary: per
   prompt its scores and its most influential features (the document ranks them), with their labels,
   as ``summary.json`` and the table of ``summary.md``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from circuitmap.atomic import atomic_write
from circuitmap.attribution import AttributionConfig
from circuitmap.attribution.compute import check_inputs
from circuitmap.attribution.progress import ProgressCallback
from circuitmap.attribution.targets import TargetSpec, token_id
from circuitmap.config import Settings
from circuitmap.errors import CircuitmapError, GraphFileError, Interrupted
from circuitmap.features import FeatureStore
from circuitmap.graphs import NodeKind
from circuitmap.graphs.export import FEATURE_TYPES, prompt_slug
from circuitmap.graphs.files import read_graph_info
from circuitmap.graphs.folder import GraphFolder
from circuitmap.graphs.ids import parse_node_id
from circuitmap.graphs.pruning import PruneConfig
from circuitmap.models import Model
from circuitmap.pipeline import compute_graph
from circuitmap.training.distributed import world_size
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_number, check_text

SUMMARY_JSON = "summary.json"
SUMMARY_TABLE = "summary.md"
PROMPT_KEYS = ("prompt", "id", "name", "targets")
"""The keys a line of a prompts file may have."""
MAX_NAME_BYTES = 200
"""The longest folder name (UTF-8 bytes): with the hidden staging folder's suffix it stays within what
file systems allow."""
WAIT_SECONDS = 0.5
"""How often the main process looks at the other processes' folders."""


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of a batch and the folder its graph goes to."""

    name: str
    """The graph folder's name inside the batch's folder."""
    prompt: str
    """The text whose graph is computed."""
    targets: tuple[TargetSpec, ...] = ()
    """Explicit targets, each a token (text or id) or a pair of tokens (their logit difference); none: the
    salient logits."""
    source: str = ""
    """Where it was read from, as errors name it: ``FILE, line N`` (empty: given otherwise)."""

    @property
    def where(self) -> str:
        """How errors name it: its file and line, else its name."""
        return self.source or f"prompt {self.name!r}"


@dataclass(frozen=True)
class BatchConfig(Settings):
    """How a batch of graphs is made and summarised, besides the attribution and pruning settings."""

    top: int = 5
    """Most influential features listed per prompt in the summary."""
    groups: bool = True
    """Group each graph's kept features into named supernodes."""

    def check(self) -> None:
        """A one-line error for a setting out of range."""
        check_number("top", self.top, low=1, whole=True)


@dataclass(frozen=True)
class BatchReport:
    """What a batch did in this process; the main process also has every prompt's summary row."""

    computed: list[str]
    """Folders this process computed (their names)."""
    skipped: list[str]
    """Folders of this process's share that were already finished."""
    rows: list[dict] = field(default_factory=list)
    """The summary of every prompt, in the prompts' order (main process only)."""
    files: list[Path] = field(default_factory=list)
    """The summary files written (main process only)."""


def read_prompts(path: str | Path) -> list[BatchPrompt]:
    """The prompts of a JSON-lines file (blank lines are skipped); a one-line error naming the line for a
    line that is not a JSON object with a non-empty ``prompt``, for unknown keys, bad targets, folder names
    that cannot be used, and names given twice."""
    path = Path(path)
    if not path.is_file():
        raise CircuitmapError(f"{path}: no such prompts file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CircuitmapError(f"{path}: not UTF-8 text ({error.reason})") from None
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise CircuitmapError(f'{path}: no prompts (one JSON object per line, with a "prompt")')
    width = max(3, len(str(len(numbered))))
    prompts = []
    for ordinal, (number, line) in enumerate(numbered, start=1):
        source = f"{path}, line {number}"
        try:
            prompts.append(_prompt(line, source, ordinal, width))
        except CircuitmapError as error:
            raise CircuitmapError(f"{source}: {error}") from None
    check_names(prompts)
    return prompts


def _prompt(line: str, source: str, ordinal: int, width: int) -> BatchPrompt:
    """One line's prompt; its folder is named ``id`` or ``name``, else by its place and its slug."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise CircuitmapError(f"not valid JSON ({error})") from None
    if not isinstance(entry, dict):
        raise CircuitmapError(f'expected a JSON object with a "prompt", got {type(entry).__name__}')
    unknown = sorted(set(entry) - set(PROMPT_KEYS))
    if unknown:
        raise CircuitmapError(f"unknown key {unknown[0]!r} (known: {', '.join(PROMPT_KEYS)})")
    if "prompt" not in entry:
        raise CircuitmapError('no "prompt"')
    prompt = check_text("the prompt", entry["prompt"])
    if "id" in entry and "name" in entry:
        raise CircuitmapError('give "id" or "name", not both')
    name = entry.get("id", entry.get("name"))
    if name is None:
        slug = prompt_slug(prompt)[:40].rstrip("-")
        name = f"{ordinal:0{width}d}" + (f"-{slug}" if slug else "")
    elif isinstance(name, int) and not isinstance(name, bool):
        name = str(name)
    targets = entry.get("targets", [])
    if not isinstance(targets, list):
        raise CircuitmapError('"targets" must be a list of tokens and [A, B] pairs')
    return BatchPrompt(name=name, prompt=prompt, targets=tuple(map(_target, targets)), source=source)


def _target(value: object) -> TargetSpec:
    """A target of a prompts file: a token (text or id), or a pair ``[A, B]`` of them."""
    if _is_token(value):
        return value
    if isinstance(value, list) and len(value) == 2 and all(map(_is_token, value)):
        return (value[0], value[1])
    raise CircuitmapError(f"a target is a token (text or id) or a pair [A, B] of tokens, got {value!r}")


def _is_token(value: object) -> bool:
    return (isinstance(value, str) and value != "") or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def check_names(prompts: Sequence[BatchPrompt]) -> None:
    """A one-line error for a folder name that cannot be used (a path, hidden, too long, a summary file's)
    or that two prompts share."""
    seen: dict[str, BatchPrompt] = {}
    for prompt in prompts:
        name = prompt.name
        check_text(f"{prompt.where}: the folder name", name)
        if (
            "/" in name
            or "\\" in name
            or "\0" in name
            or name.startswith(".")
            or name != name.strip()
            or name in (SUMMARY_JSON, SUMMARY_TABLE)
            or len(name.encode("utf-8")) > MAX_NAME_BYTES
        ):
            raise CircuitmapError(
                f"{prompt.where}: {name[:60]!r} is not a plain folder name (no slash, no leading dot, at "
                f"most {MAX_NAME_BYTES} bytes, neither {SUMMARY_JSON} nor {SUMMARY_TABLE})"
            )
        if name in seen:
            raise CircuitmapError(
                f"{prompt.where}: the folder name {name!r} is also that of {seen[name].where}"
            )
        seen[name] = prompt


def check_prompts(
    model: Model, transcoders: Transcoders, prompts: Sequence[BatchPrompt], attribution: AttributionConfig
) -> None:
    """A one-line error naming the prompt for one that ``attribute`` would refuse at once: too short or too
    long for the model, or a target that is not a single token."""
    for prompt in prompts:
        try:
            check_inputs(model, transcoders, model.encode(prompt.prompt), attribution)
            for target in prompt.targets:
                for token in target if isinstance(target, tuple) else (target,):
                    token_id(model, token)
        except CircuitmapError as error:
            raise CircuitmapError(f"{prompt.where}: {error}") from None


def attribute_batch(
    model: Model,
    transcoders: Transcoders,
    prompts: Sequence[BatchPrompt] | str | Path,
    out: str | Path,
    attribution: AttributionConfig | None = None,
    pruning: PruneConfig | None = None,
    config: BatchConfig | None = None,
    *,
    features: FeatureStore | None = None,
    check_memory: bool = False,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> BatchReport:
    """The graph folder of every prompt (a list, or a prompts file for ``read_prompts``) in ``out``, and the
    summary (see the module docstring).

    ``features``: the feature database whose labels name the feature nodes. ``check_memory``: refuse a
    prompt whose estimated peak memory exceeds the free memory. Setting ``stop`` ends the batch after the
    current attribution step with ``Interrupted``; the finished folders stay, and running again resumes.
    Under torchrun every process calls this with the same arguments, its model on its own device.
    """
    attribution = attribution or AttributionConfig()
    pruning = pruning or PruneConfig()
    config = config or BatchConfig()
    attribution.check()
    pruning.check()
    config.check()
    if isinstance(prompts, str | Path):
        prompts = read_prompts(prompts)
    else:
        check_names(prompts)
    check_prompts(model, transcoders, prompts, attribution)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CircuitmapError(f"{out} exists and is not a folder")
    settings = {
        "model": model.name,
        "transcoders": transcoders.fingerprint(),
        "attribution": attribution.to_dict(),
        "pruning": pruning.to_dict(),
        "groups": config.groups,
    }
    records = [_record(prompt, settings) for prompt in prompts]
    rank, world = int(os.environ.get("RANK", "0")), world_size()
    mine = list(range(rank, len(prompts), world))
    main = rank == 0
    computed: list[str] = []
    skipped: list[str] = []
    bar = tqdm(
        total=len(prompts), desc="graphs", unit="graph", disable=not (progress and main), dynamic_ncols=True
    )
    with bar:
        for index in mine:
            prompt, record = prompts[index], records[index]
            folder = GraphFolder(out / prompt.name)
            if stop is not None and stop.is_set():
                raise _stopped(prompt, len(computed) + len(skipped), len(mine), out)
            if _finished(folder, record):
                skipped.append(prompt.name)
                bar.update(1)
                continue
            try:
                result = compute_graph(
                    model,
                    transcoders,
                    prompt.prompt,
                    attribution,
                    pruning,
                    targets=list(prompt.targets) or None,
                    features=features,
                    groups=config.groups,
                    check_memory=check_memory,
                    progress=False if bar.disable else _stage_shower(bar, prompt.name),
                    stop=stop,
                )
            except Interrupted:
                raise _stopped(prompt, len(computed) + len(skipped), len(mine), out) from None
            except CircuitmapError as error:
                raise CircuitmapError(f"{prompt.where}: {error}") from None
            for info in (result.graph.info, result.document["metadata"]["info"]):
                info["batch"] = record
            folder.write(result.graph, result.document)
            computed.append(prompt.name)
            bar.update(1)
        if not main:
            return BatchReport(computed, skipped)
        others = [index for index in range(len(prompts)) if index % world != rank]
        _wait_for(out, [(prompts[index], records[index]) for index in others], bar, stop)
    rows = [_summary_row(prompt, GraphFolder(out / prompt.name), config.top) for prompt in prompts]
    files = _write_summary(out, settings, rows)
    return BatchReport(computed, skipped, rows, files)


def _stage_shower(bar: tqdm, name: str) -> ProgressCallback:
    """A progress callback that shows the current graph's stage beside the bar."""

    def show(stage: str, done: int, total: int) -> None:
        bar.set_postfix_str(f"{name}: {stage} {done}/{total}")

    return show


def _stopped(prompt: BatchPrompt, done: int, share: int, out: Path) -> Interrupted:
    return Interrupted(
        f"stopped at {prompt.where} with {done} of {share} graphs finished in {out}; run the same command to "
        "resume"
    )


def _wait_for(
    out: Path, pending: list[tuple[BatchPrompt, dict]], bar: tqdm, stop: threading.Event | None
) -> None:
    """Wait until the folders of the other processes' prompts (each with its record) are finished."""
    while True:
        left = [
            (prompt, record)
            for prompt, record in pending
            if not _finished(GraphFolder(out / prompt.name), record)
        ]
        bar.update(len(pending) - len(left))
        pending = left
        if not pending:
            return
        if stop is not None and stop.is_set():
            raise Interrupted(
                f"stopped while waiting for {len(pending)} graphs of the other processes in {out}; run the "
                "same command to resume"
            )
        time.sleep(WAIT_SECONDS)


def _record(prompt: BatchPrompt, settings: dict) -> dict:
    """What the graph of ``prompt`` depends on, as its JSON round trip (the form a graph file gives back)."""
    return json.loads(json.dumps({"prompt": prompt.prompt, "targets": list(prompt.targets), **settings}))


def _finished(folder: GraphFolder, record: dict) -> bool:
    """Whether ``folder`` holds a whole graph made from ``record``."""
    if not (folder.has_graph() and folder.has_document()):
        return False
    try:
        return read_graph_info(folder.graph_file).get("batch") == record
    except GraphFileError:
        return False


def _summary_row(prompt: BatchPrompt, folder: GraphFolder, top: int) -> dict:
    """A prompt's line of the summary, read from its graph's viewer document: targets, node counts, both
    scores of the full and the pruned graph, and the ``top`` most influential features, most influential
    first, each with its ``cumulative_influence``: the document's ``influence``, the share of the graph's
    influence held by the nodes ranked above it."""
    document = folder.read_document()
    metadata, nodes = document["metadata"], document["nodes"]
    tokens = metadata["prompt_tokens"]
    ranked = sorted(
        (
            node
            for node in nodes
            if node["feature_type"] == FEATURE_TYPES[NodeKind.FEATURE] and node["influence"] is not None
        ),
        key=lambda node: node["influence"],
    )
    features = []
    for node in ranked[:top]:
        ref = parse_node_id(node["node_id"])
        features.append(
            {
                "node_id": node["node_id"],
                "layer": ref.layer,
                "feature": ref.index,
                "position": ref.position,
                "token": tokens[ref.position],
                "activation": node["activation"],
                "cumulative_influence": node["influence"],
                "label": node["clerp"],
            }
        )
    scores = metadata["scores"]
    return {
        "name": prompt.name,
        "prompt": prompt.prompt,
        "tokens": len(tokens),
        "targets": [
            node["clerp"] for node in nodes if node["feature_type"] == FEATURE_TYPES[NodeKind.TARGET]
        ],
        "nodes": {"full": metadata["n_nodes"]["full"], "pruned": metadata["n_nodes"]["exported"]},
        "replacement": {"full": scores["full"]["replacement"], "pruned": scores["exported"]["replacement"]},
        "completeness": {
            "full": scores["full"]["completeness"],
            "pruned": scores["exported"]["completeness"],
        },
        "top_features": features,
    }


def summary_table(rows: Sequence[dict]) -> str:
    """The summary rows as a Markdown table: graph, prompt, both scores (full / pruned) and the most
    influential features (``layer/feature@position 'token'``, with the label where there is one)."""
    header = ["graph", "prompt", "replacement (full / pruned)", "completeness (full / pruned)"]
    lines = ["| " + " | ".join([*header, "most influential features"]) + " |", "|---" * 5 + "|"]
    for row in rows:
        features = "; ".join(
            f"{f['layer']}/{f['feature']}@{f['position']} {f['token']!r}"
            + (f" ({f['label']})" if f["label"] else "")
            for f in row["top_features"]
        )
        cells = [
            row["name"],
            row["prompt"],
            f"{_score(row['replacement']['full'])} / {_score(row['replacement']['pruned'])}",
            f"{_score(row['completeness']['full'])} / {_score(row['completeness']['pruned'])}",
            features,
        ]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def _write_summary(out: Path, settings: dict, rows: list[dict]) -> list[Path]:
    """``summary.json`` (the settings and every row) and ``summary.md`` (the table), each written whole."""
    document = json.dumps({"settings": settings, "prompts": rows}, indent=1, ensure_ascii=False)
    table = summary_table(rows) + "\n"
    return [
        atomic_write(out / SUMMARY_JSON, lambda path: path.write_text(document, encoding="utf-8")),
        atomic_write(out / SUMMARY_TABLE, lambda path: path.write_text(table, encoding="utf-8")),
    ]

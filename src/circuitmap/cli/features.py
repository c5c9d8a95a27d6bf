"""``features``: build a transcoder set's feature database, and read, search, label and export it.

``features build`` also runs under torchrun, one process per device: the processes share the corpus's
batches and the main one writes the database (``circuitmap.features.build``).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from circuitmap.atomic import check_writable
from circuitmap.cache import default_database_path
from circuitmap.cli import (
    add_model_args,
    add_settings,
    load_model_from_args,
    positive_int,
    settings_from,
    stop_on_signals,
)
from circuitmap.errors import CircuitmapError
from circuitmap.features import BuildConfig, FeatureStore, build_features
from circuitmap.features.llm_labels import build_prompt, label_features
from circuitmap.features.neuronpedia import export_neuronpedia
from circuitmap.training.distributed import ProcessGroup, process_device
from circuitmap.transcoders import load_transcoders
from circuitmap.validation import check_number


def register(commands) -> None:
    parser = commands.add_parser("features", help="feature dashboards and labels of a transcoder set")
    sub = parser.add_subparsers(dest="features_command", required=True, metavar="COMMAND")

    build = sub.add_parser("build", help="build (or resume) the feature database from a corpus")
    add_model_args(build)
    build.add_argument("--transcoders", required=True, help="transcoder set (folder, npz or hub reference)")
    build.add_argument(
        "--corpus",
        required=True,
        action="append",
        help="text/jsonl file, folder, glob or hf:dataset (repeatable)",
    )
    build.add_argument("--db", help="database file (default: the cache, named by the set's fingerprint)")
    add_settings(build, BuildConfig)
    build.add_argument(
        "--checkpoint-minutes", type=float, default=5.0, help="how often progress is saved (default 5)"
    )
    build.add_argument(
        "--rebuild", action="store_true", help="build from scratch, replacing the database (finished or not)"
    )
    build.set_defaults(run=_build)

    show = sub.add_parser("show", help="print one feature's dashboard")
    show.add_argument("db", help="feature database file")
    show.add_argument("layer", type=int)
    show.add_argument("feature", type=int)
    show.add_argument("--json", action="store_true", help="print the dashboard as JSON")
    show.set_defaults(run=_show)

    search = sub.add_parser("search", help="find features by label or token (or LAYER/FEATURE)")
    search.add_argument("db", help="feature database file")
    search.add_argument("text")
    search.add_argument("--limit", type=positive_int, default=20)
    search.set_defaults(run=_search)

    label = sub.add_parser("label", help="set a feature's manual label (empty text clears it)")
    label.add_argument("db", help="feature database file")
    label.add_argument("layer", type=int)
    label.add_argument("feature", type=int)
    label.add_argument("text")
    label.add_argument("--author", help="who labelled it (default: the user name)")
    label.set_defaults(run=_label)

    export = sub.add_parser("export", help="write features in Neuronpedia's layout")
    export.add_argument("db", help="feature database file")
    export.add_argument(
        "out", help="a .json file for one feature, otherwise a folder (dataset-export layout)"
    )
    _add_selection(export)
    export.add_argument("--model-id", help="Neuronpedia model id (default: from the database)")
    export.add_argument(
        "--source-set",
        help="source set name; records go under {layer}-{source set} (default: from the database)",
    )
    export.add_argument("--creator-id", help="your Neuronpedia user id, for creatorId and authorId")
    export.add_argument("--no-progress", action="store_true")
    export.set_defaults(run=_export)

    llm = sub.add_parser("label-llm", help="label features with a model behind an OpenAI-compatible endpoint")
    llm.add_argument("db", help="feature database file")
    _add_selection(llm)
    llm.add_argument("--all", action="store_true", help="label every feature of the set")
    llm.add_argument("--base-url", required=True, help="e.g. http://localhost:8000/v1")
    llm.add_argument("--model", required=True, help="the endpoint's model name")
    llm.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (if any)"
    )
    llm.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    llm.add_argument("--retries", type=int, default=4)
    llm.add_argument("--batch-size", type=positive_int, default=16, help="labels saved per batch")
    llm.add_argument("--temperature", type=float, default=0.0)
    llm.add_argument("--relabel", action="store_true", help="also features with a manual or LLM label")
    llm.add_argument("--dry-run", action="store_true", help="print the first prompt and send nothing")
    llm.add_argument("--no-progress", action="store_true")
    llm.set_defaults(run=_label_llm)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feature", action="append", default=[], metavar="L/F", help="a feature, e.g. 12/3071 (repeatable)"
    )
    parser.add_argument("--layer", type=int, action="append", default=[], help="every feature of a layer")


def _selection(args: argparse.Namespace, store: FeatureStore) -> list[tuple[int, int]] | None:
    """The features named by --feature and --layer, or None for all of them."""
    if not args.feature and not args.layer:
        return None
    chosen: list[tuple[int, int]] = []
    for text in args.feature:
        parts = text.replace(":", "/").split("/")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise CircuitmapError(f"--feature takes LAYER/FEATURE, e.g. 12/3071; got {text!r}")
        chosen.append((int(parts[0]), int(parts[1])))
    for layer in args.layer:
        store.check_feature(layer, 0)
        chosen.extend((layer, feature) for feature in range(store.d_features))
    return store.checked(chosen)


def _build(args: argparse.Namespace) -> int:
    config = BuildConfig().with_changes(**settings_from(args, BuildConfig))
    config.check()
    check_number("--checkpoint-minutes", args.checkpoint_minutes, low=0, low_open=True)
    if args.db:
        check_writable(args.db, "the feature database")
    args.device = process_device(args.device)
    model = load_model_from_args(args)
    transcoders = load_transcoders(args.transcoders, device=model.device)
    path = Path(args.db) if args.db else default_database_path(transcoders)
    check_writable(path, "the feature database")
    group = ProcessGroup.from_environment(model.device)
    try:
        if group.main:
            print(f"feature database: {path}", file=sys.stderr)
        with stop_on_signals() as stop:
            report = build_features(
                model,
                transcoders,
                args.corpus,
                path,
                config,
                model_name=args.model,
                transcoders_name=str(args.transcoders),
                checkpoint_seconds=args.checkpoint_minutes * 60,
                stop=stop,
                rebuild=args.rebuild,
                group=group,
            )
    finally:
        group.close()
    if not group.main:
        return 0
    if report.already_complete:
        print(f"{path} is already complete ({report.tokens:,} tokens); pass --rebuild to build it again")
        return 0
    print(
        f"built {path}: {report.tokens:,} tokens in {report.contexts:,} contexts, "
        f"{report.seconds / 60:.1f} min; "
        f"{report.dead_features:,} features never active, {report.short_features:,} with fewer than "
        f"{config.top} contexts"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    with FeatureStore(args.db) as store:
        dashboard = store.get(args.layer, args.feature)
    print(json.dumps(dashboard.as_json(), indent=1) if args.json else dashboard.as_text())
    return 0


def _search(args: argparse.Namespace) -> int:
    with FeatureStore(args.db) as store:
        hits = store.search(args.text, limit=args.limit)
    if not hits:
        print(f"no feature matches {args.text!r}")
    for hit in hits:
        print(f"{hit.layer:>3}/{hit.feature:<7} {hit.label:<40} {hit.tokens[:60]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    check_writable(args.out, "the export")
    with FeatureStore(args.db) as store:
        report = export_neuronpedia(
            store,
            args.out,
            features=_selection(args, store),
            model_id=args.model_id,
            source_id=args.source_set,
            creator_id=args.creator_id,
            progress=not args.no_progress,
        )
    print(
        f"wrote {report.features:,} features, {report.activations:,} activation records and "
        f"{report.explanations:,} explanations to {report.path}"
    )
    return 0


def _label_llm(args: argparse.Namespace) -> int:
    with FeatureStore(args.db) as store:
        features = _selection(args, store)
        if features is None and not args.all:
            raise CircuitmapError("name features with --feature or --layer, or pass --all to label every one")
        if args.dry_run:
            layer, feature = (features or [(0, 0)])[0]
            print(build_prompt(store.get(layer, feature)))
            return 0
    report = label_features(
        args.db,
        features,
        base_url=args.base_url,
        model=args.model,
        api_key=os.environ.get(args.api_key_env) or None,
        timeout=args.timeout,
        progress=not args.no_progress,
        skip_labelled=not args.relabel,
        batch_size=args.batch_size,
        retries=args.retries,
        temperature=args.temperature,
    )
    print(
        f"labelled {report.labelled:,} features with {report.requests:,} requests in {report.seconds:.0f} s; "
        f"{report.already_labelled:,} already labelled, {report.no_evidence:,} never active, "
        f"{len(report.failed):,} failed"
    )
    for layer, feature, reason in report.failed:
        print(f"  {layer}/{feature}: {reason}")
    return 0


def _label(args: argparse.Namespace) -> int:
    with FeatureStore(args.db) as store:
        label = store.set_label(args.layer, args.feature, args.text, author=args.author or getpass.getuser())
        current = store.label(args.layer, args.feature)
    shown = "(cleared)" if not label.text else repr(label.text)
    print(
        f"layer {args.layer} feature {args.feature}: manual label {shown} by {label.author} "
        f"at {label.created}"
    )
    if current is not None and current.text != label.text:
        print(f"now showing the {current.source} label {current.text!r}")
    return 0

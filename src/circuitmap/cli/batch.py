"""``attribute-batch``: the graph folders of a file of prompts, resumable and shared among the processes
torchrun starts, with a summary table (``circuitmap.batch``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from circuitmap.atomic import check_writable
from circuitmap.attribution import AttributionConfig
from circuitmap.batch import BatchConfig, attribute_batch, read_prompts, summary_table
from circuitmap.cli import (
    add_feature_database_option,
    add_model_args,
    add_settings,
    feature_database,
    load_model_from_args,
    settings_from,
    stop_on_signals,
)
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import PruneConfig
from circuitmap.training.distributed import process_device, world_size
from circuitmap.transcoders import load_transcoders


def register(commands) -> None:
    parser = commands.add_parser(
        "attribute-batch",
        help="compute the attribution graphs of a JSON-lines file of prompts, one graph folder each",
    )
    parser.add_argument(
        "prompts",
        metavar="PROMPTS.jsonl",
        help='one JSON object per line: {"prompt": …} with optional "id" (the folder\'s name) and "targets" '
        "(tokens, or [A, B] for logit(A) − logit(B))",
    )
    add_model_args(parser)
    parser.add_argument("--transcoders", required=True, help="transcoder set (folder, npz or hub reference)")
    add_settings(
        parser, AttributionConfig, ["max_n_logits", "desired_logit_prob", "max_feature_nodes", "batch_size"]
    )
    add_settings(parser, PruneConfig, ["node_threshold", "edge_threshold", "document_links"])
    add_settings(parser, BatchConfig)
    parser.add_argument(
        "--out", required=True, help="folder of the graph folders and of summary.json and summary.md"
    )
    add_feature_database_option(parser, "whose labels name the feature nodes")
    parser.add_argument("--force", action="store_true", help="run prompts whose estimate exceeds free memory")
    parser.set_defaults(run=_attribute_batch)


def _attribute_batch(args: argparse.Namespace) -> int:
    attribution = AttributionConfig().with_changes(**settings_from(args, AttributionConfig))
    pruning = PruneConfig().with_changes(**settings_from(args, PruneConfig))
    config = BatchConfig().with_changes(**settings_from(args, BatchConfig))
    attribution.check()
    pruning.check()
    config.check()
    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CircuitmapError(f"--out {out} exists and is not a folder")
    check_writable(out, "the batch folder")
    args.device = process_device(args.device)
    model = load_model_from_args(args)
    transcoders = load_transcoders(args.transcoders)
    with feature_database(args.features, transcoders) as store, stop_on_signals() as stop:
        report = attribute_batch(
            model,
            transcoders,
            prompts,
            out,
            attribution,
            pruning,
            config,
            features=store,
            check_memory=not args.force,
            stop=stop,
        )
    if not report.rows:
        return 0
    print(summary_table(report.rows))
    share = " (this process's share)" if world_size() > 1 else ""
    print(
        f"computed {len(report.computed)} graphs, {len(report.skipped)} were already finished{share}; "
        f"wrote {' and '.join(map(str, report.files))}"
    )
    return 0

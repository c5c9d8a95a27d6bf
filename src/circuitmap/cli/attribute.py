"""``attribute``: the attribution graph of a prompt, written as a graph folder, with a summary."""

from __future__ import annotations

import argparse
import resource

from circuitmap.atomic import check_writable
from circuitmap.attribution import AttributionConfig, Direction, estimate_attribution
from circuitmap.cli import (
    DEFAULT_PROMPT,
    add_feature_database_option,
    add_model_args,
    add_settings,
    feature_database,
    load_model_from_args,
    non_negative_int,
    positive_int,
    settings_from,
    stop_on_signals,
    yes_no,
)
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import GraphFolder, PruneConfig
from circuitmap.pipeline import compute_graph_folder
from circuitmap.transcoders import load_transcoders
from circuitmap.vectors import load_vector


def register(commands) -> None:
    parser = commands.add_parser(
        "attribute", help="compute the attribution graph of a prompt, save it and its viewer JSON"
    )
    add_model_args(parser)
    parser.add_argument("--transcoders", required=True, help="transcoder set (folder, npz or hub reference)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--target", action="append", default=[], help="explicit target token (repeatable)")
    parser.add_argument(
        "--logit-diff",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="target logit(A) − logit(B)",
    )
    parser.add_argument(
        "--direction", action="append", default=[], metavar="NAME=FILE", help="residual direction target"
    )
    add_settings(
        parser, AttributionConfig, ["max_n_logits", "desired_logit_prob", "max_feature_nodes", "batch_size"]
    )
    add_settings(parser, PruneConfig, ["node_threshold", "edge_threshold", "document_links"])
    parser.add_argument(
        "--groups",
        type=yes_no,
        default=True,
        metavar="yes|no",
        help="group the kept features into named supernodes (default: yes)",
    )
    parser.add_argument(
        "--head-loadings",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="split the N most influential cross-position edges over the attention heads that carry them, "
        "stored beside the graph as heads.safetensors (default: 0, none)",
    )
    parser.add_argument("--top", type=positive_int, default=10, help="how many influential features to list")
    parser.add_argument("--out", required=True, help="graph folder to write (graph.safetensors, graph.json)")
    add_feature_database_option(parser, "whose labels name the feature nodes")
    parser.add_argument("--estimate", action="store_true", help="print expected memory and time, then stop")
    parser.add_argument("--force", action="store_true", help="run even if the estimate exceeds free memory")
    parser.set_defaults(run=_attribute)


def _attribute(args: argparse.Namespace) -> int:
    attribution = AttributionConfig().with_changes(**settings_from(args, AttributionConfig))
    pruning = PruneConfig().with_changes(**settings_from(args, PruneConfig))
    attribution.check()
    pruning.check()
    folder = GraphFolder(args.out)
    if folder.path.exists() and not folder.path.is_dir():
        raise CircuitmapError(f"--out {folder.path} exists and is not a folder")
    check_writable(folder.path, "the graph folder")
    targets = [*args.target, *(tuple(pair) for pair in args.logit_diff), *map(_direction, args.direction)]
    model = load_model_from_args(args)
    transcoders = load_transcoders(args.transcoders)
    if args.estimate:
        estimate = estimate_attribution(
            model, transcoders, args.prompt, attribution, n_targets=len(targets) or None
        )
        print(f"estimate: {estimate.describe()}")
        return 0
    with feature_database(args.features, transcoders) as store, stop_on_signals() as stop:
        computed = compute_graph_folder(
            model,
            transcoders,
            args.prompt,
            folder.path,
            attribution,
            pruning,
            targets=targets or None,
            features=store,
            groups=args.groups,
            head_edges=args.head_loadings,
            check_memory=not args.force,
            stop=stop,
        )
    print(computed.summary(args.top))
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    files = [
        folder.graph_file,
        folder.document_file,
        *([folder.heads_file] if computed.heads is not None else []),
    ]
    print(f"wrote {', '.join(map(str, files[:-1]))} and {files[-1]}")
    return 0


def _direction(text: str) -> Direction:
    """``NAME=FILE``: a direction stored as the only tensor of a safetensors file."""
    name, _, path = text.partition("=")
    if not path:
        raise CircuitmapError(f"--direction takes NAME=FILE.safetensors, got {text!r}")
    return Direction(name, load_vector(path))

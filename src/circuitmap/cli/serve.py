"""``serve`` and ``export-html``: explore graphs in a browser, or share one as a single file."""

from __future__ import annotations

import argparse
from pathlib import Path

from circuitmap.atomic import check_writable
from circuitmap.attribution import AttributionConfig
from circuitmap.cli import (
    add_explorer_options,
    add_feature_database_option,
    add_model_args,
    add_settings,
    load_model_from_args,
    settings_from,
)
from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore
from circuitmap.features.graph_labels import add_feature_labels
from circuitmap.graphs import PruneConfig, viewer_document
from circuitmap.server import Engine, export_html, run_explorer
from circuitmap.server.heads import folder_heads
from circuitmap.server.launch import DEFAULT_GRAPHS
from circuitmap.server.personas import load_personas
from circuitmap.transcoders import load_transcoders


def register(commands) -> None:
    serve = commands.add_parser("serve", help="explore graphs in the browser (a local web app)")
    serve.add_argument(
        "--graphs", default=DEFAULT_GRAPHS, help=f"graph folder, one sub-folder per graph ({DEFAULT_GRAPHS})"
    )
    add_model_args(serve, optional=True)
    serve.add_argument("--transcoders", help="with --model: compute new graphs from the browser")
    add_settings(serve, AttributionConfig, ["max_feature_nodes"], default_note=", for graphs computed here")
    add_explorer_options(serve)
    serve.add_argument(
        "--persona",
        action="append",
        default=[],
        metavar="FILE",
        help="with --model and --transcoders: a persona vector (.safetensors) to project on and steer with "
        "in the page, named by its file's stem (repeatable)",
    )
    serve.set_defaults(run=_serve)

    export = commands.add_parser(
        "export-html", help="write a graph as one self-contained HTML file that opens offline"
    )
    export.add_argument("graph", help="graph folder, graph.json, or graph.safetensors")
    export.add_argument("-o", "--output", required=True, help="the .html file to write")
    add_settings(
        export,
        PruneConfig,
        ["node_threshold", "edge_threshold", "document_links"],
        default_note=", for a .safetensors graph",
    )
    add_feature_database_option(export, "whose labels name unlabelled feature nodes")
    export.set_defaults(run=_export_html)


def _serve(args: argparse.Namespace) -> int:
    if (args.model is None) != (args.transcoders is None):
        raise CircuitmapError(
            "--model and --transcoders go together: give both to compute graphs, or neither"
        )
    if args.persona and args.model is None:
        raise CircuitmapError("--persona needs --model and --transcoders: persona vectors run on the model")
    engine = None
    personas = None
    if args.model is not None:
        attribution = AttributionConfig().with_changes(**settings_from(args, AttributionConfig))
        attribution.check()
        model = load_model_from_args(args)
        transcoders = load_transcoders(args.transcoders)
        engine = Engine(model, transcoders, args.model, args.transcoders, attribution=attribution)
        personas = load_personas(args.persona, model)
    run_explorer(
        Path(args.graphs),
        engine,
        args.host,
        args.port,
        allow_hosts=tuple(args.allow_host),
        features=args.features,
        personas=personas,
    )
    return 0


def _export_html(args: argparse.Namespace) -> int:
    pruning = PruneConfig().with_changes(**settings_from(args, PruneConfig))
    pruning.check()
    out = Path(args.output)
    if out.is_dir():
        raise CircuitmapError(f"-o {out} is a folder: name the .html file to write")
    check_writable(out, "the page")
    document = viewer_document(args.graph, pruning)
    if args.features:
        with FeatureStore(args.features) as store:
            add_feature_labels(document, store)
    path = export_html(document, out, heads=folder_heads(args.graph))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): open it in any browser, no server needed")
    return 0

"""``demo``: the graph of the default prompt with the model's quick transcoders, then the explorer on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuitmap.atomic import check_writable
from circuitmap.cache import default_database_path, ensure_quick_transcoders
from circuitmap.cli import (
    DEFAULT_PROMPT,
    add_explorer_options,
    add_model_args,
    feature_database,
    load_model_from_args,
    stop_on_signals,
)
from circuitmap.graphs.export import prompt_slug
from circuitmap.pipeline import compute_graph_folder
from circuitmap.server import Engine, run_explorer
from circuitmap.server.launch import check_port
from circuitmap.transcoders import load_transcoders


def register(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="attribution graph of a prompt with the model's quick transcoders (trained on first use), "
        "then the explorer on it",
    )
    add_model_args(demo)
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument(
        "--out",
        default="circuitmap-demo",
        help="graph folder; the graph goes in a sub-folder (circuitmap-demo)",
    )
    demo.add_argument("--no-serve", action="store_true", help="stop after writing the graph")
    add_explorer_options(demo)
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    graph_folder = Path(args.out) / prompt_slug(args.prompt)
    check_writable(graph_folder, "the graph folder")
    if not args.no_serve:
        check_port(args.port)
    model = load_model_from_args(args)
    model.encode(args.prompt)
    with stop_on_signals() as stop:
        folder = ensure_quick_transcoders(model, args.model, stop=stop)
    transcoders = load_transcoders(folder)
    if args.features is None and not default_database_path(transcoders).is_file():
        print(
            "feature dashboards: build them once with `circuitmap features build --transcoders "
            f"{folder} --corpus YOUR_TEXTS` (about an hour per million tokens on two CPU cores)",
            file=sys.stderr,
        )
    with feature_database(args.features, transcoders) as store, stop_on_signals() as stop:
        computed = compute_graph_folder(
            model, transcoders, args.prompt, graph_folder, features=store, check_memory=True, stop=stop
        )
    print(computed.summary())
    print(f"wrote {graph_folder}")
    if args.no_serve:
        return 0
    engine = Engine(model, transcoders, model_spec=args.model, transcoders_spec=str(folder))
    run_explorer(
        Path(args.out),
        engine,
        args.host,
        args.port,
        path=f"/graph/{graph_folder.name}",
        allow_hosts=tuple(args.allow_host),
        features=args.features,
    )
    return 0

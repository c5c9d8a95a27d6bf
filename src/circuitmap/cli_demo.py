"""The ``demo`` command: the graph of the default prompt, with quick transcoders trained on first use."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from circuitmap.cli_server import add_explorer_args
from circuitmap.models.loading import cache_dir

QUICK_MINUTES = 15


def quick_transcoders_folder(model_spec: str) -> Path:
    """Where the quick transcoder set of a model is kept between runs."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_spec).name or model_spec)
    return cache_dir() / "transcoders" / f"{slug}-quick"


def ensure_quick_transcoders(model, model_spec: str) -> Path:
    """The folder of the model's quick set, trained now (resuming an interrupted attempt) if absent."""
    from circuitmap.training import SampledContexts, preset, train_transcoders

    folder = quick_transcoders_folder(model_spec)
    if (folder / "config.yaml").is_file():
        return folder
    run = folder.with_name(folder.name + ".run")
    resume = (run / "checkpoint.safetensors").is_file()
    print(
        f"No transcoders for {model_spec} yet: training the quick set once (about {QUICK_MINUTES} minutes on "
        f"two CPU cores, minutes on a GPU). It is kept in {folder} and reused; an interrupted run resumes.",
        file=sys.stderr,
    )
    if run.exists() and not resume:
        shutil.rmtree(run)
    config = preset("quick")
    contexts = SampledContexts(model, config.context_length, config.seed)
    train_transcoders(model, contexts, config, run, resume=resume, checkpoint_seconds=60)
    folder.parent.mkdir(parents=True, exist_ok=True)
    run.rename(folder)
    return folder


def cmd_demo(args: argparse.Namespace, load, attribute_with) -> int:
    from circuitmap.cli_server import start_explorer
    from circuitmap.features import default_database_path
    from circuitmap.graphs.export import prompt_slug
    from circuitmap.server import Engine
    from circuitmap.transcoders import load_transcoders

    model = load(args)
    folder = ensure_quick_transcoders(model, args.model)
    transcoders = load_transcoders(folder)
    graph_folder = Path(args.out) / prompt_slug(args.prompt)
    argv = ["--model", args.model, "--transcoders", str(folder), "--prompt", args.prompt]
    if args.features:
        argv += ["--features", args.features]
    elif not default_database_path(transcoders).is_file():
        print(
            "feature dashboards: build them once with `circuitmap features build --transcoders "
            f"{folder} --corpus YOUR_TEXTS` (about an hour per million tokens on two CPU cores)",
            file=sys.stderr,
        )
    status = attribute_with([*argv, "--out", str(graph_folder)], model, transcoders)
    if status != 0 or args.no_serve:
        return status
    engine = Engine(model, transcoders, model_spec=args.model, transcoders_spec=str(folder))
    start_explorer(
        Path(args.out),
        engine,
        args.host,
        args.port,
        path=f"/graph/{graph_folder.name}",
        allow_hosts=tuple(args.allow_host),
        features=args.features,
    )
    return 0


def add_demo_command(commands, add_model_args, load, attribute_with, default_prompt: str) -> None:
    demo = commands.add_parser(
        "demo",
        help="attribution graph of a prompt with the model's quick transcoders (trained on first use), "
        "then the explorer on it",
    )
    add_model_args(demo)
    demo.add_argument("--prompt", default=default_prompt)
    demo.add_argument(
        "--out",
        default="circuitmap-demo",
        help="graph folder; the graph goes in a sub-folder (circuitmap-demo)",
    )
    demo.add_argument("--no-serve", action="store_true", help="stop after writing the graph")
    add_explorer_args(demo)
    demo.set_defaults(run=lambda args: cmd_demo(args, load, attribute_with))

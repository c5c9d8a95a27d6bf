"""``intervene`` and ``check``: edit features on a prompt, and test a graph by ablations."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from circuitmap.atomic import atomic_write, check_writable
from circuitmap.cache import quick_transcoders_folder
from circuitmap.cli import add_model_args, load_model_from_args, positive_int
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import Graph, GraphFolder, load_graph
from circuitmap.graphs.ids import is_feature_id
from circuitmap.interventions import (
    FeatureEdit,
    ResidualEdit,
    Supernode,
    check_graph,
    generate_with,
    intervene,
)
from circuitmap.interventions.edits import feature_supernodes
from circuitmap.models import DEFAULT_MODEL
from circuitmap.transcoders import load_transcoders
from circuitmap.vectors import load_vector


def register(commands) -> None:
    parser = commands.add_parser(
        "intervene", help="edit features or the residual stream on a prompt and compare the predictions"
    )
    add_model_args(parser, optional=True)
    parser.add_argument("--transcoders", help="transcoder set (default: the model's quick set, if trained)")
    parser.add_argument("--prompt", help="the prompt (or --graph to take a graph's prompt and supernodes)")
    parser.add_argument("--graph", help="graph folder or graph.safetensors: its prompt and saved supernodes")
    for operation, meaning in (("set", "set to VALUE"), ("scale", "multiply by VALUE"), ("add", "add VALUE")):
        parser.add_argument(
            f"--{operation}",
            action="append",
            default=[],
            metavar="TARGET=VALUE",
            help=f"{meaning}: TARGET is a node id (layer_index_position; layer_index_* for every position) "
            "or a supernode name (repeatable)",
        )
    parser.add_argument("--ablate", action="append", default=[], metavar="TARGET", help="scale by 0")
    parser.add_argument(
        "--supernode", action="append", default=[], metavar="NAME=ID,ID,…", help="define a named group"
    )
    parser.add_argument("--vector", metavar="FILE[:KEY]", help="safetensors vector to add to the residual")
    parser.add_argument("--vector-layer", type=int, help="layer whose incoming residual gets the vector")
    parser.add_argument(
        "--vector-scale", type=float, default=1.0, help="coefficient of the vector (default 1)"
    )
    parser.add_argument("--vector-positions", default="all", help="'all' (default) or positions like 3,4")
    parser.add_argument("--mode", choices=["open-loop", "constrained"], default="open-loop")
    parser.add_argument("--no-freeze-attention", action="store_true", help="open loop: recompute attention")
    parser.add_argument("--target", action="append", default=[], help="token whose logit to report")
    parser.add_argument("-k", type=positive_int, default=10, help="top next tokens to list (default 10)")
    parser.add_argument(
        "--generate",
        type=positive_int,
        metavar="N",
        help="also continue N tokens with and without the edits (open loop)",
    )
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result as JSON to this file")
    parser.set_defaults(run=_intervene)

    check = commands.add_parser(
        "check",
        help="ablate a graph's most influential features and supernodes; compare with its predictions",
    )
    check.add_argument("graph", help="graph folder (as written by attribute) or graph.safetensors")
    add_model_args(check, optional=True)
    check.add_argument("--transcoders", help="the graph's transcoder set (default: the model's quick set)")
    check.add_argument("--top", type=int, default=10, help="how many influential features (default 10)")
    check.add_argument("--supernode", action="append", default=[], metavar="NAME=ID,ID,…")
    check.add_argument("--target", help="logit target to check (default: the graph's most probable)")
    check.add_argument("--no-freeze-attention", action="store_true", help="recompute attention patterns")
    check.add_argument("--plot", help="PNG to write (default: check.png beside the graph)")
    check.add_argument("--json", help="write the report as JSON to this file")
    check.set_defaults(run=_check)


def _number(text: str | float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CircuitmapError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise CircuitmapError(f"{text!r} is not a finite number")
    return value


def _supernodes(specs: list[str]) -> dict[str, Supernode]:
    """``NAME=ID,ID,…`` definitions as supernodes by name."""
    groups = {}
    for spec in specs:
        name, sep, members = spec.rpartition("=")
        if not sep or not name:
            raise CircuitmapError(f"--supernode {spec!r}: expected NAME=NODE_ID,NODE_ID,…")
        groups[name] = Supernode(name, [m.strip() for m in members.split(",") if m.strip()])
    return groups


def _target(text: str, groups: dict[str, Supernode]):
    """A supernode by name, else a feature: a node id, or ``layer_index_*`` for every position."""
    if text in groups:
        return groups[text]
    if not is_feature_id(text):
        known = f"; known supernodes: {', '.join(sorted(groups))}" if groups else ""
        raise CircuitmapError(
            f"{text!r} is neither a feature (layer_index_position, or layer_index_* for every position) "
            f"nor a supernode{known}"
        )
    return text


def _edits(args: argparse.Namespace, groups: dict[str, Supernode]) -> list:
    """Feature edits from ``--set/--scale/--add TARGET=VALUE`` and ``--ablate TARGET``, then the residual
    vector edit, if any."""
    edits = []
    for operation in ("set", "scale", "add"):
        for spec in getattr(args, operation):
            target, sep, value = spec.rpartition("=")
            if not sep or not target:
                raise CircuitmapError(f"--{operation} {spec!r}: expected TARGET=VALUE")
            edits.append(FeatureEdit(_target(target, groups), operation, _number(value)))
    edits += [FeatureEdit.ablate(_target(target, groups)) for target in args.ablate]
    if args.vector:
        edits.append(_vector_edit(args))
    return edits


def _vector_edit(args: argparse.Namespace) -> ResidualEdit:
    """``--vector FILE[:KEY]`` times ``--vector-scale``, at ``--vector-layer`` and ``--vector-positions``."""
    if args.vector_layer is None:
        raise CircuitmapError("--vector needs --vector-layer")
    file, _, key = args.vector.partition(":")
    vector = load_vector(file, key or None).double()
    positions = None
    if args.vector_positions != "all":
        try:
            positions = tuple(int(p) for p in args.vector_positions.split(","))
        except ValueError:
            raise CircuitmapError(
                "--vector-positions takes 'all' or a comma-separated list of integers"
            ) from None
    return ResidualEdit(args.vector_layer, vector * _number(args.vector_scale), positions)


def _graph_and_supernodes(path: str) -> tuple[Graph, dict[str, Supernode]]:
    """A graph (a graph folder, or a graph file) and the supernodes saved with it, their feature members."""
    path = Path(path)
    if not path.exists():
        raise CircuitmapError(f"no graph at {path}")
    if not path.is_dir():
        return load_graph(path), {}
    folder = GraphFolder(path)
    graph = folder.read_graph()
    groups, left_out = feature_supernodes(graph, folder.saved_supernodes())
    for name, count in left_out.items():
        print(
            f"supernode {name!r}: {count} members that are not feature nodes of the graph are left out",
            file=sys.stderr,
        )
    return graph, groups


def _transcoders_source(args: argparse.Namespace) -> str:
    if args.transcoders:
        return args.transcoders
    folder = quick_transcoders_folder(args.model)
    if (folder / "config.yaml").is_file():
        return str(folder)
    raise CircuitmapError(f"give --transcoders (no quick set of {args.model} has been trained yet)")


def _intervene(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "the JSON file")
    groups = {}
    prompt = args.prompt
    if args.graph:
        graph, groups = _graph_and_supernodes(args.graph)
        prompt = torch.tensor([graph.tokens])
        args.model = args.model or graph.model_name
    if prompt is None:
        raise CircuitmapError("give --prompt or --graph")
    groups.update(_supernodes(args.supernode))
    edits = _edits(args, groups)
    if not edits:
        raise CircuitmapError("no edits: give --set, --scale, --add, --ablate or --vector")
    args.model = args.model or DEFAULT_MODEL
    transcoders = load_transcoders(_transcoders_source(args))
    if args.graph:
        transcoders.check_fingerprint(graph.info.get("transcoders_fingerprint"), f"the graph {args.graph}")
    model = load_model_from_args(args)
    result = intervene(
        model,
        transcoders,
        prompt,
        edits,
        mode=args.mode.replace("-", "_"),
        freeze_attention=not args.no_freeze_attention,
        targets=args.target or None,
        top_k=args.k,
    )
    print(result.summary())
    document = result.as_json()
    if args.generate:
        settings = dict(greedy=not args.sample, temperature=args.temperature, seed=args.seed)
        original = generate_with(model, transcoders, prompt, [], args.generate, **settings)
        edited = generate_with(model, transcoders, prompt, edits, args.generate, **settings)
        print(f"original: {result.prompt}{original}")
        print(f"edited:   {result.prompt}{edited}")
        document.update(continuation_before=original, continuation_after=edited)
    if args.json:
        _write_json(args.json, document)
    return 0


def _check(args: argparse.Namespace) -> int:
    folder = Path(args.graph) if Path(args.graph).is_dir() else Path(args.graph).parent
    plot = Path(args.plot) if args.plot else folder / "check.png"
    check_writable(plot, "the plot")
    if args.json:
        check_writable(args.json, "the JSON file")
    graph, groups = _graph_and_supernodes(args.graph)
    groups.update(_supernodes(args.supernode))
    args.model = args.model or graph.model_name or DEFAULT_MODEL
    transcoders = load_transcoders(_transcoders_source(args))
    model = load_model_from_args(args)
    report = check_graph(
        model,
        transcoders,
        graph,
        n_features=args.top,
        supernodes=list(groups.values()),
        target=args.target,
        freeze_attention=not args.no_freeze_attention,
    )
    print(report.table())
    print(f"wrote {report.save_plot(plot)}")
    if args.json:
        _write_json(args.json, report.as_json())
    return 0


def _write_json(path: str, document: dict) -> None:
    """``document`` as strict JSON in the file ``path``, written whole or not at all."""
    text = json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    print(f"wrote {path}")

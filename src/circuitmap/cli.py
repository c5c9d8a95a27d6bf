"""The ``circuitmap`` command line. Errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from circuitmap import __version__
from circuitmap.attribution import Direction, attribute
from circuitmap.attribution.estimate import available_memory, estimate_attribution
from circuitmap.cli_demo import add_demo_command
from circuitmap.cli_features import add_feature_commands
from circuitmap.cli_interventions import add_intervention_commands
from circuitmap.cli_server import add_server_commands
from circuitmap.cli_training import add_training_commands, positive_int
from circuitmap.errors import CircuitmapError
from circuitmap.features import add_logit_lens
from circuitmap.graphs import Graph, NodeKind, node_influence
from circuitmap.graphs.export import graph_json, write_graph_json
from circuitmap.models import DEFAULT_MODEL, load_model
from circuitmap.training.trainer import TrainingInterrupted
from circuitmap.transcoders import load_transcoders

DEFAULT_PROMPT = "The capital of France is"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--tokenizer", help="tokenizer file for a llama2.c checkpoint (default: found beside it)"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--dtype", help="float32 (default), bfloat16, float16 or float64")


def _load(args: argparse.Namespace):
    start = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    print(f"loaded {model} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def _cmd_next(args: argparse.Namespace) -> int:
    model = _load(args)
    print(f"prompt: {args.prompt!r}")
    for rank, (token, prob) in enumerate(model.top_next_tokens(args.prompt, args.k), start=1):
        print(f"{rank:>3}. {token!r:<24} {prob:.4f}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    text = model.generate(
        args.prompt, args.max_new_tokens, greedy=not args.sample, temperature=args.temperature, seed=args.seed
    )
    print(args.prompt + text)
    return 0


def _cmd_transcoders(args: argparse.Namespace) -> int:
    transcoders = load_transcoders(args.source)
    print(f"{args.source}: {transcoders.extra_repr()}")
    if args.model is None:
        return 0
    model = _load(args)
    transcoders.check_model(model.n_layers, model.d_model)
    transcoders.to(device=model.device, dtype=model.dtype)
    _, cache = model.run_with_cache(args.prompt, points=["mlp_in", "mlp_out"])
    inputs = [cache["mlp_in", layer][0, 1:] for layer in range(model.n_layers)]
    predicted = transcoders.reconstruct(inputs)
    print(f"on {args.prompt!r} (first position excluded):")
    print("layer     L0     FVU")
    for layer, prediction in enumerate(predicted):
        target = cache["mlp_out", layer][0, 1:].to(prediction.dtype)
        l0 = (transcoders.encode(layer, inputs[layer]) != 0).sum(-1).float().mean()
        fvu = (target - prediction).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-30)
        print(f"{layer:>5} {float(l0):>6.1f} {float(fvu):>7.3f}")
    return 0


def _direction(text: str) -> Direction:
    """``NAME=FILE``: a direction stored as the only tensor of a safetensors file."""
    from safetensors.torch import load_file

    name, _, path = text.partition("=")
    if not path:
        raise CircuitmapError(f"--direction takes NAME=FILE.safetensors, got {text!r}")
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises several types for missing or corrupt files
        raise CircuitmapError(f"cannot read direction {name!r} from {path}: {error}") from None
    if len(tensors) != 1:
        raise CircuitmapError(f"{path} must hold exactly one tensor (the direction), found {len(tensors)}")
    return Direction(name, next(iter(tensors.values())))


def _targets(args: argparse.Namespace) -> list | None:
    targets = [*args.target, *(tuple(pair) for pair in args.logit_diff), *map(_direction, args.direction)]
    return targets or None


def _summary(graph: Graph, document: dict, top: int) -> list[str]:
    """Counts before and after pruning, both scores (from the pruned viewer ``document``), and the most
    influential features."""
    metadata = document["metadata"]
    full, kept = metadata["scores"]["full"], metadata["scores"]["exported"]
    influence = node_influence(graph)
    kinds = {kind: int(np.count_nonzero(graph.kind == kind)) for kind in NodeKind}
    kept_features = sum(node["feature_type"] == "cross layer transcoder" for node in document["nodes"])
    targets = ", ".join(
        f"{name!r} (p={prob:.3f})" if np.isfinite(prob) else repr(name)
        for name, prob in zip(graph.target_names, graph.target_probs, strict=True)
    )
    lines = [
        f"prompt: {graph.prompt!r} ({len(graph.tokens)} tokens); targets: {targets}",
        f"graph: {kinds[NodeKind.FEATURE]:,} features, {kinds[NodeKind.ERROR]:,} error nodes, "
        f"{kinds[NodeKind.TOKEN]:,} tokens, {kinds[NodeKind.TARGET]:,} targets; {graph.n_edges:,} edges",
        f"pruned ({metadata['node_threshold']} / {metadata['edge_threshold']}): "
        f"{metadata['n_nodes']['exported']:,} nodes ({kept_features:,} features), "
        f"{metadata['n_edges']['exported']:,} edges",
        f"replacement score: {_score(full['replacement'])} full, {_score(kept['replacement'])} pruned; "
        f"completeness: {_score(full['completeness'])} full, {_score(kept['completeness'])} pruned",
        "most influential features:",
    ]
    labels = {node["node_id"]: node["clerp"] for node in document["nodes"] if node.get("clerp")}
    features = graph.nodes_of(NodeKind.FEATURE)
    for node in features[np.argsort(-influence[features], kind="stable")[:top]]:
        token = graph.token_strings[graph.position[node]]
        label = labels.get(f"{graph.layer[node]}_{graph.index[node]}_{graph.position[node]}")
        lines.append(
            f"  layer {graph.layer[node]:>2} feature {graph.index[node]:>6} at {graph.position[node]:>3} "
            f"({token!r}): influence {influence[node]:.4f}, activation {graph.activation[node]:.3f}"
            + (f", label {label!r}" if label else "")
        )
    return lines


def _score(value: float | None) -> str:
    """A score as printed: three decimals, or "n/a" where it is undefined (written as null in JSON)."""
    return "n/a" if value is None else f"{value:.3f}"


def _check_outputs(args: argparse.Namespace) -> None:
    """Reject bad thresholds and an unusable output folder before any work is done."""
    for name in ("node_threshold", "edge_threshold"):
        value = getattr(args, name)
        if not 0 < value <= 1:
            raise CircuitmapError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CircuitmapError(f"--out {out} exists and is not a folder")


def _cmd_attribute(args: argparse.Namespace) -> int:
    _check_outputs(args)
    model = _load(args)
    return _attribute_and_write(args, model, load_transcoders(args.transcoders))


def attribute_with(argv: list[str], model, transcoders) -> int:
    """Run ``attribute`` with the command-line arguments ``argv`` on an already loaded model and set."""
    args = build_parser().parse_args(["attribute", *argv])
    _check_outputs(args)
    return _attribute_and_write(args, model, transcoders)


def _attribute_and_write(args: argparse.Namespace, model, transcoders) -> int:
    """Estimate, compute, prune, add the logit lens, write both files and print the summary."""
    targets = _targets(args)
    settings = dict(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    if args.estimate or not args.force:
        estimate = estimate_attribution(
            model,
            transcoders,
            args.prompt,
            timed=args.estimate,
            n_targets=len(targets) if targets else 10,
            **settings,
        )
        print(f"estimate: {estimate.describe()}")
        available = available_memory(model.device)
        if available is not None and estimate.peak_bytes > available and not args.force:
            raise CircuitmapError(
                f"the estimated peak memory ({estimate.peak_bytes / 2**30:.1f} GiB) exceeds the available "
                f"{available / 2**30:.1f} GiB; lower --max-feature-nodes or --batch-size, or pass --force"
            )
        if args.estimate:
            return 0
    graph = attribute(model, transcoders, args.prompt, targets=targets, progress=True, **settings)
    started = time.perf_counter()
    document = graph_json(graph, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    add_logit_lens(document, model, transcoders)
    _add_feature_labels(document, args.features, transcoders)
    lines = _summary(graph, document, args.top)
    pruning_seconds = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_file = write_graph_json(document, out / "graph.json")
    graph_file = graph.save(out / "graph.safetensors")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n".join(lines))
    print(
        f"time: attribution {graph.info['seconds']:.1f} s, pruning and scores {pruning_seconds:.1f} s; "
        f"peak memory {peak:.2f} GiB"
    )
    print(f"wrote {graph_file} and {json_file}")
    return 0


def _add_feature_labels(document: dict, path: str | None, transcoders) -> None:
    """Label the document's feature nodes from the feature database (``path``, else the set's default one
    when it exists)."""
    from circuitmap.cli_server import open_features
    from circuitmap.features.graph_labels import add_feature_labels

    store = open_features(path, transcoders)
    if store is not None:
        with store:
            add_feature_labels(document, store)
        print(f"feature labels from {store.path}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitmap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"circuitmap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    next_parser = commands.add_parser("next", help="print the most likely next tokens for a prompt")
    _add_model_args(next_parser)
    next_parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    next_parser.add_argument("-k", type=positive_int, default=10, help="how many tokens (default 10)")
    next_parser.set_defaults(run=_cmd_next)

    gen_parser = commands.add_parser("generate", help="continue a prompt")
    _add_model_args(gen_parser)
    gen_parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    gen_parser.add_argument("--max-new-tokens", type=int, default=40)
    gen_parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen_parser.add_argument("--temperature", type=float, default=1.0)
    gen_parser.add_argument("--seed", type=int)
    gen_parser.set_defaults(run=_cmd_generate)

    tc_parser = commands.add_parser(
        "transcoders", help="describe a transcoder set; with --model, check it fits and print L0 and FVU"
    )
    tc_parser.add_argument("source", help="folder, config.yaml, GemmaScope .npz or hub reference")
    _add_model_args(tc_parser)
    tc_parser.set_defaults(model=None)
    tc_parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    tc_parser.set_defaults(run=_cmd_transcoders)

    at_parser = commands.add_parser(
        "attribute", help="compute the attribution graph of a prompt, save it and its viewer JSON"
    )
    _add_model_args(at_parser)
    at_parser.add_argument(
        "--transcoders", required=True, help="transcoder set (folder, npz or hub reference)"
    )
    at_parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    at_parser.add_argument("--target", action="append", default=[], help="explicit target token (repeatable)")
    at_parser.add_argument(
        "--logit-diff",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="target logit(A) − logit(B)",
    )
    at_parser.add_argument(
        "--direction", action="append", default=[], metavar="NAME=FILE", help="residual direction target"
    )
    at_parser.add_argument(
        "--max-feature-nodes", type=int, help="cap on feature nodes (others fold into errors)"
    )
    at_parser.add_argument(
        "--batch-size", type=int, help="rows per backward pass (default: sized to the prompt)"
    )
    at_parser.add_argument("--node-threshold", type=float, default=0.8)
    at_parser.add_argument("--edge-threshold", type=float, default=0.98)
    at_parser.add_argument(
        "--top", type=positive_int, default=10, help="how many influential features to list"
    )
    at_parser.add_argument("--out", required=True, help="folder for graph.safetensors and graph.json")
    at_parser.add_argument(
        "--features", help="feature database whose labels name the nodes (default: the set's own, if built)"
    )
    at_parser.add_argument(
        "--estimate", action="store_true", help="print expected memory and time, then stop"
    )
    at_parser.add_argument(
        "--force", action="store_true", help="run even if the estimate exceeds free memory"
    )
    at_parser.set_defaults(run=_cmd_attribute)

    add_training_commands(commands, _add_model_args, _load)
    add_demo_command(commands, _add_model_args, _load, attribute_with, DEFAULT_PROMPT)
    add_server_commands(commands, _add_model_args, _load, positive_int)
    add_feature_commands(commands, _add_model_args, _load, positive_int)
    add_intervention_commands(commands, _add_model_args, _load, positive_int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TrainingInterrupted as error:
        print(f"circuitmap: {error}", file=sys.stderr)
        return 130
    except CircuitmapError as error:
        print(f"circuitmap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitmap: interrupted", file=sys.stderr)
        return 130

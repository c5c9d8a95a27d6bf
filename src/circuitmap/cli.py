"""The ``circuitmap`` command line. Errors in the user's input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import sys
import time

from circuitmap import __version__
from circuitmap.errors import CircuitmapError
from circuitmap.models import DEFAULT_MODEL, load_model
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitmap", description=__doc__)
    parser.add_argument("--version", action="version", version=f"circuitmap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    next_parser = commands.add_parser("next", help="print the most likely next tokens for a prompt")
    _add_model_args(next_parser)
    next_parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    next_parser.add_argument("-k", type=int, default=10, help="how many tokens (default 10)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CircuitmapError as error:
        print(f"circuitmap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitmap: interrupted", file=sys.stderr)
        return 130

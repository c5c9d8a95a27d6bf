"""``next``, ``generate`` and ``transcoders``: look at a model and check a transcoder set against it."""

from __future__ import annotations

import argparse

from circuitmap.cli import DEFAULT_PROMPT, add_model_args, load_model_from_args, positive_int
from circuitmap.training import evaluate_transcoders
from circuitmap.transcoders import load_transcoders


def register(commands) -> None:
    next_parser = commands.add_parser("next", help="print the most likely next tokens for a prompt")
    add_model_args(next_parser)
    next_parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    next_parser.add_argument("-k", type=positive_int, default=10, help="how many tokens (default 10)")
    next_parser.set_defaults(run=_next)

    generate = commands.add_parser("generate", help="continue a prompt")
    add_model_args(generate)
    generate.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.set_defaults(run=_generate)

    describe = commands.add_parser(
        "transcoders", help="describe a transcoder set; with --model, check it fits and print L0 and FVU"
    )
    describe.add_argument("source", help="folder, config.yaml, GemmaScope .npz or hub reference")
    add_model_args(describe, optional=True)
    describe.add_argument("--prompt", default=DEFAULT_PROMPT)
    describe.set_defaults(run=_transcoders)


def _next(args: argparse.Namespace) -> int:
    model = load_model_from_args(args)
    print(f"prompt: {args.prompt!r}")
    for rank, (token, prob) in enumerate(model.top_next_tokens(args.prompt, args.k), start=1):
        print(f"{rank:>3}. {token!r:<24} {prob:.4f}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    model = load_model_from_args(args)
    text = model.generate(
        args.prompt, args.max_new_tokens, greedy=not args.sample, temperature=args.temperature, seed=args.seed
    )
    print(args.prompt + text)
    return 0


def _transcoders(args: argparse.Namespace) -> int:
    transcoders = load_transcoders(args.source)
    print(f"{args.source}: {transcoders.extra_repr()}")
    if args.model is None:
        return 0
    model = load_model_from_args(args)
    ids = model.encode(args.prompt)
    evaluation = evaluate_transcoders(model, transcoders, [ids[0]], n_tokens=ids.shape[1] - 1)
    print(f"on {args.prompt!r} (first position excluded):")
    print("layer     L0     FVU")
    for layer, (l0, fvu) in enumerate(zip(evaluation.l0, evaluation.fvu, strict=True)):
        print(f"{layer:>5} {l0:>6.1f} {fvu:>7.3f}")
    return 0

"""The ``train`` and ``evaluate-transcoders`` commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from circuitmap.models.loading import cache_dir
from circuitmap.training.config import ACTIVATIONS, KINDS, PRESETS, TrainConfig, preset

EVAL_CONTEXT_LENGTH = 128


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _print_layers(fvu: list[float], l0: list[float], dead: list[float]) -> None:
    print("layer     FVU      L0   dead")
    for layer, values in enumerate(zip(fvu, l0, dead, strict=True)):
        print(f"{layer:>5} {values[0]:>7.3f} {values[1]:>7.1f} {values[2]:>6.3f}")
    n = len(fvu)
    print(f" mean {sum(fvu) / n:>7.3f} {sum(l0) / n:>7.1f} {sum(dead) / n:>6.3f}")


def _corpus_contexts(model, sources: list[str], context_length: int, text_field: str):
    from circuitmap.training import CorpusContexts, iter_documents

    description = "corpus:" + "|".join(sources) + f":{text_field}"
    return CorpusContexts(
        lambda: iter_documents(sources, text_field), model.tokenizer, context_length, description
    )


def _config(args: argparse.Namespace) -> TrainConfig:
    base = preset(args.preset) if args.preset else TrainConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = base.with_changes(
        kind=args.kind,
        activation=args.activation,
        d_features=args.features,
        k=args.k,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        context_length=args.context_length,
        chunk_contexts=args.chunk_contexts,
        sparsity_coef=args.sparsity_coef,
        groups=args.groups or (world if base.groups == 1 else None),
        seed=args.seed,
    )
    config.check()
    return config


def _device(args: argparse.Namespace) -> str | None:
    """Under torchrun on GPUs each process takes the GPU of its local rank."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return args.device
    import torch

    if args.device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return args.device


def cmd_train(args: argparse.Namespace, load) -> int:
    from circuitmap.training import SampledContexts, evaluate_transcoders, train_transcoders

    config = _config(args)
    args.device = _device(args)
    model = load(args)
    if args.corpus:
        contexts = _corpus_contexts(model, args.corpus, config.context_length, args.text_field)
    else:
        print("no --corpus: the model writes its own training text (sampled, seeded)", file=sys.stderr)
        contexts = SampledContexts(model, config.context_length, config.seed)
    cache = None
    if args.cache_activations is not None:
        cache = args.cache_activations or cache_dir() / "activations"
    result = train_transcoders(
        model,
        contexts,
        config,
        args.out,
        resume=args.resume,
        cache_dir=cache,
        checkpoint_seconds=args.checkpoint_every,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    _print_layers(result.fvu, result.l0, result.dead_fraction)
    print(f"trained on {result.tokens:,} tokens in {result.steps:,} steps ({result.seconds:.0f} s)")
    out = Path(args.out)
    if args.eval_tokens:
        n_contexts = -(-args.eval_tokens // (config.context_length - 1))
        heldout = contexts.heldout(result.next_chunk, config.chunk_contexts, n_contexts)
        evaluation = evaluate_transcoders(model, result.transcoders, heldout, n_tokens=args.eval_tokens)
        report = evaluation.report()
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["heldout"] = report
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(
            f"held-out ({report['tokens']:,} tokens): FVU {report['mean_fvu']:.3f}, "
            f"L0 {report['mean_l0']:.1f}; "
            f"next-token loss {report['ce_loss']:.4f} → {report['ce_loss_spliced']:.4f} with every MLP "
            f"replaced (+{report['ce_loss_increase']:.4f}), KL {report['kl']:.4f}"
        )
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace, load) -> int:
    from circuitmap.training import evaluate_transcoders
    from circuitmap.transcoders import load_transcoders

    model = load(args)
    transcoders = load_transcoders(args.transcoders)
    contexts = _corpus_contexts(model, args.corpus, EVAL_CONTEXT_LENGTH, args.text_field)
    n_contexts = -(-args.tokens // (EVAL_CONTEXT_LENGTH - 1))
    evaluation = evaluate_transcoders(
        model, transcoders, contexts.heldout(0, n_contexts, n_contexts), n_tokens=args.tokens
    )
    if evaluation.tokens < args.tokens:
        print(
            f"circuitmap: warning: the corpus holds {evaluation.tokens:,} tokens, fewer than the "
            f"{args.tokens:,} requested; measured on what exists",
            file=sys.stderr,
        )
    report = evaluation.report()
    if args.json:
        print(json.dumps(report))
        return 0
    _print_layers(evaluation.fvu, evaluation.l0, evaluation.dead_fraction)
    print(
        f"next-token loss {report['ce_loss']:.4f} → {report['ce_loss_spliced']:.4f} with every MLP replaced "
        f"(+{report['ce_loss_increase']:.4f}); KL {report['kl']:.4f} nats/token "
        f"over {report['tokens']:,} tokens"
    )
    return 0


def add_training_commands(commands, add_model_args, load) -> None:
    """Register ``train`` and ``evaluate-transcoders`` on the top-level subparsers."""
    train = commands.add_parser("train", help="train transcoders (PLT, skip-PLT or CLT) for every layer")
    add_model_args(train)
    train.add_argument(
        "--corpus",
        action="append",
        help=".txt/.jsonl file, folder, glob or hf:DATASET[:CONFIG][@SPLIT] (repeatable; default: text "
        "sampled from the model)",
    )
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl and datasets")
    train.add_argument("--out", required=True, help="run folder; ends up holding the transcoders and metrics")
    train.add_argument("--preset", choices=sorted(PRESETS), help="named settings; flags given override them")
    train.add_argument("--kind", choices=KINDS, help="per-layer, per-layer with skip, or cross-layer")
    train.add_argument("--activation", choices=ACTIVATIONS, help="default topk")
    train.add_argument("--features", type=positive_int, help="features per layer (default 2048)")
    train.add_argument("--k", "-k", type=positive_int, help="active features per token for topk (default 32)")
    train.add_argument("--tokens", type=positive_int, help="training tokens (default 200,000)")
    train.add_argument("--batch-size", type=positive_int, help="tokens per step over all processes")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--sparsity-coef", type=float, help="sparsity penalty for jumprelu and relu")
    train.add_argument("--context-length", type=positive_int, help="tokens per context, BOS included")
    train.add_argument("--chunk-contexts", type=positive_int, help="contexts shuffled together")
    train.add_argument(
        "--groups", type=positive_int, help="shuffle groups per chunk (default: process count)"
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument(
        "--checkpoint-every", type=float, default=300.0, metavar="SECONDS", help="checkpoint interval (300)"
    )
    train.add_argument(
        "--cache-activations",
        nargs="?",
        const="",
        metavar="DIR",
        help="keep collected activations on disk and reuse them (default folder: the circuitmap cache)",
    )
    train.add_argument(
        "--eval-tokens", type=int, default=16_384, help="held-out tokens measured at the end (0 to skip)"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=lambda args: cmd_train(args, load))

    evaluate = commands.add_parser(
        "evaluate-transcoders", help="FVU, L0, dead features and the spliced model's loss on held-out text"
    )
    add_model_args(evaluate)
    evaluate.add_argument("--transcoders", required=True, help="folder, npz or hub reference")
    evaluate.add_argument(
        "--corpus", action="append", required=True, help=".txt/.jsonl file, folder, glob or hf:DATASET"
    )
    evaluate.add_argument("--text-field", default="text")
    evaluate.add_argument("--tokens", type=positive_int, default=50_000)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    evaluate.set_defaults(run=lambda args: cmd_evaluate(args, load))

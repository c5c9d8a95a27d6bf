"""``train`` and ``evaluate-transcoders``: train a transcoder set, and measure one on held-out text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuitmap.atomic import check_writable, remove_stale
from circuitmap.cache import activations_cache_dir, default_database_path
from circuitmap.cli import (
    add_model_args,
    add_settings,
    load_model_from_args,
    non_negative_int,
    positive_int,
    settings_from,
    stop_on_signals,
)
from circuitmap.training import (
    PRESETS,
    CorpusContexts,
    SampledContexts,
    TrainConfig,
    evaluate_corpus,
    evaluate_heldout,
    train_transcoders,
    training_config,
)
from circuitmap.training.distributed import is_main_process, process_device, world_size
from circuitmap.training.trainer import METRICS_NAME, FeatureDatabase
from circuitmap.transcoders import load_transcoders
from circuitmap.validation import check_number

TRAIN_FLAGS = {"d_features": ["--d-features"], "k": ["--k", "-k"], "n_tokens": ["--tokens"]}
"""Options of the training settings named otherwise than their fields."""


def register(commands) -> None:
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
    train.add_argument(
        "--preset", choices=sorted(PRESETS), help="named settings; options given override them"
    )
    names = {
        name: TRAIN_FLAGS.get(name, [f"--{name.replace('_', '-')}"]) for name in TrainConfig.field_docs()
    }
    add_settings(train, TrainConfig, names, default_note="; a preset sets its own")
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
        "--eval-tokens",
        type=non_negative_int,
        default=16_384,
        help="held-out tokens measured at the end (0 to skip)",
    )
    train.add_argument(
        "--features",
        metavar="PATH",
        help="where the set's feature database is built from the run's own activations at the end (default: "
        "the circuitmap cache, where the explorer finds it; needs --epochs > 1 or --cache-activations)",
    )
    train.add_argument(
        "--features-tokens",
        type=non_negative_int,
        default=FeatureDatabase.tokens,
        help=f"training tokens the dashboards are built from ({FeatureDatabase.tokens:,}; 0: no database)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

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
    evaluate.set_defaults(run=_evaluate)


def _print_layers(fvu: list[float], l0: list[float], dead: list[float]) -> None:
    print("layer     FVU      L0   dead")
    for layer, values in enumerate(zip(fvu, l0, dead, strict=True)):
        print(f"{layer:>5} {values[0]:>7.3f} {values[1]:>7.1f} {values[2]:>6.3f}")
    n = len(fvu)
    print(f" mean {sum(fvu) / n:>7.3f} {sum(l0) / n:>7.1f} {sum(dead) / n:>6.3f}")


def _train(args: argparse.Namespace) -> int:
    config = training_config(args.preset, world_size(), **settings_from(args, TrainConfig))
    check_number("--checkpoint-every", args.checkpoint_every, low=0)
    if args.resume and (Path(args.out) / METRICS_NAME).is_file():
        remove_stale(Path(args.out).parent)
        print(f"the run in {args.out} has finished: nothing to resume")
        return 0
    check_writable(args.out, "the run folder")
    args.device = process_device(args.device)
    model = load_model_from_args(args)
    if args.corpus:
        contexts = CorpusContexts.from_sources(
            model.tokenizer, args.corpus, config.context_length, args.text_field
        )
    else:
        print("no --corpus: the model writes its own training text (sampled, seeded)", file=sys.stderr)
        contexts = SampledContexts(model, config.context_length, config.seed)
    cache = None
    if args.cache_activations is not None:
        cache = args.cache_activations or activations_cache_dir()
    features = None
    if args.features_tokens:
        path = Path(args.features) if args.features else default_database_path
        features = FeatureDatabase(path, args.features_tokens)
    with stop_on_signals() as stop:
        result = train_transcoders(
            model,
            contexts,
            config,
            args.out,
            resume=args.resume,
            cache_dir=cache,
            checkpoint_seconds=args.checkpoint_every,
            progress=not args.quiet,
            stop=stop,
            features=features,
        )
    if not is_main_process():
        return 0
    _print_layers(result.fvu, result.l0, result.dead_fraction)
    print(f"trained on {result.tokens:,} tokens in {result.steps:,} steps ({result.seconds:.0f} s)")
    if args.eval_tokens:
        report = evaluate_heldout(model, result, contexts, args.out, args.eval_tokens)
        print(
            f"held-out ({report['tokens']:,} tokens): FVU {report['mean_fvu']:.3f}, "
            f"L0 {report['mean_l0']:.1f}; "
            f"next-token loss {report['ce_loss']:.4f} → {report['ce_loss_spliced']:.4f} with every MLP "
            f"replaced (+{report['ce_loss_increase']:.4f}), KL {report['kl']:.4f}"
        )
    print(f"wrote {Path(args.out)}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    model = load_model_from_args(args)
    transcoders = load_transcoders(args.transcoders)
    evaluation = evaluate_corpus(
        model, transcoders, args.corpus, n_tokens=args.tokens, text_field=args.text_field
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

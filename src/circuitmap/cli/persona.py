"""``persona extract|sweep|steer|project|flag|features|graph``: persona vectors from trait files, and what
they do to a model."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from circuitmap.atomic import atomic_write, check_writable
from circuitmap.cli import (
    add_feature_database_option,
    add_model_args,
    add_settings,
    feature_database,
    load_model_from_args,
    positive_int,
    settings_from,
)
from circuitmap.errors import CircuitmapError
from circuitmap.graphs import GraphFolder, NodeKind
from circuitmap.persona import (
    EndpointJudge,
    ExtractConfig,
    aligned_features,
    chat_ids,
    export_control_vector,
    extract_persona_vectors,
    load_persona_vector,
    load_trait,
    persona_graph,
    project,
    projection_difference,
    rank_samples,
    shipped_traits,
    steer,
    sweep_steering,
)
from circuitmap.persona.extract import chosen_scorer
from circuitmap.persona.runs import response_ids
from circuitmap.persona.steer import POSITIONS
from circuitmap.persona.sweep import MAX_NLL_INCREASE
from circuitmap.transcoders import load_transcoders

SWEEP_COEFFICIENTS = (-1.0, -0.5, 0.5, 1.0, 1.5)
"""Default sweep coefficients, in multiples of the layer's typical residual norm."""


def register(commands) -> None:
    persona = commands.add_parser(
        "persona", help="persona vectors: extract one from a trait file, steer, project, flag data"
    )
    actions = persona.add_subparsers(dest="persona_command", required=True)

    extract = actions.add_parser("extract", help="extract a trait's persona vector from a model")
    extract.add_argument("trait", help=f"trait file (JSON) or a shipped trait: {', '.join(shipped_traits())}")
    extract.add_argument("--out", required=True, help="persona vector file to write (.safetensors)")
    extract.add_argument("--prompt-last-out", metavar="FILE", help="also write the prompt-last-token vector")
    extract.add_argument("--gguf", metavar="FILE", help="also write the vector as a llama.cpp control vector")
    extract.add_argument("--answers", metavar="FILE", help="write every scored answer as JSON lines")
    extract.add_argument(
        "--judge-url", metavar="URL", help="score with an OpenAI-compatible endpoint instead"
    )
    extract.add_argument("--judge-model", help="the judge endpoint's model name")
    extract.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key"
    )
    add_model_args(extract)
    add_settings(extract, ExtractConfig)
    extract.set_defaults(run=_extract)

    sweep = actions.add_parser(
        "sweep", help="steer at several layers and coefficients, score the answers, choose the layer"
    )
    sweep.add_argument("vector", help="persona vector file (.safetensors)")
    sweep.add_argument("trait", help="the trait file (or shipped trait) whose held-out questions are asked")
    sweep.add_argument(
        "--layers",
        type=_integers,
        help="comma-separated layers (default: six between a quarter and three quarters of the depth)",
    )
    sweep.add_argument(
        "--coefficients",
        type=_numbers,
        default=SWEEP_COEFFICIENTS,
        help=f"comma-separated coefficients (default {','.join(f'{c:g}' for c in SWEEP_COEFFICIENTS)})",
    )
    sweep.add_argument(
        "--absolute",
        action="store_true",
        help="coefficients multiply the vector itself, not the typical norm",
    )
    sweep.add_argument(
        "--positions", choices=POSITIONS, default="all", help="positions to steer (default all)"
    )
    sweep.add_argument("--questions", type=positive_int, help="ask only the first N held-out questions")
    sweep.add_argument("--max-new-tokens", type=positive_int, default=48)
    sweep.add_argument(
        "--max-nll-increase",
        type=float,
        default=MAX_NLL_INCREASE,
        help=f"nats per token a coherent answer may lose (default {MAX_NLL_INCREASE:g})",
    )
    sweep.add_argument("--scorer", help="registered scorer (default: the trait file's)")
    sweep.add_argument(
        "--save", action="store_true", help="record the sweep and its best layer in the vector file"
    )
    sweep.add_argument("--json", help="write every point with its answers as JSON to this file")
    add_model_args(sweep)
    sweep.set_defaults(run=_sweep)

    steering = actions.add_parser("steer", help="answer a question with and without steering")
    _vector_options(steering)
    steering.add_argument("question", help="the user's message")
    steering.add_argument("--coefficient", type=float, required=True, help="multiple of the vector to add")
    steering.add_argument(
        "--relative", action="store_true", help="the coefficient is a multiple of the layer's typical norm"
    )
    steering.add_argument(
        "--positions", choices=POSITIONS, default="all", help="positions to steer (default all)"
    )
    steering.add_argument("--max-new-tokens", type=positive_int, default=40)
    steering.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    steering.add_argument("--temperature", type=float, default=1.0)
    steering.add_argument("--seed", type=int, default=0)
    steering.set_defaults(run=_steer)

    projecting = actions.add_parser("project", help="project a response's tokens on the vector")
    _vector_options(projecting)
    projecting.add_argument("--prompt", required=True, help="the user's message")
    projecting.add_argument("--response", required=True, help="the assistant's response")
    projecting.set_defaults(run=_project)

    flag = actions.add_parser("flag", help="rank (prompt, response) samples by projection difference")
    _vector_options(flag)
    flag.add_argument("data", help='JSON lines file of {"prompt": ..., "response": ...} objects')
    flag.add_argument(
        "--approximate", action="store_true", help="compare with the last prompt token instead of generating"
    )
    flag.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens of the model's answers")
    flag.add_argument("--batch-size", type=positive_int, default=16)
    flag.add_argument("--top", type=positive_int, default=10, help="samples to print (default 10)")
    flag.add_argument("--json", help="write every sample's figures as JSON to this file")
    flag.set_defaults(run=_flag)

    features = actions.add_parser(
        "features", help="the transcoder features whose writes align with the vector at a layer"
    )
    features.add_argument("vector", help="persona vector file (.safetensors)")
    features.add_argument(
        "--layer", type=int, required=True, help="the layer whose incoming residual is used"
    )
    features.add_argument(
        "--transcoders", required=True, help="transcoder set (folder, npz or hub reference)"
    )
    features.add_argument("--top", type=positive_int, default=20, help="features to list (default 20)")
    add_feature_database_option(features, "to label the features from")
    features.set_defaults(run=_features)

    graph = actions.add_parser(
        "graph", help="the attribution graph of the projection on the vector at a layer and position"
    )
    _vector_options(graph)
    graph.add_argument("--prompt", required=True, help="the user's message")
    graph.add_argument("--response", help="the assistant's response, appended after the prompt")
    graph.add_argument("--position", type=int, default=-1, help="token position read (default: the last)")
    graph.add_argument("--transcoders", required=True, help="transcoder set (folder, npz or hub reference)")
    graph.add_argument("--out", required=True, help="graph folder to write (open it with circuitmap serve)")
    add_feature_database_option(graph, "to label the features from")
    graph.set_defaults(run=_graph)


def _vector_options(parser: argparse.ArgumentParser) -> None:
    """The vector file, its layer, the system prompt and the model options."""
    parser.add_argument("vector", help="persona vector file (.safetensors)")
    parser.add_argument("--layer", type=int, required=True, help="the layer whose incoming residual is used")
    parser.add_argument("--system", help="system prompt (default: the chat template's own)")
    add_model_args(parser)


def _extract(args: argparse.Namespace) -> int:
    outputs = {
        "--out": args.out,
        "--prompt-last-out": args.prompt_last_out,
        "--gguf": args.gguf,
        "--answers": args.answers,
    }
    for option, path in outputs.items():
        if path:
            check_writable(path, f"the {option} file")
    trait = load_trait(args.trait)
    config = ExtractConfig().with_changes(**settings_from(args, ExtractConfig))
    config.check()
    scorer = None
    if args.judge_url:
        if not args.judge_model:
            raise CircuitmapError("--judge-url needs --judge-model")
        key = os.environ.get(args.judge_key_env) or None
        scorer = EndpointJudge(args.judge_url, args.judge_model, trait.eval_prompt, api_key=key)
    chosen_scorer(trait, config, scorer)
    model = load_model_from_args(args)
    extraction = extract_persona_vectors(model, trait, config, scorer=scorer)
    print(extraction.summary())
    print(f"wrote {extraction.response.save(args.out)}")
    if args.prompt_last_out:
        print(f"wrote {extraction.prompt_last.save(args.prompt_last_out)}")
    if args.gguf:
        print(f"wrote {export_control_vector(extraction.response, args.gguf)}")
    if args.answers:
        lines = [
            json.dumps({**vars(answer), "score": _finite(answer.score)}, ensure_ascii=False)
            for answer in extraction.answers
        ]
        print(f"wrote {_write_text(args.answers, ''.join(line + chr(10) for line in lines))}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "the JSON file")
    trait = load_trait(args.trait)
    scorer_name, scorer = chosen_scorer(trait, ExtractConfig(scorer=args.scorer))
    vector = load_persona_vector(args.vector)
    model = load_model_from_args(args)
    vector.check_model(model, args.vector)
    n = model.n_layers
    layers = args.layers or sorted({round(n / 4 + i * n / 10) for i in range(6)} & set(range(n)))
    questions = list(trait.eval_questions or trait.questions)[: args.questions]
    result = sweep_steering(
        model,
        vector,
        trait,
        scorer,
        layers,
        args.coefficients,
        relative=not args.absolute,
        positions=args.positions,
        questions=questions,
        max_new_tokens=args.max_new_tokens,
        max_nll_increase=args.max_nll_increase,
    )
    print(f"scorer {scorer_name}, {len(questions)} held-out questions")
    print(result.table())
    if args.save:
        vector.info["sweep"] = result.as_json()
        print(f"wrote {vector.save(args.vector)}")
    if args.json:
        text = json.dumps(result.dict_points(), indent=1, ensure_ascii=False, allow_nan=False)
        print(f"wrote {_write_text(args.json, text)}")
    return 0


def _features(args: argparse.Namespace) -> int:
    vector = load_persona_vector(args.vector)
    transcoders = load_transcoders(args.transcoders)
    if (transcoders.d_model, transcoders.n_layers) != (vector.d_model, vector.n_layers):
        raise CircuitmapError(
            f"{args.vector} was extracted from a model of width {vector.d_model} with {vector.n_layers} "
            f"layers; the transcoders have width {transcoders.d_model} and {transcoders.n_layers} layers"
        )
    with feature_database(args.features, transcoders) as store:
        found = aligned_features(transcoders, vector, args.layer, top=args.top, features=store)
    print(f"features writing into the residual entering layer {args.layer}, by |cosine| with the vector")
    print(" cosine  feature   label")
    for item in found:
        print(f"{item.cosine:>+7.3f}  {item.node:<8}  {item.label or ''}")
    return 0


def _graph(args: argparse.Namespace) -> int:
    check_writable(args.out, "the graph folder")
    vector = load_persona_vector(args.vector)
    transcoders = load_transcoders(args.transcoders)
    model = load_model_from_args(args)
    vector.check_model(model, args.vector)
    ids = chat_ids(model, args.prompt, args.system)
    if args.response:
        ids = torch.cat([ids, response_ids(model, args.response)])
    with feature_database(args.features, transcoders) as store:
        computed = persona_graph(
            model, transcoders, vector, args.layer, ids, position=args.position, features=store
        )
    GraphFolder(args.out).write(computed.graph, computed.document)
    graph = computed.graph
    print(
        f"target {graph.target_names[0]!r} at position {len(graph.tokens) - 1} "
        f"({graph.token_strings[-1]!r}): {graph.value[graph.nodes_of(NodeKind.TARGET)[0]]:+.3f}"
    )
    print(f"{graph.n_features} features; wrote {args.out}")
    return 0


def _integers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _numbers(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _steer(args: argparse.Namespace) -> int:
    vector = load_persona_vector(args.vector)
    model = load_model_from_args(args)
    vector.check_model(model, args.vector)
    ids = chat_ids(model, args.question, args.system)
    settings = dict(greedy=not args.sample, temperature=args.temperature, seed=args.seed)
    print(f"unsteered: {model.generate(ids, args.max_new_tokens, **settings)}")
    with steer(
        model, vector, args.layer, args.coefficient, args.positions, args.relative, prompt=ids
    ) as handle:
        text = model.generate(ids, args.max_new_tokens, **settings, before_forward=handle.at_position)
    scale = "× typical norm" if args.relative else ""
    print(f"steered (layer {args.layer}, coefficient {args.coefficient:g}{scale}, {args.positions}): {text}")
    return 0


def _project(args: argparse.Namespace) -> int:
    vector = load_persona_vector(args.vector)
    model = load_model_from_args(args)
    vector.check_model(model, args.vector)
    projection = project(model, vector, args.layer, args.prompt, args.response, system=args.system)
    print(f"last prompt token: {projection.last_prompt:+.3f}")
    for token, value in zip(projection.tokens, projection.per_token.tolist(), strict=True):
        print(f"{value:+9.3f}  {token!r}")
    print(f"mean over the response: {projection.mean:+.3f}")
    return 0


def _flag(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "the JSON file")
    dataset = _samples(Path(args.data))
    vector = load_persona_vector(args.vector)
    model = load_model_from_args(args)
    vector.check_model(model, args.vector)
    samples = projection_difference(
        model,
        vector,
        args.layer,
        dataset,
        system=args.system,
        approximate=args.approximate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    differences = [s.difference for s in samples if not math.isnan(s.difference)]
    if differences:
        mean = sum(differences) / len(differences)
        print(f"mean projection difference over {len(differences)} samples: {mean:+.3f}")
    print(" rank  sample  difference  projection  baseline  prompt")
    for rank, sample in enumerate(rank_samples(samples, args.top), start=1):
        print(
            f"{rank:>5} {sample.index:>7} {sample.difference:>+11.3f} {sample.projection:>+11.3f} "
            f"{sample.baseline:>+9.3f}  {sample.prompt[:60]!r}"
        )
    if args.json:
        document = [
            {
                **vars(sample),
                **{key: _finite(getattr(sample, key)) for key in ("projection", "baseline", "difference")},
            }
            for sample in samples
        ]
        text = json.dumps(document, indent=1, ensure_ascii=False, allow_nan=False)
        print(f"wrote {_write_text(args.json, text)}")
    return 0


def _samples(path: Path) -> list[tuple[str, str]]:
    """The (prompt, response) samples of a JSON lines file; a one-line error naming the line otherwise."""
    if not path.is_file():
        raise CircuitmapError(f"{path}: data file not found")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CircuitmapError(f"{path}:{number}: not JSON") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(key), str) for key in ("prompt", "response")
        ):
            raise CircuitmapError(f'{path}:{number}: expected an object with "prompt" and "response" strings')
        samples.append((record["prompt"], record["response"]))
    if not samples:
        raise CircuitmapError(f"{path}: no samples")
    return samples


def _write_text(path: str, text: str) -> Path:
    """``text`` in the file ``path``, written whole or not at all."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _finite(value: float) -> float | None:
    """A number for strict JSON: NaN becomes None."""
    return None if math.isnan(value) else value

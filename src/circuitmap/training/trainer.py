"""The training loop: chunks of pairs in, a transcoder set for every layer out; resumable and distributed.

Every step trains all layers on the same tokens. Adam with linear warm-up, a constant rate and a linear decay
over the last ``decay_fraction`` of the steps; gradient clipping; the sparsity coefficient (ReLU, JumpReLU)
ramps up over ``sparsity_warmup`` of the steps; features silent for ``dead_tokens`` tokens get the auxiliary
loss. With ``epochs`` > 1 the run collects ``n_tokens / epochs`` tokens once, keeps them in an activation
cache (the run folder's unless one is given) and passes over them again, reshuffled within each chunk.

The run folder holds ``training.json`` (settings), ``training_log.jsonl`` (metrics every ``log_every`` steps)
and a checkpoint, written atomically at most ``checkpoint_seconds`` apart and when the run is stopped.
When training ends the folder is replaced by the transcoder set, the log and ``metrics.json``.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from circuitmap.atomic import remove_stale, replace_folder
from circuitmap.errors import CircuitmapError, Interrupted, TrainingDiverged
from circuitmap.models import Model
from circuitmap.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from circuitmap.training.config import TrainConfig
from circuitmap.training.data import (
    ActivationCache,
    CorpusContexts,
    PairChunks,
    SampledContexts,
    group_batches,
    model_identity,
)
from circuitmap.training.distributed import ProcessGroup
from circuitmap.training.evaluate import evaluate_transcoders
from circuitmap.training.trainable import Standardiser, TrainableTranscoders
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_number

RUN_NAME = "training.json"
LOG_NAME = "training_log.jsonl"
METRICS_NAME = "metrics.json"
LOCK_NAME = ".lock"
STARTED_FILES = frozenset({RUN_NAME, LOG_NAME, LOCK_NAME, "activations"})
"""What a run folder holds before its first checkpoint (the activation cache of a multi-pass run included)."""


@dataclass
class TrainResult:
    """The trained set and the metrics of the last logging window (per layer, and means over layers)."""

    transcoders: Transcoders
    fvu: list[float]
    l0: list[float]
    dead_fraction: list[float]
    tokens: int
    steps: int
    next_chunk: int
    seconds: float
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = len(self.fvu)
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "seconds": self.seconds,
            "mean_fvu": sum(self.fvu) / n,
            "mean_l0": sum(self.l0) / n,
            "mean_dead_fraction": sum(self.dead_fraction) / n,
            "fvu": self.fvu,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "config": self.config,
        }


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last ``decay_fraction`` of the steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = int(total * config.decay_fraction)
    if decay_steps and step >= total - decay_steps:
        return config.lr * (total - step) / decay_steps
    return config.lr


def sparsity_coefficient(step: int, total: int, config: TrainConfig) -> float:
    warmup = config.sparsity_warmup * total
    return config.sparsity_coef * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


class _Counters:
    """What the loop tracks besides weights: last firing per feature and the current logging window."""

    def __init__(self, n_layers: int, d_features: int):
        self.last_active = torch.zeros(n_layers, d_features, dtype=torch.long)
        self.window = torch.zeros(3, n_layers, dtype=torch.float64)
        self.window_tokens = 0

    def metrics(self, tokens: int, dead_tokens: int) -> dict:
        squared_error, energy, active = self.window
        dead = (tokens - self.last_active) >= max(1, min(dead_tokens, tokens))
        return {
            "fvu": (squared_error / energy.clamp_min(1e-30)).tolist(),
            "l0": (active / max(1, self.window_tokens)).tolist(),
            "dead_fraction": dead.double().mean(1).tolist(),
        }

    def reset_window(self) -> None:
        self.window.zero_()
        self.window_tokens = 0


def _run_description(model: Model, contexts, config: TrainConfig) -> dict:
    return {"config": config.to_dict(), "model": model_identity(model), "source": contexts.description}


def _differences(old: dict, new: dict) -> list[str]:
    changes = []
    for key in sorted(set(old["config"]) | set(new["config"])):
        if old["config"].get(key) != new["config"].get(key):
            changes.append(f"{key} {old['config'].get(key)!r} → {new['config'].get(key)!r}")
    if old["model"] != new["model"]:
        changes.append(f"model {old['model'].get('model')!r} → {new['model'].get('model')!r}")
    if old["source"] != new["source"]:
        changes.append(f"text source {old['source']!r} → {new['source']!r}")
    return changes


@contextmanager
def _claimed(out: Path, run: dict, resume: bool, group: ProcessGroup) -> Iterator[bool]:
    """Hold the run folder for this run (a lock, so that two trainers never share one) and yield whether the
    run resumes from its checkpoint. Refuse a folder that does not fit; a run that never reached its first
    checkpoint (killed, or a full disk) starts again, with or without ``resume``. The main process decides
    and prepares the folder; the others follow its verdict."""
    verdict: str | bool = False
    lock = None
    if group.main:
        created = not out.exists()
        try:
            lock = _lock(out)
            verdict = _prepare(out, run, resume)
        except CircuitmapError as error:
            verdict = str(error)
            if created and lock is not None:
                lock.close()
                lock = None
                shutil.rmtree(out, ignore_errors=True)
    refused = group.max(torch.tensor([float(isinstance(verdict, str))]))
    try:
        if bool(refused[0]):
            raise CircuitmapError(verdict if isinstance(verdict, str) else f"{out} cannot hold this run")
        resumes = group.max(torch.tensor([float(verdict is True)]))
        yield bool(resumes[0])
    finally:
        if lock is not None:
            lock.close()


def _check_source(contexts: CorpusContexts | SampledContexts, config: TrainConfig) -> None:
    """A one-line error, before anything is written, for a corpus that cannot fill one batch (its first
    chunk is read now and kept for the run)."""
    if not isinstance(contexts, CorpusContexts):
        return
    first = contexts.chunk(0, config.chunk_contexts)
    if first is None or len(first) * (config.context_length - 1) < config.batch_size:
        raise CircuitmapError("the text source is too small to fill a single training batch")


def _lock(out: Path):
    """An exclusive lock on the run folder (created if needed), or a one-line error when another run
    holds it."""
    if out.exists() and not out.is_dir():
        raise CircuitmapError(f"--out {out} is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / LOCK_NAME).open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CircuitmapError(f"another training run is using {out}") from None
    return handle


def _prepare(out: Path, run: dict, resume: bool) -> bool:
    """Check the run folder (see ``_claimed``) and write the run's settings; True when it resumes. What
    killed writes left in and beside the folder goes first."""
    remove_stale(out)
    remove_stale(out.parent)
    if (out / CHECKPOINT_NAME).is_file():
        if not resume:
            raise CircuitmapError(
                f"--out {out} is not an empty folder (it holds an unfinished run: add --resume)"
            )
        changes = _differences(json.loads((out / RUN_NAME).read_text()), run)
        if changes:
            raise CircuitmapError(
                f"cannot resume {out}: its run used other settings ({'; '.join(changes)}); "
                "repeat the original settings or train into a new --out"
            )
        return True
    if (out / METRICS_NAME).is_file():
        raise CircuitmapError(
            f"nothing to resume: the run in {out} has finished"
            if resume
            else f"--out {out} is not an empty folder (it holds a finished run)"
        )
    others = [entry.name for entry in out.iterdir() if entry.name not in STARTED_FILES]
    if others or (resume and not (out / RUN_NAME).is_file()):
        raise CircuitmapError(
            f"nothing to resume: {out} holds no training run"
            if resume
            else f"--out {out} is not an empty folder"
        )
    if (out / RUN_NAME).is_file():
        print(f"the run in {out} never reached a checkpoint: starting it again", file=sys.stderr)
        (out / LOG_NAME).unlink(missing_ok=True)
    (out / RUN_NAME).write_text(json.dumps(run, indent=2))
    return False


def _checkpoint_tensors(module, optimiser, standardiser: Standardiser, counters: _Counters) -> dict:
    tensors = {f"module.{name}": value for name, value in module.state_dict().items()}
    for index, parameter in enumerate(optimiser.param_groups[0]["params"]):
        for name, value in optimiser.state.get(parameter, {}).items():
            tensors[f"optimiser.{index}.{name}"] = value
    tensors.update({f"standardiser.{name}": value for name, value in standardiser.state().items()})
    tensors["counters.last_active"] = counters.last_active
    tensors["counters.window"] = counters.window
    return tensors


def _restore(tensors: dict, module, optimiser, counters: _Counters) -> Standardiser:
    module.load_state_dict({name[7:]: value for name, value in tensors.items() if name.startswith("module.")})
    for index, parameter in enumerate(optimiser.param_groups[0]["params"]):
        prefix = f"optimiser.{index}."
        state = {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
        if state:
            optimiser.state[parameter] = {
                name: value.to(parameter.device) if name != "step" else value for name, value in state.items()
            }
    counters.last_active = tensors["counters.last_active"]
    counters.window = tensors["counters.window"]
    return Standardiser(
        **{name: tensors[f"standardiser.{name}"] for name in ("mean_in", "scale_in", "mean_out", "scale_out")}
    )


def _fit_standardiser(pairs: list[torch.Tensor], group: ProcessGroup, d_model: int) -> Standardiser:
    n_layers = pairs[0].shape[1]
    sums = torch.zeros(n_layers, 2, d_model, dtype=torch.float64)
    squares = torch.zeros(n_layers, 2, dtype=torch.float64)
    count = torch.zeros(1, dtype=torch.float64)
    for block in pairs:
        values = block.double()
        sums += values.sum(0)
        squares += values.pow(2).sum((0, 3))
        count += len(values)
    group.sum(sums), group.sum(squares), group.sum(count)
    return Standardiser.from_sums(sums, squares, float(count), d_model)


def _least_squares_skip(
    chunk_pairs: Iterable[list[torch.Tensor] | None],
    standardiser: Standardiser,
    group: ProcessGroup,
    ridge: float,
) -> torch.Tensor:
    """The skip weights ``[L, d, d]`` that predict each layer's standardised MLP output best as a linear map
    of its standardised input, over the pairs of ``chunk_pairs`` (each chunk's list of this process's
    groups; a None ends them), by ridge regression, the penalty ``ridge`` times the mean input variance.
    The sparse features then start from what a linear map cannot explain."""
    covariance = cross = None
    count = torch.zeros(1, dtype=torch.float64)
    for pairs in chunk_pairs:
        if pairs is None:
            break
        for block in pairs:
            for first in range(0, len(block), 4096):
                x, y = standardiser.apply(block[first : first + 4096])
                xx, xy = torch.bmm(x.transpose(1, 2), x).double(), torch.bmm(x.transpose(1, 2), y).double()
                covariance = xx if covariance is None else covariance + xx
                cross = xy if cross is None else cross + xy
                count += x.shape[1]
    group.sum(covariance), group.sum(cross), group.sum(count)
    covariance, cross = covariance / count, cross / count
    d_model = covariance.shape[-1]
    penalty = ridge * covariance.diagonal(dim1=1, dim2=2).mean(-1)
    regularised = covariance + penalty[:, None, None] * torch.eye(d_model, dtype=torch.float64)
    return torch.linalg.solve(regularised, cross).transpose(1, 2).float()


@dataclass(frozen=True)
class FeatureDatabase:
    """Where and how a training run builds its set's feature database from the activations it cached."""

    path: Path | Callable[[Transcoders], Path]
    """The database file, or a function of the trained set that names it."""
    tokens: int = 65_536
    """At most this many of the run's tokens are read."""

    def build(
        self,
        model: Model,
        transcoders: Transcoders,
        shards: Iterator[tuple[torch.Tensor, torch.Tensor]],
        context_length: int,
        description: str,
        progress: bool,
    ):
        # imported here: the feature builder reads corpora with this package's text helpers
        from circuitmap.features.build import BuildConfig, build_features_from_activations

        path = self.path(transcoders) if callable(self.path) else self.path
        config = BuildConfig(tokens=self.tokens, context_length=context_length)
        config = config.with_changes(window=min(config.window, context_length))
        report = build_features_from_activations(
            model, transcoders, shards, path, config, f"training text: {description}", progress=progress
        )
        tqdm.write(
            f"feature database: {report.path} ({report.tokens:,} tokens of the training text, "
            f"{report.seconds:.0f} s)",
            file=sys.stderr,
        )
        return report


def _cached_inputs(
    cache: ActivationCache, n_chunks: int, local_groups: list[int], config: TrainConfig
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contexts and MLP inputs ``[n, T − 1, L, d]`` of the cached chunks, in the order they were read."""
    for chunk in range(n_chunks):
        for group in local_groups:
            contexts, pairs = cache.load_contexts(chunk, group), cache.load(chunk, group)
            if contexts is None or pairs is None:
                return
            yield contexts, pairs.view(len(contexts), config.context_length - 1, *pairs.shape[1:])[..., 0, :]


def _notice(group: ProcessGroup, message: str) -> None:
    if group.main:
        tqdm.write(message, file=sys.stderr)


def _finish_folder(out: Path, transcoders: Transcoders, summary: dict) -> None:
    """Replace the run folder by the transcoder set, keeping the settings and the log beside it."""

    def fill(final: Path) -> None:
        transcoders.save(final, overwrite=True)
        for name in (RUN_NAME, LOG_NAME):
            if (out / name).exists():
                shutil.copy2(out / name, final / name)
        (final / METRICS_NAME).write_text(json.dumps(summary, indent=2))

    replace_folder(out, fill)


def train_transcoders(
    model: Model,
    contexts: CorpusContexts | SampledContexts,
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    checkpoint_seconds: float = 300.0,
    log_every: int = 10,
    progress: bool = True,
    stop: threading.Event | None = None,
    features: FeatureDatabase | None = None,
) -> TrainResult:
    """Train a transcoder set on the pairs of ``contexts`` and save it (with its log) to ``out``.

    With ``features`` the set's feature database is built at the end from the activations the run cached
    (a run of several epochs, or one given ``cache_dir``), without running the model again.

    Setting ``stop`` (from a signal handler, another thread…) ends the run after the current step: a
    checkpoint is written and ``Interrupted`` raised; ``resume=True`` continues from there. In a distributed
    run the first process to see its event set stops them all."""
    config.check()
    check_number("checkpoint_seconds", checkpoint_seconds, low=0)
    check_number("log_every", log_every, low=1, whole=True)
    model.check_length(config.context_length, "a training context (--context-length)")
    _check_source(contexts, config)
    started = time.monotonic()
    group = ProcessGroup.from_environment(model.device)
    if config.groups % group.world:
        raise CircuitmapError(
            f"groups={config.groups} must be a multiple of the number of processes ({group.world})"
        )
    out = Path(out)
    run = _run_description(model, contexts, config)
    with _claimed(out, run, resume, group) as resume:
        n_layers, d_model = model.n_layers, model.d_model
        module = TrainableTranscoders(n_layers, d_model, config).to(model.device)
        optimiser = torch.optim.Adam(
            module.parameters(), lr=config.lr, fused=model.device.type in ("cpu", "cuda")
        )
        counters = _Counters(n_layers, config.d_features)
        step = tokens = 0
        standardiser = None
        last_saved_step = None
        if resume:
            tensors, meta = load_checkpoint(out)
            standardiser = _restore(tensors, module, optimiser, counters)
            step, tokens, counters.window_tokens = meta["step"], meta["tokens"], meta["window_tokens"]
            last_saved_step = step
            _notice(group, f"resuming {out} at step {step:,} ({tokens:,} tokens)")
        trained = DistributedDataParallel(module) if group.world > 1 else module

        local_groups = list(range(group.rank, config.groups, group.world))
        per_group = config.batch_size // config.groups
        steps_per_chunk = (config.chunk_contexts // config.groups) * (config.context_length - 1) // per_group
        total_steps = math.ceil(config.n_tokens / config.batch_size)
        chunks_per_epoch = math.ceil(total_steps / config.epochs / steps_per_chunk)
        if config.epochs > 1 and cache_dir is None:
            cache_dir = out / "activations"
        cache = None
        if cache_dir is not None:
            identity = {
                **run["model"],
                "source": contexts.description,
                "context_length": config.context_length,
                "chunk_contexts": config.chunk_contexts,
                "groups": config.groups,
                "model_batch_size": config.model_batch_size,
            }
            cache = ActivationCache(cache_dir, identity)
        log = (out / LOG_NAME).open("a") if group.main else None
        last_save = time.monotonic()
        chunk_index, offset = divmod(step, steps_per_chunk)
        contexts_per_chunk = len(local_groups) * (config.chunk_contexts // config.groups)
        chunk_tokens = contexts_per_chunk * (config.context_length - 1)
        chunks_to_read = chunks_per_epoch if config.epochs > 1 else math.ceil(total_steps / steps_per_chunk)
        text_bar = tqdm(
            total=chunks_to_read * chunk_tokens,
            initial=min(chunk_index, chunks_to_read) * chunk_tokens,
            desc="sampling text" if isinstance(contexts, SampledContexts) else "reading text",
            unit="tok",
            unit_scale=True,
            disable=not (progress and group.main),
        )
        bar = tqdm(
            total=total_steps * config.batch_size,
            initial=tokens,
            desc="training",
            unit="tok",
            unit_scale=True,
            disable=not (progress and group.main),
        )
        chunks = PairChunks(
            model,
            contexts,
            chunk_contexts=config.chunk_contexts,
            groups=config.groups,
            local_groups=local_groups,
            model_batch_size=config.model_batch_size,
            cache=cache,
            progress=text_bar.update,
        )

        def checkpoint() -> None:
            nonlocal last_save, last_saved_step
            if group.main:
                meta = {"run": run, "step": step, "tokens": tokens, "window_tokens": counters.window_tokens}
                save_checkpoint(out, _checkpoint_tensors(module, optimiser, standardiser, counters), meta)
            last_save, last_saved_step = time.monotonic(), step
            group.barrier()

        reported = None

        def log_window(loss: float) -> dict:
            """Metrics of the steps since the last report, to the bar and the log. The window then starts
            afresh, unless fewer than ``log_every`` steps remain: the last report then covers a full window or
            more."""
            metrics = counters.metrics(tokens, config.dead_tokens)
            mean_fvu, mean_l0 = sum(metrics["fvu"]) / n_layers, sum(metrics["l0"]) / n_layers
            bar.set_postfix(fvu=f"{mean_fvu:.3f}", l0=f"{mean_l0:.1f}")
            if log is not None:
                record = {
                    "step": step,
                    "tokens": tokens,
                    "seconds": round(time.monotonic() - started, 2),
                    "lr": learning_rate(step - 1, total_steps, config),
                    "loss": loss,
                    "mean_fvu": mean_fvu,
                    "mean_l0": mean_l0,
                    **metrics,
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
            if total_steps - step >= log_every:
                counters.reset_window()
            return metrics

        exhausted = False
        loss = math.nan
        with text_bar, bar:
            while step < total_steps:
                data_chunk = chunk_index % chunks_per_epoch if config.epochs > 1 else chunk_index
                pairs = chunks.chunk(data_chunk)
                available = min(len(p) for p in pairs) // per_group if pairs is not None else 0
                steps_here = group.min_int(min(available, steps_per_chunk))
                if steps_here == 0:
                    exhausted = True
                    break
                if standardiser is None:
                    standardiser = _fit_standardiser(pairs, group, d_model)
                    if module.W_skip is not None:
                        # a multi-pass run collects (and caches) its first pass now; this chunk is in hand
                        later = range(1, chunks_per_epoch if config.epochs > 1 else 1)
                        fitted = itertools.chain([pairs], (chunks.chunk(index) for index in later))
                        _notice(group, "solving the linear skip paths by least squares")
                        module.W_skip.data.copy_(
                            _least_squares_skip(fitted, standardiser, group, config.skip_ridge)
                        )
                batches = group_batches(
                    pairs, per_group, steps_here, chunk_index, config.seed, local_groups, start=offset
                )
                for batch in batches:
                    x, y = standardiser.apply(batch.to(model.device))
                    dead = None
                    if tokens >= config.dead_tokens:
                        mask = (tokens - counters.last_active) >= config.dead_tokens
                        dead = mask.to(model.device) if bool(mask.any()) else None
                    for parameter_group in optimiser.param_groups:
                        parameter_group["lr"] = learning_rate(step, total_steps, config)
                    output = trained(x, y, dead, sparsity_coefficient(step, total_steps, config))
                    stats = torch.cat(
                        [
                            output.loss.detach().double().reshape(1) / group.world,
                            output.squared_error.double(),
                            output.target_energy.double(),
                            output.active.double(),
                            output.fired.double().flatten(),
                        ]
                    ).cpu()
                    group.sum(stats)
                    loss = float(stats[0])
                    if not math.isfinite(float(stats[0])):
                        errors = stats[1 : 1 + n_layers]
                        bad = [layer for layer in range(n_layers) if not math.isfinite(float(errors[layer]))]
                        where = f"layer {bad[0]}" if bad else "the sparsity or auxiliary term"
                        kept = (
                            f"the last good checkpoint (step {last_saved_step:,}) is kept in {out}"
                            if last_saved_step is not None
                            else "no checkpoint had been written yet"
                        )
                        raise TrainingDiverged(
                            f"training diverged at step {step:,}: the loss of {where} is not finite; {kept}; "
                            "lower --lr and resume or restart"
                        )
                    optimiser.zero_grad(set_to_none=True)
                    output.loss.backward()
                    torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                    optimiser.step()
                    module.normalise_decoder()
                    step += 1
                    tokens += config.batch_size
                    counters.window += stats[1 : 1 + 3 * n_layers].view(3, n_layers)
                    counters.window_tokens += config.batch_size
                    fired = stats[1 + 3 * n_layers :].view(n_layers, -1) > 0
                    counters.last_active[fired] = tokens
                    bar.update(config.batch_size)
                    if step % log_every == 0 or step == total_steps:
                        reported = log_window(float(stats[0]))
                    stop_now = group.max(torch.tensor([float(stop is not None and stop.is_set())]))
                    if bool(stop_now[0]):
                        checkpoint()
                        raise Interrupted(
                            f"interrupted at step {step:,} of {total_steps:,}; the checkpoint is saved: "
                            "run the same command with --resume to continue"
                        )
                    if step >= total_steps:
                        break
                    if time.monotonic() - last_save >= checkpoint_seconds:
                        checkpoint()
                offset = 0
                chunk_index += 1
            if counters.window_tokens:
                reported = log_window(loss)
        if log is not None:
            log.close()
        if step == 0:
            raise CircuitmapError("the text source is too small to fill a single training batch")
        if exhausted:
            _notice(
                group,
                f"the text ran out after {tokens:,} of the {total_steps * config.batch_size:,} requested "
                "tokens; the set is trained on what exists",
            )
        if reported is None:
            last = (out / LOG_NAME).read_text().splitlines()[-1]
            reported = {name: json.loads(last)[name] for name in ("fvu", "l0", "dead_fraction")}
        transcoders = module.to_transcoders(standardiser, model_name=model.name)
        if features is not None and group.main:
            if cache is None:
                _notice(group, "no feature database: the run kept no activations (one epoch, no cache_dir)")
            else:
                shards = _cached_inputs(cache, min(chunk_index, chunks_to_read), local_groups, config)
                features.build(
                    model, transcoders, shards, config.context_length, contexts.description, progress
                )
        result = TrainResult(
            transcoders=transcoders,
            tokens=tokens,
            steps=step,
            next_chunk=(min(chunk_index, chunks_per_epoch - 1) if config.epochs > 1 else chunk_index) + 1,
            seconds=time.monotonic() - started,
            config=config.to_dict(),
            **reported,
        )
        if group.main:
            _finish_folder(out, transcoders, result.summary())
        group.barrier()
        return result


def evaluate_heldout(
    model: Model,
    result: TrainResult,
    contexts: CorpusContexts | SampledContexts,
    out: str | Path,
    n_tokens: int,
) -> dict:
    """Measure a finished run's set on ``n_tokens`` tokens of text it never saw (the chunks after its last),
    add the report to the run's ``metrics.json`` under ``heldout`` and return it."""
    config = TrainConfig.from_dict(result.config)
    n_contexts = -(-n_tokens // (config.context_length - 1))
    heldout = contexts.heldout(result.next_chunk, config.chunk_contexts, n_contexts)
    report = evaluate_transcoders(model, result.transcoders, heldout, n_tokens=n_tokens).report()
    path = Path(out) / METRICS_NAME
    metrics = json.loads(path.read_text())
    metrics["heldout"] = report
    path.write_text(json.dumps(metrics, indent=2))
    return report

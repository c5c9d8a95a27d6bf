"""Compute graphs for the explorer in the background: one worker thread, a queue, progress and cancel.

The ``Engine`` holds the model and transcoders the server was started with. Jobs run one at a time (the model
is not shared between threads) through the graph pipeline (``circuitmap.pipeline``); each reports its stage
and rows done through ``attribute``'s progress callback, and its cancel event is the computation's stop
event: the computation ends after its current batch and nothing is written. A finished graph folder is
written as one unit, so the list never shows half a graph. With a feature database, every feature node is
written with its feature's current label.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from circuitmap.attribution import AttributionConfig
from circuitmap.errors import CircuitmapError, Interrupted, StoreError
from circuitmap.features import FeatureStore
from circuitmap.graphs.export import prompt_slug
from circuitmap.graphs.pruning import PruneConfig
from circuitmap.models import Model
from circuitmap.pipeline import compute_graph
from circuitmap.server.store import GraphStore, check_name
from circuitmap.transcoders import Transcoders
from circuitmap.validation import check_text

MAX_PROMPT = 4000
MAX_JOBS_KEPT = 50


@dataclass
class Engine:
    """The model and transcoders graphs are computed with, and the settings of new graphs."""

    model: Model
    """The model the server computes graphs and interventions with."""
    transcoders: Transcoders
    """Its transcoder set."""
    model_spec: str
    """How the model was named when loaded (shown in the page)."""
    transcoders_spec: str
    """How the transcoder set was named when loaded (shown in the page)."""
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    """Settings of the graphs computed from the page."""
    pruning: PruneConfig = field(default_factory=PruneConfig)
    """How those graphs are pruned into their viewer documents."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Held while the model runs: one computation at a time."""

    def __post_init__(self) -> None:
        self.transcoders.check_model(self.model.n_layers, self.model.d_model)
        self.transcoders.follow(self.model.layer_devices(), self.model.dtype)


@dataclass
class Job:
    """One graph to compute, and what the explorer shows of it."""

    id: str
    prompt: str
    name: str
    state: str = "queued"
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = "waiting for the worker"
    graph: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "state": self.state,
            "stage": self.stage,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "graph": self.graph,
            "error": self.error,
        }


class Jobs:
    """The queue of graph computations of one server (see the module docstring)."""

    def __init__(self, engine: Engine, store: GraphStore, features: FeatureStore | None = None):
        self.engine = engine
        self.store = store
        self.features = features
        self._jobs: dict[str, Job] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="circuitmap-jobs", daemon=True)
        self._worker.start()

    def submit(self, prompt: str, name: str | None = None) -> Job:
        """Queue the graph of ``prompt``, to be saved as ``name`` (default: made from the prompt)."""
        check_text("the prompt", prompt, max_length=MAX_PROMPT)
        self.engine.model.encode(prompt)
        name = check_name(name) if name else prompt_slug(prompt)
        with self._lock:
            job = Job(id=str(next(self._numbers)), prompt=prompt, name=name)
            self._jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise StoreError(f"no job {job_id!r}", 404)
        return job

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)

    def cancel(self, job_id: str) -> Job:
        """Ask a queued or running job to stop; finished jobs are left as they are."""
        job = self.get(job_id)
        if job.state in ("queued", "running"):
            job.cancel.set()
            job.message = "cancelling"
        return job

    def close(self) -> None:
        """Cancel every job and stop the worker."""
        for job in list(self._jobs.values()):
            job.cancel.set()
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _forget_old(self) -> None:
        finished = [job for job in self.all() if job.state in ("done", "failed", "cancelled")]
        for job in finished[MAX_JOBS_KEPT:]:
            del self._jobs[job.id]

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel.is_set():
                job.state, job.message = "cancelled", "cancelled before it started"
                continue
            job.state, job.message = "running", "starting"
            try:
                job.graph = self._run(job)
            except Interrupted:
                job.state, job.message = "cancelled", "cancelled"
            except CircuitmapError as error:
                job.state, job.error, job.message = "failed", str(error), "failed"
            except (
                Exception
            ) as error:  # a failed job must not stop the worker; the error is shown to the user
                job.state, job.error, job.message = "failed", f"{type(error).__name__}: {error}", "failed"
            else:
                job.state, job.message = "done", f"saved as {job.graph}"

    def _run(self, job: Job) -> str:
        engine = self.engine

        def progress(stage: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = stage, done, total
            job.message = f"{stage}: {done:,} of {total:,} rows" if total > 1 else stage

        with engine.lock:
            computed = compute_graph(
                engine.model,
                engine.transcoders,
                job.prompt,
                engine.attribution,
                engine.pruning,
                features=self.features,
                slug=job.name,
                progress=progress,
                stop=job.cancel,
            )
        if job.cancel.is_set():
            raise Interrupted("cancelled")
        job.message = "writing"
        return self.store.add(job.name, computed.graph, computed.document)

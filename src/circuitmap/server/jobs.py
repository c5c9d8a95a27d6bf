"""Compute graphs for the explorer in the background: one worker thread, a queue, progress and cancel.

The ``Engine`` holds the model and transcoders the server was started with. Jobs run one at a time (the model
is not shared between threads); each reports its stage and rows done through ``attribute``'s progress
callback, which is also where a cancel request takes effect: the callback raises, the computation unwinds
and nothing is written. A finished graph is written to a hidden folder and renamed into the graph folder,
so the list never shows half a graph. With a feature database, every feature node is written with its
feature's current label.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from circuitmap.attribution import attribute
from circuitmap.errors import CircuitmapError
from circuitmap.features import FeatureStore, add_logit_lens
from circuitmap.features.graph_labels import add_feature_labels
from circuitmap.graphs.export import graph_json, prompt_slug, write_graph_json
from circuitmap.models import Model
from circuitmap.server.store import DOCUMENT, FULL_GRAPH, GraphStore, StoreError, check_name
from circuitmap.transcoders import Transcoders

MAX_PROMPT = 4000
MAX_JOBS_KEPT = 50


class JobCancelled(Exception):
    """Raised inside a running computation when its job is cancelled."""


@dataclass
class Engine:
    """The model and transcoders graphs are computed with, and the export settings of new graphs."""

    model: Model
    transcoders: Transcoders
    model_spec: str
    transcoders_spec: str
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    max_feature_nodes: int | None = None
    lens_tokens: int = 10
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.transcoders.check_model(self.model.n_layers, self.model.d_model)
        self.transcoders.to(device=self.model.device, dtype=self.model.dtype)


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
        if not isinstance(prompt, str) or not prompt.strip():
            raise StoreError("the prompt is empty")
        if len(prompt) > MAX_PROMPT:
            raise StoreError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT} are allowed")
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
            except JobCancelled:
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
            if job.cancel.is_set():
                raise JobCancelled
            job.stage, job.done, job.total = stage, done, total
            job.message = f"{stage}: {done:,} of {total:,} rows"

        with engine.lock:
            graph = attribute(
                engine.model,
                engine.transcoders,
                job.prompt,
                max_feature_nodes=engine.max_feature_nodes,
                progress=progress,
            )
            job.message = "pruning and writing"
            document = graph_json(
                graph,
                slug=job.name,
                node_threshold=engine.node_threshold,
                edge_threshold=engine.edge_threshold,
            )
            add_logit_lens(document, engine.model, engine.transcoders, engine.lens_tokens)
        if job.cancel.is_set():
            raise JobCancelled
        if self.features is not None:
            add_feature_labels(document, self.features)

        def write(folder: Path, name: str) -> None:
            document["metadata"]["slug"] = name
            graph.save(folder / FULL_GRAPH)
            write_graph_json(document, folder / DOCUMENT)

        return self.store.add(job.name, write)

"""Faults injected into a command-line run in a child process: killed outright, or out of disk space.

A run counts the calls of the functions that make files appear or go (``os.replace``, ``os.rename``,
``circuitmap.atomic._exchange``, ``shutil.rmtree``), ``os.fsync``, and the feature database's
transactions (a build's checkpoints and final write of the dashboards, label edits). With a fault at
call ``n`` it either ends the process there with ``os._exit`` (no clean-up code runs, as after SIGKILL or
a power cut) or makes that call fail with ENOSPC, as a full disk does. Without a fault it only reports
the calls it made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
POINTS = {
    "os": ("replace", "rename", "fsync"),
    "shutil": ("rmtree",),
    "circuitmap.atomic": ("_exchange",),
    "circuitmap.features.build": ("_checkpoint", "_finish"),
    "circuitmap.features.store": ("write_labels",),
}
KILLED = 137


@dataclass
class Run:
    """How a run ended: its exit status, stderr, and the names of the counted calls it made (in order)."""

    code: int
    stderr: str
    calls: list[str]


def install(kind: str | None, at: int, report: str) -> None:
    """Wrap the counted functions (in this process): fault ``kind`` ("kill" or "full") at call ``at``
    (counted from 1); the calls made are written to ``report`` when the process ends normally."""
    import atexit
    import errno
    import importlib

    calls: list[str] = []

    def wrap(function, name: str):
        def counted(*args, **kwargs):
            calls.append(name)
            if kind is not None and len(calls) == at:
                if kind == "kill":
                    os._exit(KILLED)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]) if args else None)
            return function(*args, **kwargs)

        return counted

    for module_name, names in POINTS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, wrap(getattr(module, name), name))
    atexit.register(lambda: Path(report).write_text(json.dumps(calls)))


def run(argv: list[str], tmp: Path, *, kind: str | None = None, at: int = 0, timeout: float = 300) -> Run:
    """Run ``circuitmap argv`` in a child process with the fault ``kind`` at call ``at`` (none by default)."""
    report = tmp / f"calls-{os.getpid()}-{len(list(tmp.glob('calls-*')))}.json"
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from helpers.faults import install; "
        f"install({kind!r}, {at}, {str(report)!r}); "
        "from circuitmap.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    calls = json.loads(report.read_text()) if report.exists() else []
    report.unlink(missing_ok=True)
    return Run(done.returncode, done.stderr, calls)

"""Progress of long attribution stages: a terminal bar, or a callback for programs that show their own; and
the stop event that ends the computation between two batches."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

from circuitmap.errors import Interrupted

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``callback(stage, done, total)`` when a stage starts and after each batch."""

Progress = bool | ProgressCallback


@dataclass(frozen=True)
class Reporter:
    """Where a computation reports its stages (``True``: a bar, ``False``: nothing, or a callback), and the
    event that stops it."""

    progress: Progress = True
    stop: threading.Event | None = None

    def check_stop(self) -> None:
        """Raise ``Interrupted`` when the stop event is set."""
        if self.stop is not None and self.stop.is_set():
            raise Interrupted("attribution stopped on request; nothing was written")

    @contextmanager
    def stage(self, total: int, description: str) -> Iterator[Callable[[int], None]]:
        """Report a stage of ``total`` rows; yields ``advance(n)``, which also honours the stop event."""
        self.check_stop()
        if callable(self.progress):
            callback = self.progress
            done = 0
            callback(description, 0, total)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                callback(description, done, total)
                self.check_stop()

            yield advance
            return
        with tqdm(total=total, desc=description, unit="row", disable=not self.progress, leave=False) as bar:

            def advance_bar(n: int) -> None:
                bar.update(n)
                self.check_stop()

            yield advance_bar

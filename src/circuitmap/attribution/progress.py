"""Progress of long attribution stages: a terminal bar, or a callback for programs that show their own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``callback(stage, done, total)`` when a stage starts and after each batch; it may raise to stop
the computation (the exception propagates out of ``attribute``)."""

Progress = bool | ProgressCallback


@contextmanager
def stage(progress: Progress, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Report a stage of ``total`` rows; yields ``advance(n)``. ``True`` shows a bar, ``False`` nothing."""
    if callable(progress):
        done = 0
        progress(description, 0, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(description, done, total)

        yield advance
        return
    with tqdm(total=total, desc=description, unit="row", disable=not progress, leave=False) as bar:
        yield bar.update

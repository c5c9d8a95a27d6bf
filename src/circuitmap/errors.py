"""Every error circuitmap raises on purpose, in one place.

``CircuitmapError`` and its subclasses mean a problem with the user's input, files or settings, explained in
one line: the command line prints that line (``circuitmap: error: …``) and exits with status 2, the explorer
answers with it as a JSON error. ``Interrupted`` means a long job stopped because it was asked to (Ctrl-C,
SIGTERM, a cancel button): its progress is saved where the job can resume, and the command line exits with
status 130.
"""

from __future__ import annotations


class CircuitmapError(Exception):
    """Base class: a problem with the user's input or files, explained in one line."""


class Interrupted(CircuitmapError):
    """A long job stopped on request (its ``stop`` event was set); the message says what was kept."""


class ModelLoadError(CircuitmapError):
    """A model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(CircuitmapError):
    """The model's architecture has no adapter."""


class TranscoderLoadError(CircuitmapError):
    """A transcoder set could not be read."""


class IncompatibleTranscodersError(CircuitmapError):
    """A transcoder set does not fit the model (width, layer count)."""


class GraphFileError(CircuitmapError):
    """A graph file or graph folder is missing, unreadable, from a newer version, or inconsistent."""


class GraphExportError(CircuitmapError):
    """A graph cannot be exported as asked (unknown node ids, bad thresholds, non-finite values)."""


class TrainingDiverged(CircuitmapError):
    """A training loss became NaN or infinite; the last good checkpoint is kept."""


class StoreError(CircuitmapError):
    """A request on the explorer's graph folder cannot be done; ``status`` is the HTTP status saying why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

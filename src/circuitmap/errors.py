"""Errors that circuitmap raises for bad input; the CLI prints them as one line without a traceback."""


class CircuitmapError(Exception):
    """Base class: a problem with the user's input or files, explained in one line."""


class ModelLoadError(CircuitmapError):
    """A model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(CircuitmapError):
    """The model's architecture has no adapter."""


class TranscoderLoadError(CircuitmapError):
    """A transcoder set could not be read."""


class IncompatibleTranscodersError(CircuitmapError):
    """A transcoder set does not fit the model (width, layer count)."""

"""The checks every input passes where it enters circuitmap: text, numbers and ids.

- ``check_text``: a string that UTF-8 can encode (no lone surrogates, which invalid bytes in a command-line
  argument or a JSON ``\\udc80`` escape produce), of a bounded length, not empty unless allowed;
- ``check_number``: a real number (not a bool), finite, within a range, whole where a count is meant.

Each raises ``CircuitmapError`` with one line naming the value, so that settings, command-line arguments,
request bodies and library calls all refuse bad input the same way, before anything is computed or written.
"""

from __future__ import annotations

import math
import numbers

from circuitmap.errors import CircuitmapError


def check_text(what: str, text: object, *, max_length: int | None = None, empty: bool = False) -> str:
    """``text`` if it is a string UTF-8 can encode, at most ``max_length`` characters long and, unless
    ``empty``, not blank; a one-line error naming ``what`` otherwise."""
    if not isinstance(text, str):
        raise CircuitmapError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CircuitmapError(f"{what} is not valid Unicode text (it holds undecodable bytes)") from None
    if max_length is not None and len(text) > max_length:
        raise CircuitmapError(f"{what} has {len(text)} characters; at most {max_length} are allowed")
    if not empty and not text.strip():
        raise CircuitmapError(f"{what} is empty")
    return text


def check_number(
    what: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    whole: bool = False,
) -> float:
    """``value`` if it is a finite real number within the bounds (``low``/``high``, open where asked) and,
    with ``whole``, an integer; a one-line error naming ``what`` otherwise. None bounds are unbounded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CircuitmapError(f"{what} must be a number, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise CircuitmapError(f"{what} must be a finite number, got {str(value)[:40]}")
    if whole and not float(value).is_integer():
        raise CircuitmapError(f"{what} must be a whole number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise CircuitmapError(f"{what} must be {_span(low, high, low_open, high_open)}, got {value}")
    return value


SEED_LOW, SEED_HIGH = -(2**63), 2**63 - 1
"""The seeds random generators take (64-bit signed integers)."""


def check_seed(what: str, seed: object) -> int:
    """``seed`` if it is a whole number a random generator takes; a one-line error otherwise."""
    return int(check_number(what, seed, low=SEED_LOW, high=SEED_HIGH, whole=True))


def _span(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """The allowed range in words: "at least 1", "positive", "in (0, 1]"."""
    if high is None:
        if low_open:
            return "positive" if low == 0 else f"greater than {low:g}"
        return "zero or more" if low == 0 else f"at least {low:g}"
    if low is None:
        return f"less than {high:g}" if high_open else f"at most {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

"""The input checks: text UTF-8 can encode, of a bounded length; finite numbers in range."""

from __future__ import annotations

import math

import numpy as np
import pytest

from circuitmap.errors import CircuitmapError
from circuitmap.validation import check_number, check_text


def test_text():
    assert check_text("the prompt", "Paris ☀") == "Paris ☀"
    assert check_text("a label", "", empty=True) == ""
    for bad, message in [
        ("bad \udc80 bytes", "the prompt is not valid Unicode text"),
        ("   ", "the prompt is empty"),
        (7, "the prompt must be a string, got int"),
        ("x" * 11, "has 11 characters; at most 10"),
    ]:
        with pytest.raises(CircuitmapError, match=message):
            check_text("the prompt", bad, max_length=10)


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (math.nan, {}, "x must be a finite number, got nan"),
        (math.inf, {"low": 0}, "x must be a finite number, got inf"),
        (True, {}, "x must be a number, got True"),
        ("3", {}, "x must be a number, got '3'"),
        (2.5, {"whole": True}, "x must be a whole number, got 2.5"),
        (0, {"low": 1}, "x must be at least 1, got 0"),
        (-1, {"low": 0}, "x must be zero or more, got -1"),
        (0.0, {"low": 0, "low_open": True}, "x must be positive, got 0.0"),
        (1.5, {"low": 0, "high": 1, "low_open": True}, r"x must be in \(0, 1\], got 1.5"),
        (1.0, {"high": 1, "high_open": True}, "x must be less than 1, got 1.0"),
        (10**400, {}, "x must be a finite number, got 1000000000"),
    ],
)
def test_numbers_out_of_range(value, bounds, message):
    with pytest.raises(CircuitmapError, match=message):
        check_number("x", value, **bounds)


def test_numbers_in_range_pass_through():
    assert check_number("x", 3, low=1, whole=True) == 3
    assert check_number("x", np.float32(0.5), low=0, high=1) == np.float32(0.5)
    assert check_number("x", 1e308) == 1e308
    assert check_number("x", 1.0, low=0, high=1, low_open=True) == 1.0

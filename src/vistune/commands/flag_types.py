"""Argument types shared by the commands' flags.

A bad value is argparse's one-line error naming the flag (exit 2) before any work starts,
never a traceback or a request sent with it. The number types check the range rules of
vistune.config (`AT_LEAST_1`, ...), the same copy the config dataclasses check their
fields with, so a flag and the setting it fills refuse a value in the same words (NaN
included: the rules are written so that it fails them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from vistune.config import (
    ABOVE_0_AT_MOST_1,
    ABOVE_0_FINITE,
    AT_LEAST_0,
    AT_LEAST_0_FINITE,
    AT_LEAST_1,
    Range,
)

N = TypeVar("N", int, float)


def _in_range(text: str, kind: Callable[[str], N], rule: Range) -> N:
    """`text` read as `kind`; argparse's error (`must be at least 1, got 0`) when out of
    `rule`. A text `kind` cannot read is argparse's `invalid <type name> value`."""
    value = kind(text)
    if not rule.holds(value):
        raise argparse.ArgumentTypeError(rule.refusal(value))
    return value


def positive_int(text: str) -> int:
    return _in_range(text, int, AT_LEAST_1)


def count(text: str) -> int:
    """A number of retries, say (a negative one would ask nothing and fail every request)."""
    return _in_range(text, int, AT_LEAST_0)


def seconds(text: str) -> float:
    return _in_range(text, float, ABOVE_0_FINITE)


def delay(text: str) -> float:
    """A wait that may be 0."""
    return _in_range(text, float, AT_LEAST_0_FINITE)


def temperature(text: str) -> float:
    return _in_range(text, float, AT_LEAST_0_FINITE)


def probability(text: str) -> float:
    """A nucleus sampling mass."""
    return _in_range(text, float, ABOVE_0_AT_MOST_1)


def url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must start with http:// or https://, got {text!r}")
    return text


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list (`brief,detail`), blanks and repeats dropped, order kept."""
    return tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))

"""Argument types shared by the commands' flags.

A bad value is argparse's one-line error naming the flag (exit 2) before any work starts,
never a traceback or a request sent with it. Each check is written as `not value > 0` and
the like, so that NaN, which fails every comparison, is refused too.
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count(text: str) -> int:
    """A number of retries, say (a negative one would ask nothing and fail every request)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def delay(text: str) -> float:
    """A wait that may be 0 (time.sleep(nan) is a ValueError at the first retry)."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def temperature(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A nucleus sampling mass, in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"must start with http:// or https://, got {text!r}")
    return text


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list (`brief,detail`), blanks and repeats dropped, order kept."""
    return tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))

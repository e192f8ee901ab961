"""What a resumed evaluation run reuses from its journal, said in words.

Each run that queries a model (`eval judge`, `eval scienceqa --ensemble judge`,
`eval build`) keeps every reply in a journal (vistune.eval.journal) and reuses the ones
whose prompt key matches on a rerun. These notes tell the user, before anything is asked,
how many kept replies will not be reused (with a paid endpoint they may rather stop), and,
when a run stops, how many answers the next run will not ask again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from vistune.config import ClientConfig
from vistune.data.records import read_journal
from vistune.eval.journal import rekeyed, requester_id


def endpoint_id(config: ClientConfig) -> str:
    """The journal's name for an endpoint model with the settings the client sends it."""
    return requester_id(config.model, temperature=config.temperature, max_tokens=config.max_tokens)


def rekeyed_note(
    path: Path,
    expected: dict,
    identify: Callable[[dict], object],
    kept: Callable[[dict], bool],
) -> str | None:
    """A line for the user when replies kept in `path` are not reused because their key
    differs from `expected` (identity -> key); None when all match."""
    n = rekeyed((r for r in read_journal(path) if kept(r)), expected, identify)
    if not n:
        return None
    return (
        f"{n} replies kept in {path} are not reused: their key differs from "
        "this run's (written by an older vistune, whose keys lack the reply token limit, or under "
        f"another model, temperature, reply token limit or inputs); those {n} requests are "
        "asked again"
    )


def kept_note(keys: Iterable, kept: dict, path: Path) -> str:
    """What a stopped run leaves for the next: how many of its requests (`keys`) have a
    reusable answer in `kept`, for its error message."""
    unique = set(keys)
    n = sum(k in kept for k in unique)
    return (
        f"{n} of {len(unique)} answers are kept in {path}: "
        "rerun with --resume (the default) to ask only the rest"
    )

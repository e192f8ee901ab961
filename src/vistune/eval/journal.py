"""Append-only JSONL journals of finished teacher and judge requests, so that a run stopped
by Ctrl-C, `kill -9` or a dead endpoint resumes without asking anything twice.

Each request is identified by `prompt_key`: a hash of who answers it (`requester_id`: the
model and every setting that changes its reply, such as the temperature and the reply
token limit) and the exact messages sent. A run appends one record per reply as it
arrives (flushed at once); the next run with the same settings reuses the replies whose
key it would send again.
Used by `eval judge` and `eval scienceqa --ensemble judge` (raw_judgements.jsonl) and
`eval build` (build_requests.jsonl). They are read back with
vistune.data.records.read_journal, which skips a torn line: its request is asked again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def requester_id(model: str, **settings: object) -> str:
    """`model|name=value|...` (settings sorted by name): the model and each request setting
    that changes its reply, for `prompt_key`. A setting left out here would let a rerun
    with another value reuse replies made under the old one (with a raised `max_tokens`,
    replies cut at the old limit)."""
    return "|".join([model, *(f"{k}={v}" for k, v in sorted(settings.items()))])


def prompt_key(messages: list[dict], model_id: str = "") -> str:
    """Identifies a request (`model_id`, from `requester_id`, and the exact messages)."""
    blob = json.dumps([model_id, messages], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def appender(path: str | Path) -> Iterator[Callable[[dict], None]]:
    """A function writing one record a line to the end of `path`, flushed at once.

    A run killed while writing can leave a torn last line; the first record then starts on
    a fresh line rather than being glued to it (and lost with it).
    """
    path = Path(path)
    torn = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as handle:
        if torn:
            handle.write("\n")

        def write(record: dict) -> None:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()

        yield write


def rekeyed(
    records: Iterable[dict],
    expected: Mapping[Hashable, str],
    identify: Callable[[dict], Hashable],
) -> int:
    """How many of a run's requests (`expected`: identity -> the prompt key it sends) have
    a kept reply in `records` under another key only, so are asked again: replies from an
    older vistune (whose keys lacked the reply token limit) or made under another model,
    settings or messages. `identify` gives a record's identity (it may raise KeyError,
    TypeError or ValueError on a malformed record, which is skipped)."""
    matched, other = set(), set()
    for record in records:
        try:
            ident = identify(record)
        except (KeyError, TypeError, ValueError):
            continue
        if ident not in expected:
            continue
        same = record.get("prompt_key") == expected[ident]
        (matched if same else other).add(ident)
    return len(other - matched)

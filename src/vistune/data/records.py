"""JSON and JSONL files read in one place, with one rule for a malformed line.

- `load_json`: a whole JSON file (a LLaVA JSON list, COCO annotations, ScienceQA problems).
- `read_jsonl`: a file someone hands vistune, one JSON value a line (LLaVA JSONL data,
  image-caption pairs, eval questions, contexts, answers and predictions).
- `read_journal`: a JSONL file vistune appends to as it runs (the teacher and judge request
  journals, the training log.jsonl).

Every line is read the same way: lines end at "\\n" only (a reply may hold U+2028, which
`str.splitlines` would split at), a UTF-8 byte order mark opening the file is not part of
line 1, blank lines are skipped, and a line is malformed when it is not UTF-8, not JSON
(nested too deeply included) or, where the reader wants objects, not an object holding the
keys it needs. What a malformed line does depends only on who wrote the file:

- a file someone handed over is refused: one DataError naming the file, what is wrong with
  the first malformed line (column and parser message) and every malformed line by number;
- a journal vistune appends to ends in a torn line when a run is killed mid-write, so its
  malformed lines are skipped (their requests are asked again, their steps logged again).

Lines that are JSON but not a usable row (a LLaVA sample without answers, a pair without a
caption) are left to the caller, which skips and counts them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vistune.errors import DataError

_MAX_LISTED = 20
_BLANK = object()


def list_ids(ids: Iterable[Any], limit: int = _MAX_LISTED) -> str:
    """`a, b, c` (with `... and N more` past `limit`) for error messages."""
    items = [str(i) for i in ids]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" ... and {len(items) - limit} more"
    return shown


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; malformed JSON raises DataError naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows tools) is not JSON's
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:  # a folder, no permission
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno} "
            f"(char {err.pos}): {err.msg}"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: malformed JSON (nested too deeply)") from None


class _Malformed:
    """What is wrong with one line: `reason` for the list of lines, `detail` for the first."""

    def __init__(self, lineno: int, reason: str, detail: str) -> None:
        self.lineno, self.reason, self.detail = lineno, reason, detail

    def __str__(self) -> str:
        return f"line {self.lineno} ({self.reason})"


def read_jsonl(
    path: str | Path,
    what: str = "",
    required: Sequence[str] | None = (),
    allow_empty: bool = False,
) -> list[Any]:
    """The values of a JSONL file someone handed over, one a non-blank line.

    `required`: every line must be an object holding these keys (`()`: any object); `None`
    takes any JSON value (the caller skips and counts rows it cannot use). `what` names the
    file in messages ("answers"). Raises DataError for a missing or unreadable file, an
    empty one (unless `allow_empty`) and for malformed lines (see the module docstring).
    """
    path = Path(path)
    rows: list[Any] = []
    bad: list[_Malformed] = []
    for lineno, raw in _lines(path, what):
        value = _parse(lineno, raw, required)
        if isinstance(value, _Malformed):
            bad.append(value)
        elif value is not _BLANK:
            rows.append(value)
    if bad:
        raise DataError(f"{path}: {bad[0].detail}; malformed lines: {list_ids(bad)}")
    if not rows and not allow_empty:
        raise DataError(f"{what or 'the'} file is empty: {path}")
    return rows


def read_journal(path: str | Path) -> list[dict]:
    """The objects of a JSONL file vistune appends to, [] when there is none; malformed
    lines (a torn last line, possibly cut inside a UTF-8 character) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    return [
        value
        for lineno, raw in _lines(path, "")
        if isinstance(value := _parse(lineno, raw, ()), dict)
    ]


def _lines(path: Path, what: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of each line, split at b"\\n" only."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: {what + ' ' if what else ''}file not found") from None
    except OSError as err:  # a folder, no permission
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with handle:
        try:
            yield from enumerate(handle, start=1)
        except OSError as err:  # a folder on platforms that open one
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _parse(lineno: int, raw: bytes, required: Sequence[str] | None) -> Any:
    """The line's value, _BLANK for a blank line, or _Malformed."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return _Malformed(lineno, "not UTF-8", f"line {lineno} is not UTF-8 ({err.reason})")
    if not line.strip():
        return _BLANK
    try:
        value = json.loads(line.rstrip("\r\n"))  # columns counted in this line, not the next
    except json.JSONDecodeError as err:
        detail = f"malformed JSON at line {lineno} column {err.colno}: {err.msg}"
        return _Malformed(lineno, "not JSON", detail)
    except RecursionError:
        detail = f"line {lineno} is malformed JSON (nested too deeply)"
        return _Malformed(lineno, "not JSON", detail)
    if required is None:
        return value
    if not isinstance(value, dict):
        return _Malformed(lineno, "not an object", f"line {lineno} is {kind(value)}, not an object")
    missing = [key for key in required if key not in value]
    if missing:
        names = ", ".join(missing)
        return _Malformed(lineno, f"missing {names}", f"line {lineno} lacks {names}")
    return value


def kind(value: Any) -> str:
    """What a JSON value is, for messages ("an object", "a list", "a string", "int")."""
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )

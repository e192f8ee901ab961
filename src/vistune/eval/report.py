"""Files in and out of an evaluation run: strict JSONL reading, atomic writes, and the
report set written per run (paper §5.1 Tables 4-5, §5.2 Table 7).

Every run directory gets `report.json` (the numbers), `report.md` (a Markdown table),
`report.png` (a bar chart) and `config.json` (every resolved flag), written atomically.
The judge also keeps `raw_judgements.jsonl` beside them (see vistune.eval.judge).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vistune.errors import DataError

_MAX_LISTED = 20


def list_ids(ids: Iterable[Any], limit: int = _MAX_LISTED) -> str:
    """`a, b, c` (with `... and N more` past `limit`) for error messages."""
    items = [str(i) for i in ids]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" ... and {len(items) - limit} more"
    return shown


def read_jsonl(path: str | Path, what: str, required: Sequence[str] = ()) -> list[dict]:
    """Objects from a JSONL file, one per non-blank line.

    Raises DataError for a missing, unreadable or empty file, and lists every malformed
    line (not UTF-8, not JSON, not an object, or missing a `required` key) by line number
    in one message. A UTF-8 byte order mark opening the file (as some Windows editors and
    exporters write) is not part of the first line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    rows: list[dict] = []
    bad: list[str] = []
    try:
        fh = path.open("rb")
    except OSError as err:  # no permission
        raise DataError(f"{what} file {path} cannot be read ({err.strerror or err})") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                bad.append(f"line {lineno} (not UTF-8)")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                bad.append(f"line {lineno} (not JSON)")
                continue
            if not isinstance(row, dict):
                bad.append(f"line {lineno} (not an object)")
                continue
            missing = [k for k in required if k not in row]
            if missing:
                bad.append(f"line {lineno} (missing {', '.join(missing)})")
                continue
            rows.append(row)
    if bad:
        raise DataError(f"{what} file {path} has malformed lines: {list_ids(bad)}")
    if not rows:
        raise DataError(f"{what} file is empty: {path}")
    return rows


def index_by(rows: Sequence[dict], key: str, what: str, path: str | Path) -> dict[str, dict]:
    """Rows keyed by `str(row[key])`; duplicate ids raise DataError listing them."""
    out: dict[str, dict] = {}
    dups: list[str] = []
    for row in rows:
        k = str(row[key])
        if k in out and k not in dups:
            dups.append(k)
        out[k] = row
    if dups:
        raise DataError(f"{what} file {path} has duplicate {key}s: {list_ids(dups)}")
    return out


def check_same_ids(
    expected: Iterable[str], got: Iterable[str], what: str, path: str | Path
) -> None:
    """DataError naming the ids missing from and extra in `got` (compared to `expected`)."""
    exp, have = set(expected), set(got)
    missing, extra = sorted(exp - have, key=_natural), sorted(have - exp, key=_natural)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing ids: {list_ids(missing)}")
        if extra:
            parts.append(f"ids not in the questions: {list_ids(extra)}")
        raise DataError(f"{what} file {path} does not match the questions; {'; '.join(parts)}")


def _natural(key: str) -> tuple:
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Any]]]) -> str:
    """A Markdown table: first column the row name, floats to 2 decimals, None as `-`."""
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(
    values: Mapping[str, float | None],
    path: str | Path,
    title: str,
    ylabel: str,
    errors: Mapping[str, float | None] | None = None,
) -> None:
    """A bar per key (None drawn as an empty slot), optional error bars; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    heights = [values[n] if values[n] is not None else 0.0 for n in names]
    yerr = None
    if errors is not None:
        yerr = [errors.get(n) or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.5))
    bars = ax.bar(names, heights, yerr=yerr, capsize=4, color="#4c72b0")
    for bar, name in zip(bars, names, strict=True):
        label = _fmt(values[name])
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max([100.0, *heights]) * 1.1)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_run(
    out_dir: str | Path,
    report: dict[str, Any],
    config: dict[str, Any],
    table_md: str,
    chart: Mapping[str, float | None],
    chart_title: str,
    chart_errors: Mapping[str, float | None] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, report.png and config.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "report": out / "report.json",
        "markdown": out / "report.md",
        "chart": out / "report.png",
        "config": out / "config.json",
    }
    atomic_write_json(paths["config"], config)
    atomic_write_json(paths["report"], report)
    atomic_write_text(paths["markdown"], f"# {chart_title}\n\n{table_md}")
    bar_chart(chart, paths["chart"], chart_title, "score (%)", chart_errors)
    return paths

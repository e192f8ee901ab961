"""What an evaluation run writes, and the checks of the files it reads: the report set
per run (paper §5.1 Tables 4-5, §5.2 Table 7), ids indexed and matched against the
questions. The files themselves are read by vistune.data.records and written by
vistune.files.

Every run directory gets `report.json` (the numbers), `report.md` (a Markdown table),
`report.png` (a bar chart) and `config.json` (every resolved flag), written atomically.
The judge also keeps `raw_judgements.jsonl` beside them (see vistune.eval.judge).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vistune.data.records import list_ids
from vistune.errors import DataError
from vistune.files import replacing, write_json, write_text


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
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


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
    write_json(paths["config"], config)
    write_json(paths["report"], report)
    write_text(paths["markdown"], f"# {chart_title}\n\n{table_md}")
    bar_chart(chart, paths["chart"], chart_title, "score (%)", chart_errors)
    return paths

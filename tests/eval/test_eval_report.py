"""Report files: JSON, Markdown table, PNG chart and config written atomically."""

from __future__ import annotations

import json

from vistune.eval import report


def test_markdown_table_formats_values():
    table = report.markdown_table(["a", "b"], [("x", [1.0, None]), ("y", [33.333, 2])])
    assert table.splitlines() == ["| | a | b |", "|---|---|---|", "| x | 1.00 | - |",
                                  "| y | 33.33 | 2 |"]  # fmt: skip


def test_write_run(tmp_path):
    paths = report.write_run(
        tmp_path / "run", {"relative": {"all": 80.0}}, {"repeats": 3}, "| t |\n",
        {"conversation": 80.0, "detail": None, "all": 75.5}, "title", {"all": 2.0},
    )  # fmt: skip
    assert json.loads(paths["report"].read_text()) == {"relative": {"all": 80.0}}
    assert json.loads(paths["config"].read_text()) == {"repeats": 3}
    assert paths["markdown"].read_text() == "# title\n\n| t |\n"
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "report.json", "report.md", "report.png"]  # fmt: skip

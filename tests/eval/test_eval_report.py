"""Report files: JSON, Markdown table, PNG chart and config written atomically."""

from __future__ import annotations

import json

import pytest

from vistune.errors import DataError
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


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "r.json"
    report.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        report.atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_byte_order_mark_opening_a_jsonl_file_is_not_part_of_line_1(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "b"}\n'
    )
    assert [r["question_id"] for r in report.read_jsonl(path, "answers")] == [1, 2]
    path.write_bytes(b'\xef\xbb\xbf\n{"question_id": 1, "text": "ok"}\n')  # a BOM alone
    assert report.read_jsonl(path, "answers") == [{"question_id": 1, "text": "ok"}]
    path.write_bytes(b'{"question_id": 1, "text": "ok"}\n\xef\xbb\xbf{"question_id": 2}\n')
    with pytest.raises(DataError, match=r"line 2 \(not JSON\)"):  # only the file's start
        report.read_jsonl(path, "answers")


def test_a_line_nested_too_deeply_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "ok"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"line 2 \(not JSON\)"):
        report.read_jsonl(path, "answers")


def test_long_id_lists_are_cut():
    assert report.list_ids(range(25), limit=3) == "0, 1, 2 ... and 22 more"


def test_a_line_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2 \(not UTF-8\)"):
        report.read_jsonl(path, "answers")

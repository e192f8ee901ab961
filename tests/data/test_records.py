"""vistune.data.records: every JSON and JSONL file is read by one module, with one rule
for a malformed line (refused in a file handed over, skipped in a journal vistune appends)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import vistune
from vistune.data import records
from vistune.errors import DataError

SRC = Path(vistune.__file__).parent


def test_a_byte_order_mark_opening_a_jsonl_file_is_not_part_of_line_1(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "b"}\n'
    )
    assert [r["question_id"] for r in records.read_jsonl(path, "answers")] == [1, 2]
    path.write_bytes(b'\xef\xbb\xbf\n{"question_id": 1, "text": "ok"}\n')  # a BOM alone
    assert records.read_jsonl(path, "answers") == [{"question_id": 1, "text": "ok"}]
    path.write_bytes(b'{"question_id": 1, "text": "ok"}\n\xef\xbb\xbf{"question_id": 2}\n')
    with pytest.raises(DataError, match=r"line 2 \(not JSON\)"):  # only the file's start
        records.read_jsonl(path, "answers")


def test_a_line_nested_too_deeply_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "ok"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"line 2 \(not JSON\)"):
        records.read_jsonl(path, "answers")


def test_long_id_lists_are_cut():
    assert records.list_ids(range(25), limit=3) == "0, 1, 2 ... and 22 more"


def test_a_line_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"line 2 \(not UTF-8\)"):
        records.read_jsonl(path, "answers")


def test_one_rule_a_handed_file_is_refused_and_a_journal_skips_its_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": "caf\xc3')
    with pytest.raises(DataError) as refused:
        records.read_jsonl(path, "answers", ("question_id", "text"))
    assert str(refused.value) == (
        f"{path}: line 2 is not UTF-8 (unexpected end of data); malformed lines: line 2 (not UTF-8)"
    )
    assert records.read_journal(path) == [{"question_id": 1, "text": "a"}]


def test_the_message_names_the_first_fault_and_every_malformed_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": 1}\n{"id": \n\n[1]\n{"x": 2}\n')
    with pytest.raises(DataError) as refused:
        records.read_jsonl(path, "questions", ("id",))
    assert str(refused.value) == (
        f"{path}: malformed JSON at line 2 column 8: Expecting value; malformed lines: "
        "line 2 (not JSON), line 4 (not an object), line 5 (missing id)"
    )
    # rows the caller checks itself (LLaVA samples, pairs): any JSON value is a row
    path.write_text('{"id": 1}\n[1]\n"two"\n')
    assert records.read_jsonl(path, required=None) == [{"id": 1}, [1], "two"]
    with pytest.raises(DataError, match=r"line 2 \(not an object\), line 3 \(not an object\)"):
        records.read_jsonl(path)


def test_missing_unreadable_and_empty_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: answers file not found"):
        records.read_jsonl(tmp_path / "nope.jsonl", "answers")
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        records.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl: cannot read"):
        records.read_jsonl(tmp_path / "dir.jsonl")
    assert records.read_journal(tmp_path / "dir.jsonl") == []  # no journal yet
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"answers file is empty: {empty}"):
        records.read_jsonl(empty, "answers")
    assert records.read_jsonl(empty, allow_empty=True) == []


def test_lines_end_at_newline_only(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw in a value:
    they are not line ends (str.splitlines would cut the row there)."""
    path = tmp_path / "a.jsonl"
    rows = [{"text": "a\u2028b"}, {"text": "c\u2029d\x85e"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert records.read_jsonl(path) == rows
    assert records.read_journal(path) == rows


def test_load_json_names_the_file_and_the_position(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": [1,\n 2,]}')
    with pytest.raises(DataError, match=r"a\.json: malformed JSON at line 2 column 4"):
        records.load_json(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert records.load_json(path) == {"a": 1}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return found


def test_data_imports_nothing_from_datagen():
    """commands -> train/eval/serve/datagen -> model/data -> core: data/ below datagen/."""
    for path in sorted((SRC / "data").glob("*.py")):
        assert not [m for m in _imports(path) if m.startswith("vistune.datagen")], path.name


def test_one_image_placeholder():
    """The placeholder string is defined once (vistune.data.conversation); every other
    module imports it."""
    defined = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and "PLACEHOLDER" in t.id for t in targets):
                    defined.append(path.relative_to(SRC).as_posix())
    assert defined == ["data/conversation.py"]

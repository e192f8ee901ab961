"""ScienceQA release reading, prompts and the two answer formats (paper §5.2, Table 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistune.data import scienceqa as sqa
from vistune.errors import DataError


def _problem(**kw) -> dict:
    base = {
        "question": "Which animal is a mammal?",
        "choices": ["frog", "whale", "shark"],
        "answer": 1,
        "hint": "",
        "image": None,
        "task": "closed choice",
        "grade": "grade4",
        "subject": "natural science",
        "topic": "biology",
        "category": "Classify",
        "skill": "Identify mammals",
        "lecture": "Mammals feed their young milk.",
        "solution": "A whale is a mammal.",
        "split": "test",
    }
    return base | kw


def _write(root: Path, problems: dict, splits: dict) -> tuple[Path, Path]:
    p, s = root / "problems.json", root / "pid_splits.json"
    p.write_text(json.dumps(problems))
    s.write_text(json.dumps(splits))
    return p, s


@pytest.fixture
def release(tmp_path):
    problems = {
        "7": _problem(),
        "8": _problem(
            hint="Look at the picture.", image="image.png", grade="grade9", subject="social science"
        ),  # fmt: skip
        "9": _problem(lecture="", solution="", split="train"),
    }
    (tmp_path / "images" / "8").mkdir(parents=True)
    (tmp_path / "images" / "8" / "image.png").write_bytes(b"png")
    return _write(tmp_path, problems, {"test": ["7", "8"], "train": ["9"], "val": []})


def test_load_split_in_order(release, tmp_path):
    probs = sqa.load_scienceqa(*release, "test", image_root=tmp_path / "images")
    assert [p.pid for p in probs] == ["7", "8"]
    p7, p8 = probs
    assert p7.choices == ("frog", "whale", "shark") and p7.answer_letter == "B"
    assert (p7.has_text, p7.has_image, p7.no_context) == (False, False, True)
    assert (p8.has_text, p8.has_image, p8.no_context) == (True, True, False)
    assert p8.image_rel == "8/image.png"
    assert p8.image_path == tmp_path / "images" / "8" / "image.png"
    assert p8.grade_number == 9


def test_image_under_split_folder(tmp_path):
    release = _write(tmp_path, {"8": _problem(image="image.png")}, {"test": ["8"]})
    (tmp_path / "images" / "test" / "8").mkdir(parents=True)
    (tmp_path / "images" / "test" / "8" / "image.png").write_bytes(b"png")
    (p,) = sqa.load_scienceqa(*release, "test", image_root=tmp_path / "images")
    assert p.image_rel == "test/8/image.png"


def test_build_question_exact(release):
    p7, p8 = sqa.load_scienceqa(*release, "test")
    assert sqa.build_question(p7) == (
        "Which animal is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale (C) shark"
    )  # question, context, options: the paper's QCM
    assert sqa.build_instruction(p7) == sqa.build_question(p7)
    assert sqa.build_instruction(p8) == (
        "<image>\nWhich animal is a mammal?\nContext: Look at the picture.\n"
        "Options: (A) frog (B) whale (C) shark"
    )


def test_answer_formats(release):
    p7, p8 = sqa.load_scienceqa(*release, "test")
    sample = sqa.to_llava_sample(p7, "reasoning-first")
    assert sample == {
        "id": "7",
        "conversations": [
            {"from": "human", "value": sqa.build_question(p7)},
            {"from": "gpt", "value": "Mammals feed their young milk. A whale is a mammal. "
                                     "The answer is B."},
        ],
    }  # fmt: skip
    first = sqa.to_llava_sample(p8, "answer-first")
    assert first["image"] == "8/image.png"
    assert first["conversations"][0]["value"].startswith("<image>\nWhich animal is a mammal?\n")
    assert first["conversations"][1]["value"] == (
        "The answer is B. BECAUSE: Mammals feed their young milk. A whale is a mammal."
    )
    (p9,) = sqa.load_scienceqa(*release, "train")  # no lecture or solution
    assert sqa.build_answer(p9, "answer-first") == "The answer is B."
    assert sqa.build_answer(p9, "reasoning-first") == "The answer is B."
    with pytest.raises(ValueError, match="valid: reasoning-first, answer-first"):
        sqa.to_llava_sample(p7, "cot")


def test_placeholder_matches_conversation_module():
    conversation = pytest.importorskip("vistune.data.conversation")
    assert sqa.IMAGE_PLACEHOLDER == conversation.IMAGE_PLACEHOLDER


def test_missing_images_listed(release, tmp_path):
    (tmp_path / "images" / "8" / "image.png").unlink()
    with pytest.raises(DataError, match=r"images missing under .* for pids: 8$"):
        sqa.load_scienceqa(*release, "test", image_root=tmp_path / "images")
    # lenient: kept for a loader that skips and counts rows without their image
    _, p8 = sqa.load_scienceqa(*release, "test", tmp_path / "images", strict_images=False)
    assert (p8.image_rel, p8.image_path) == ("8/image.png", None)


@pytest.mark.parametrize(
    ("problems", "splits", "split", "message"),
    [
        ({"1": _problem()}, {"test": ["1"]}, "dev", r"split 'dev' not in .*; valid: test"),
        ({"1": _problem()}, {"test": ["1", "2", "3"]}, "test",
         r"pids of split 'test' missing from .*: 2, 3"),
        ({"1": _problem()}, {"test": ["1", "1"]}, "test", r"lists pids twice: 1"),
        ({"1": _problem(answer=3)}, {"test": ["1"]}, "test",
         r"problem 1 has answer 3 outside its 3 choices"),
        ({"1": _problem(choices=["x"])}, {"test": ["1"]}, "test", r"problem 1 needs 2-5 choices"),
        ({"1": {"question": "?"}}, {"test": ["1"]}, "test", r"problem 1 lacks choices, answer"),
        ({"1": _problem()}, {"test": []}, "test", r"split 'test' in .* is empty"),
        ({"1": _problem()}, {"test": 1}, "test", r"split 'test' in .* is not a list of pids"),
        ({"12": _problem()}, {"test": "12"}, "test", r"split 'test' in .* is not a list of pids"),
    ],
)  # fmt: skip
def test_bad_release(tmp_path, problems, splits, split, message):
    with pytest.raises(DataError, match=message):
        sqa.load_scienceqa(*_write(tmp_path, problems, splits), split)


def test_empty_file(tmp_path):
    p, s = _write(tmp_path, {}, {})
    p.write_text("")
    with pytest.raises(DataError, match=r"problems.json: malformed JSON at line 1 column 1"):
        sqa.load_scienceqa(p, s, "test")

"""`--data-format scienceqa`: the ScienceQA release trains directly (paper §5.2)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from tests.train.conftest import tiny_args
from vistune.cli import main
from vistune.errors import DataError
from vistune.train.config import TrainConfig
from vistune.train.setup import load_rows


def _release(folder):
    problems, train = {}, []
    for i in range(9):
        pid = str(100 + i)
        problem = {
            "question": f"Which colour is shown in case {i}?",
            "choices": ["red", "blue", "green"],
            "answer": i % 3,
            "hint": "" if i % 2 else "Look closely.",
            "image": "image.png" if i < 5 else None,
            "lecture": "Colours are seen by the eye.",
            "solution": "The picture is plain.",
            "split": "train",
            "grade": "grade2",
            "subject": "natural science",
            "topic": "colour",
            "category": "colours",
            "skill": "",
            "task": "closed choice",
        }
        problems[pid] = problem
        train.append(pid)
        if i < 4:  # problem 104 lists an image that is not there
            (folder / "images" / pid).mkdir(parents=True)
            Image.new("RGB", (28, 28), (40 * i, 90, 160)).save(
                folder / "images" / pid / "image.png"
            )
    problems["109"] = {**problem, "answer": 5}  # malformed: 3 choices
    train.append("109")
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": train, "test": []}))
    return folder / "problems.json"


def test_scienceqa_release_trains_and_skips_missing_images(tiny_model_dir, tmp_path, capsys):
    problems = _release(tmp_path / "sqa")
    args = tiny_args(problems, tmp_path / "out", tmp_path / "f", tiny_model_dir)
    flags = [
        "train",
        "--data-format",
        "scienceqa",
        "--stage",
        "finetune",
        "--max-steps",
        "2",
        "--template",
        "vicuna_v0",
        "--scienceqa-answer-format",
        "answer-first",
    ]
    for key in ("data", "out", "init", "features", "batch_size", "per_device_batch", "precision"):
        flags += ["--" + key.replace("_", "-"), str(args[key])]
    assert main(["--debug", *flags]) == 0
    printed = capsys.readouterr().out
    assert "samples: 8" in printed and "'missing_image': 1" in printed
    assert "'malformed': 1" in printed
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["data_format"] == "scienceqa" and saved["max_steps"] == 2
    assert saved["scienceqa_answer_format"] == "answer-first"
    assert (tmp_path / "out" / "model" / "config.json").is_file()


def test_a_malformed_problem_is_skipped_and_counted_unless_strict(tiny_model_dir, tmp_path):
    problems = _release(tmp_path / "sqa")
    args = tiny_args(problems, tmp_path / "out", tmp_path / "f", tiny_model_dir)
    cfg = TrainConfig(**args, data_format="scienceqa")
    skipped = Counter()
    rows = load_rows(cfg, skipped)
    assert len(rows) == 9 and skipped == {"malformed": 1}
    assert "109" not in {row["id"] for row in rows}
    with pytest.raises(DataError, match="problem 109 has answer 5 outside its 3 choices"):
        load_rows(TrainConfig(**args, data_format="scienceqa", strict=True), Counter())

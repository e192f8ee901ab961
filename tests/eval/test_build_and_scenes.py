"""`vistune eval build` (a LLaVA-Bench COCO-style benchmark from a teacher, §5.1) and
`vistune eval scenes` (exact-answer questions on held-out built-in scenes)."""

from __future__ import annotations

import json
import random

import pytest

from vistune import cli
from vistune.data.scenes import KINDS, SceneObject, make_scenes
from vistune.datagen.teachers import RulesTeacher
from vistune.errors import DataError
from vistune.eval import build, judge, scenes


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, 12, seed=3, val_fraction=0.5, size=64)
    return root


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_build_writes_llava_bench_files(coco, tmp_path, scripted_judge):
    out = tmp_path / "bench"
    rc = cli.main(["eval", "build", "--coco", str(coco), "--split", "val", "--images", "3",
                   "--teacher", "rules", "--out", str(out)])  # fmt: skip
    assert rc == 0
    questions = _jsonl(out / "questions.jsonl")
    refs = _jsonl(out / "answers_reference.jsonl")
    contexts = _jsonl(out / "context.jsonl")
    assert [q["question_id"] for q in questions] == list(range(9))
    assert [q["category"] for q in questions] == ["conv", "detail", "complex"] * 3
    assert len(contexts) == 3 and all((coco / c["image"]).is_file() for c in contexts)
    assert all(c["instances"] and all(0 <= v <= 1 for i in c["instances"] for v in i["bbox"])
               for c in contexts)  # fmt: skip
    assert all("<image>" not in q["text"] and q["text"] for q in questions)
    assert [r["question_id"] for r in refs] == list(range(9))
    assert {r["model_id"] for r in refs} == {"rules (not an LLM)"}
    assert json.loads((out / "build.json").read_text())["failures"] == []
    # the same seed picks the same images
    again = tmp_path / "again"
    cli.main(["eval", "build", "--coco", str(coco), "--images", "3", "--out", str(again)])
    assert (again / "questions.jsonl").read_text() == (out / "questions.jsonl").read_text()
    # the files are what `eval judge` reads: judging the reference against itself
    items = judge.load_bench(
        out / "questions.jsonl",
        out / "context.jsonl",
        out / "answers_reference.jsonl",
        out / "answers_reference.jsonl",
    )
    assert [i.category for i in items[:3]] == ["conversation", "detail", "complex"]
    assert items[0].context.count("\n\n") == 1  # captions, blank line, boxes


class _FlakyTeacher(RulesTeacher):
    """Answers complex questions with text the datagen parser rejects."""

    def __init__(self) -> None:
        self.calls = 0

    def respond(self, request):
        if request.response_type == "complex":
            self.calls += 1
            return "Let me think about the picture."  # no Question:/Answer: blocks
        return super().respond(request)


def test_build_records_failures_not_inventions(coco):
    contexts = build.sample_contexts(coco, "val", 2, seed=0)
    teacher = _FlakyTeacher()
    bench = build.build_bench(contexts, teacher, retries=1)
    assert teacher.calls == 4  # 2 images x (1 + 1 retry)
    assert [q["category"] for q in bench.questions] == ["conv", "detail"] * 2
    assert [f["category"] for f in bench.failures] == ["complex", "complex"]
    assert "no_pairs" in bench.failures[0]["reason"]


def test_a_teacher_down_on_every_try_stops_the_build_and_keeps_the_old_bench(
    coco, tmp_path, scripted_judge, capsys
):
    out = tmp_path / "bench"
    args = ["eval", "build", "--coco", str(coco), "--split", "val", "--images", "2", "--out",
            str(out), "--http-retries", "0", "--backoff", "0", "--retries", "1"]  # fmt: skip
    assert cli.main([*args, "--teacher", "rules"]) == 0
    before = (out / "questions.jsonl").read_text()
    down = scripted_judge({}, default=503)
    assert cli.main([*args, "--teacher", "openai", "--base-url", down.url, "--model", "m"]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert len(down.requests) == 2  # the first question's two tries, not 6 x 2
    assert (out / "questions.jsonl").read_text() == before


def test_build_needs_enough_images(coco):
    with pytest.raises(DataError, match=r"has 6 usable images, 7 asked"):
        build.sample_contexts(coco, "val", 7, seed=0)


def _obj(kind, color, position):
    return SceneObject(kind, color, "small", position, (0, 0, 8, 8))


def test_questions_for_image_exact_answers():
    objs = [_obj("circle", "red", "top left"), _obj("circle", "blue", "center"),
            _obj("square", "red", "bottom right")]  # fmt: skip
    qs = {q["category"]: q for q in scenes.questions_for_image("x.png", objs, random.Random(0))}
    assert set(qs) == set(scenes.SKILLS)
    assert (qs["color"]["text"], qs["color"]["answer"]) == ("What color is the square?", "red")
    assert (qs["kind"]["text"], qs["kind"]["answer"]) == ("What shape is the blue object?",
                                                          "circle")  # fmt: skip
    # the only absent (colour, kind) pair whose colour and kind both appear: blue square
    assert qs["absence"]["text"] == "Is there a blue square in the image?"
    assert qs["absence"]["answer"] == "no"
    assert qs["presence"]["answer"] == "yes"
    counts = {"circle": "2", "square": "1"}
    (kind,) = [k for k in KINDS if f"How many {k}s are" in qs["count"]["text"]
               or f"How many {k}es are" in qs["count"]["text"]]  # fmt: skip
    assert qs["count"]["answer"] == counts.get(kind, "0")


@pytest.mark.parametrize(
    ("skill", "expected", "prediction", "ok"),
    [
        ("count", "2", "There are two circles.", True),
        ("count", "2", "2", True),
        ("count", "0", "There are no stars.", True),
        ("count", "2", "I see three circles, or maybe 2.", False),
        ("color", "red", "The circle is red.", True),
        ("color", "red", "It is RED!", True),
        ("color", "red", "It is red and blue.", False),
        ("kind", "circle", "The blue object is a circle.", True),
        ("kind", "cross", "Those are crosses.", True),
        ("kind", "circle", "A square.", False),
        ("position", "top left", "It is in the upper left corner.", True),
        ("position", "top left", "At the top.", False),
        ("position", "center", "In the middle of the image.", True),
        ("position", "center", "On the left.", False),
        ("presence", "yes", "Yes, there is.", True),
        ("absence", "no", "No, there is a red square and a blue circle.", True),
        ("absence", "no", "Yes, a blue square.", False),
    ],
)
def test_matching(skill, expected, prediction, ok):
    assert scenes.matches(skill, expected, prediction) is ok


def test_scenes_cli_scores_per_skill(coco, tmp_path, write_jsonl):
    out = tmp_path / "sc"
    assert cli.main(["eval", "scenes", "--coco", str(coco), "--out", str(out)]) == 0
    questions = _jsonl(out / "questions.jsonl")
    # answer every question right except the first of each skill
    first = {}
    for q in questions:
        first.setdefault(q["category"], q["question_id"])
    answers = [{"question_id": q["question_id"],
                "text": "I cannot tell." if q["question_id"] in first.values() else q["answer"]}
               for q in questions]  # fmt: skip
    write_jsonl(tmp_path / "a.jsonl", answers)
    rc = cli.main(["eval", "scenes", "--coco", str(coco), "--out", str(out), "--answers",
                   str(tmp_path / "a.jsonl")])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    for skill in first:
        n = sum(q["category"] == skill for q in questions)
        assert report["counts"][skill] == n
        assert report["accuracy"][skill] == pytest.approx(100 * (n - 1) / n)
    n_all = len(questions)
    assert report["accuracy"]["all"] == pytest.approx(100 * (n_all - len(first)) / n_all)
    assert sorted(report["wrong"], key=int) == sorted(str(i) for i in first.values())
    assert (out / "report.png").is_file() and (out / "config.json").is_file()


def test_scenes_answers_must_match(coco, tmp_path, write_jsonl, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "1"}])
    rc = cli.main(["eval", "scenes", "--coco", str(coco), "--out", str(tmp_path / "o"),
                   "--answers", str(tmp_path / "a.jsonl")])  # fmt: skip
    assert rc == 2
    assert "does not match the questions; missing ids: 1, 2, 3" in capsys.readouterr().err


def test_scenes_with_a_model(coco, tmp_path, tiny_model):
    """--model answers the questions with the engine (tiny random model), then scores them."""
    model_dir = tiny_model.save(tmp_path / "model")
    out = tmp_path / "sc"
    rc = cli.main(["eval", "scenes", "--coco", str(coco), "--images", "2", "--out", str(out),
                   "--model", str(model_dir), "--max-new-tokens", "3"])  # fmt: skip
    assert rc == 0
    questions = _jsonl(out / "questions.jsonl")
    answers = _jsonl(out / "answers.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["all"] == len(questions)
    right = sum(scenes.matches(q["category"], q["answer"], a["text"])
                for q, a in zip(questions, answers, strict=True))  # fmt: skip
    assert report["accuracy"]["all"] == pytest.approx(100 * right / len(questions))


def test_scenes_images_must_be_positive(coco, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "scenes", "--coco", str(coco), "--images", "-1", "--out", str(tmp_path)])
    assert "must be at least 1, got -1" in capsys.readouterr().err

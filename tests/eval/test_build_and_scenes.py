"""`vistune eval build` (a LLaVA-Bench COCO-style benchmark from a teacher, §5.1) and
`vistune eval scenes` (exact-answer questions on held-out built-in scenes)."""

from __future__ import annotations

import collections
import dataclasses
import json
import random

import pytest

from vistune import cli
from vistune.data.scenes import KINDS, SceneObject, make_scenes
from vistune.datagen.teachers import RulesTeacher
from vistune.errors import DataError
from vistune.eval import build, judge, scenes
from vistune.eval.journal import appender

from ..datagen.conftest import messages_hash


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


def test_build_with_the_default_local_teacher(coco, tmp_path, monkeypatch):
    """`--teacher local` without --local-model is the packaged SmolLM2 (as in datagen), and
    --max-tokens reaches it; the model itself is stood in for by the rules."""
    from vistune.datagen import teachers

    seen = []

    def respond(self, request):
        seen.append((self.model_dir, self.max_new_tokens))
        return RulesTeacher().respond(request)

    monkeypatch.setattr(teachers.LocalTeacher, "respond", respond)
    out = tmp_path / "bench"
    rc = cli.main(["eval", "build", "--coco", str(coco), "--images", "2", "--teacher", "local",
                   "--max-tokens", "77", "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert seen == [(None, 77)] * 6
    assert len(_jsonl(out / "questions.jsonl")) == 6
    kept = _jsonl(out / "build_requests.jsonl")
    assert len(kept) == 6 and len({k["prompt_key"] for k in kept}) == 6


def test_build_with_a_pickled_local_teacher_is_one_line(coco, tmp_path, tiny_llm_dir, capsys):
    """--local-model is checked like --local-judge: a folder holding only a pickle
    (pytorch_model.bin) is refused before anything is asked or unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = shutil.copytree(tiny_llm_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "bench"
    rc = cli.main(["eval", "build", "--coco", str(coco), "--images", "2", "--teacher", "local",
                   "--local-model", str(pickled), "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "pickle .bin files are never loaded" in err and "Traceback" not in err
    assert not (out / "questions.jsonl").exists()


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
    err = capsys.readouterr().err
    assert "no benchmark file was written; 0 of 6 answers are kept in" in err
    assert len(down.requests) == 2  # the first question's two tries, not 6 x 2
    assert (out / "questions.jsonl").read_text() == before


def _teacher_reply(messages):
    """A teacher answer that differs per request (so a reply reused for the wrong request
    would show in the files)."""
    tag = messages_hash(messages)[:8]
    if "Question to answer:" in messages[-1]["content"]:
        return f"A plain picture, number {tag}, with a few simple objects."
    return f"Question: What is special about picture {tag}?\nAnswer: It is picture {tag}."


BENCH_FILES = ("questions.jsonl", "context.jsonl", "answers_reference.jsonl", "build.json")


def _build(coco, out, url, *extra):
    return cli.main(["eval", "build", "--coco", str(coco), "--images", "2", "--out", str(out),
                     "--teacher", "openai", "--base-url", url, "--model", "m", "--http-retries",
                     "0", "--backoff", "0", "--retries", "1", *extra])  # fmt: skip


def _sent(server):
    return [messages_hash(r["messages"]) for r in server.requests]


def test_a_build_stopped_by_a_dead_teacher_resumes_asking_only_the_rest(
    coco, tmp_path, scripted_judge, capsys
):
    whole = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, tmp_path / "whole", whole.url) == 0
    assert len(whole.requests) == 6
    out = tmp_path / "bench"
    dying = scripted_judge({}, default=_teacher_reply, dies_after=4)
    assert _build(coco, out, dying.url) == 2
    err = capsys.readouterr().err
    assert f"4 of 6 answers are kept in {out / 'build_requests.jsonl'}" in err
    assert "rerun with --resume" in err
    assert len(dying.requests) == 4 + 2  # the fifth question's two tries, then it stops
    assert not (out / "questions.jsonl").exists()
    working = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, out, working.url) == 0
    assert _sent(working) == _sent(whole)[4:]  # only the two never answered
    for name in BENCH_FILES:
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    again = scripted_judge({}, default=503)
    assert _build(coco, out, again.url) == 0 and again.requests == []


def test_a_build_interrupted_mid_write_resumes_past_a_torn_line(coco, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    args = ["eval", "build", "--coco", str(coco), "--images", "2", "--out", str(out)]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    calls = []
    respond = RulesTeacher.respond

    def interrupted(self, request):  # Ctrl-C while the fourth question is asked
        calls.append(request.response_type)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return respond(self, request)

    monkeypatch.setattr(RulesTeacher, "respond", interrupted)
    assert cli.main(args) == 130
    with (out / "build_requests.jsonl").open("ab") as kept:  # killed mid-write: a torn line
        kept.write(b'{"prompt_key": "0123", "content": "caf\xc3')
    calls.clear()
    monkeypatch.setattr(
        RulesTeacher, "respond", lambda self, r: calls.append(1) or respond(self, r)
    )
    assert cli.main(args) == 0
    assert len(calls) == 3  # the three not answered before the interrupt
    for name in BENCH_FILES:
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    calls.clear()
    assert cli.main(args) == 0
    assert calls == []  # the answer written after the torn line was kept on a line of its own


def test_a_build_asks_again_when_the_requests_change(coco, tmp_path, scripted_judge):
    out = tmp_path / "bench"
    first = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, out, first.url) == 0
    for extra in (["--model", "m2"], ["--temperature", "0.7"], ["--max-tokens", "2048"],
                  ["--no-resume"]):  # fmt: skip
        server = scripted_judge({}, default=_teacher_reply)
        assert _build(coco, out, server.url, *extra) == 0
        # another teacher, sampling or reply limit (a larger one must not reuse replies
        # cut at the old), or a fresh start
        assert len(server.requests) == 6, extra
    assert len((out / "build_requests.jsonl").read_text().splitlines()) == 6  # --no-resume
    # another seed asks other detail questions (here of the same two images): only the
    # requests whose messages changed are asked again
    fresh = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, tmp_path / "fresh", fresh.url, "--seed", "5") == 0
    seeded = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, out, seeded.url, "--seed", "5") == 0
    assert _sent(seeded) == [h for h in _sent(fresh) if h not in _sent(first)]
    assert [r["messages"][-1]["content"].count("Question to answer:") for r in seeded.requests
            ] == [1, 1]  # fmt: skip
    for name in BENCH_FILES:
        assert (out / name).read_text() == (tmp_path / "fresh" / name).read_text(), name


class _NumberedTeacher(RulesTeacher):
    """A sampling teacher: every reply is new (numbered), even to the same messages."""

    def __init__(self) -> None:
        self.calls = 0

    def respond(self, request):
        self.calls += 1
        if request.response_type == "detail":
            return f"A plain picture, reply {self.calls}, with a few simple objects."
        return f"Question: What is in this picture?\nAnswer: Reply {self.calls}."


def test_two_images_with_identical_annotations_keep_their_own_replies(coco, tmp_path):
    """The teacher sees only the annotations, so two images annotated alike send the same
    messages: their kept replies must still be told apart by image."""
    (ctx,) = build.sample_contexts(coco, "val", 1, seed=0)
    twin = dataclasses.replace(ctx, image_id=f"{ctx.image_id}-twin", image="val/twin.png")
    path = tmp_path / "build_requests.jsonl"
    with appender(path) as log:
        whole = build.build_bench([ctx, twin], _NumberedTeacher(), log=log, teacher_id="t")
    assert whole.references[0]["text"] != whole.references[3]["text"]  # two replies
    teacher = _NumberedTeacher()
    again = build.build_bench([ctx, twin], teacher, done=build.kept_replies(path), teacher_id="t")
    assert teacher.calls == 0
    assert (again.questions, again.references) == (whole.questions, whole.references)
    # stopped after the first image: the twin is asked, not given the first image's replies
    part = tmp_path / "part.jsonl"
    with appender(part) as log:
        build.build_bench([ctx], _NumberedTeacher(), log=log, teacher_id="t")
        log({"prompt_key": "0123", "content": "no image named"})  # not attributable: skipped
    teacher = _NumberedTeacher()
    build.build_bench([ctx, twin], teacher, done=build.kept_replies(part), teacher_id="t")
    assert teacher.calls == 3


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
        ("count", "2", "I count two circles.", True),
        ("count", "0", "I count no stars.", True),
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
        # the rules teacher's one form for all nine places
        ("position", "left", "It is in the middle left of the picture.", True),
        ("position", "top", "It is in the top middle of the picture.", True),
        ("position", "top", "It is in the top left of the picture.", False),
        ("position", "center", "It is in the middle of the picture.", True),
        ("position", "bottom right", "It is in the bottom right of the picture.", True),
        ("presence", "yes", "Yes, there is.", True),
        ("absence", "no", "No, there is a red square and a blue circle.", True),
        ("absence", "no", "Yes, a blue square.", False),
        # answers that say what is seen before the yes or no
        (
            "presence",
            "yes",
            "The stars in the picture are red and green, so yes: a red star"
            " is on the left side of the picture.",
            True,
        ),
        ("absence", "no", "The star in the picture is blue, so no, there is no red star.", True),
        ("absence", "no", "There is no star in the picture, so no, there is no red star.", True),
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


def test_a_build_says_how_many_kept_replies_are_not_reused(coco, tmp_path, scripted_judge, capsys):
    out = tmp_path / "bench"
    assert _build(coco, out, scripted_judge({}, default=_teacher_reply).url) == 0
    assert "not reused" not in capsys.readouterr().err
    server = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, out, server.url, "--max-tokens", "2048") == 0
    err = capsys.readouterr().err
    assert f"6 replies kept in {out / 'build_requests.jsonl'} are not reused" in err
    again = scripted_judge({}, default=_teacher_reply)
    assert _build(coco, out, again.url, "--max-tokens", "2048") == 0
    assert again.requests == [] and "not reused" not in capsys.readouterr().err


def test_answers_are_balanced_within_each_skill(tmp_path):
    make_scenes(tmp_path, 120, seed=2, val_fraction=0.5, size=64)
    from vistune.data.scenes import load_scene_objects

    truth = load_scene_objects(tmp_path, "val")
    questions = scenes.make_questions(truth, {k: f"val/{k}.png" for k in truth})
    by_skill = {s: [q["answer"] for q in questions if q["category"] == s] for s in scenes.SKILLS}
    assert by_skill["presence"].count("yes") == len(by_skill["presence"]) == 60
    assert by_skill["absence"].count("no") == len(by_skill["absence"]) == 60
    counts = collections.Counter(by_skill["count"])
    # every count a scene allows, not mostly 0 (the old benchmark: 17 of 20)
    assert counts["0"] <= len(by_skill["count"]) / 3 and len(counts) >= 3
    colours = collections.Counter(by_skill["color"])
    assert len(colours) == 10 and max(colours.values()) - min(colours.values()) <= 3


def test_shuffled_control_asks_about_another_picture():
    questions = [{"question_id": i, "image": f"{i % 3}.png", "text": "q", "answer": "a"}
                 for i in range(6)]  # fmt: skip
    control = scenes.shuffled_control(questions)
    assert all(c["image"] != c["own_image"] for c in control)
    assert [c["own_image"] for c in control] == [q["image"] for q in questions]
    assert sorted({c["image"] for c in control}) == ["0.png", "1.png", "2.png"]
    with pytest.raises(ValueError, match="at least two images"):
        scenes.shuffled_control(questions[:1])


def test_scenes_cli_reports_chance_and_the_control(coco, tmp_path):
    out = tmp_path / "ctl"
    assert cli.main(["eval", "scenes", "--coco", str(coco), "--control", "shuffled",
                     "--out", str(out)]) == 0  # fmt: skip
    rows = _jsonl(out / "questions.jsonl")
    assert all(r["image"] != r["own_image"] for r in rows)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": r["question_id"], "text": "no"}) + "\n"
                               for r in rows))  # fmt: skip
    assert cli.main(["eval", "scenes", "--coco", str(coco), "--control", "shuffled",
                     "--out", str(out), "--answers", str(answers)]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["chance"]["presence"] == 50.0 and report["chance"]["color"] == 10.0
    assert "accuracy, swapped images (%)" in (out / "report.md").read_text()

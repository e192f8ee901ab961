"""`vistune eval answer`: batched, resumable answering through the engine interface
(`answer_batch(list of (messages, image), config) -> list[str]`), here with a scripted
stand-in engine; and `--model` on `eval scienceqa` / `eval scenes`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vistune import cli
from vistune.config import GenerationConfig
from vistune.errors import VistuneError
from vistune.eval import answer


class FakeEngine:
    """Answers "A<n>" for the n-th request; records what it was given; can die mid-run."""

    def __init__(self, die_after: int | None = None) -> None:
        self.batches: list[list[tuple[list[dict], object]]] = []
        self.die_after = die_after

    def answer_batch(self, requests, config):
        if self.die_after is not None and len(self.batches) == self.die_after:
            raise KeyboardInterrupt
        self.batches.append(requests)
        return [f" answer to: {m[0]['content']} " for m, _ in requests]


@pytest.fixture
def bench(tmp_path, write_jsonl):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    questions = [{"question_id": i, "image": "a.png" if i % 2 == 0 else None,
                  "text": f"Q{i}?", "category": "conv"} for i in range(5)]  # fmt: skip
    return write_jsonl(tmp_path / "q.jsonl", questions), questions


def test_answers_in_order_with_placeholder(bench, tmp_path):
    _, questions = bench
    engine = FakeEngine()
    out = tmp_path / "ans.jsonl"
    rows = answer.answer_questions(engine, questions, tmp_path, out, GenerationConfig(), "m",
                                   batch_size=2)  # fmt: skip
    assert [len(b) for b in engine.batches] == [2, 2, 1]
    first_msgs, first_img = engine.batches[0][0]
    assert first_msgs == [{"role": "user", "content": "<image>\nQ0?"}]
    assert isinstance(first_img, Image.Image)
    assert engine.batches[0][1] == ([{"role": "user", "content": "Q1?"}], None)
    on_disk = [json.loads(x) for x in out.read_text().splitlines()]
    assert on_disk == rows
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["text"] == "answer to: Q1?" and rows[1]["model_id"] == "m"
    assert rows[1]["prompt"] == "Q1?"
    assert not (tmp_path / "ans.jsonl.partial").exists()


def test_resume_after_interrupt(bench, tmp_path):
    _, questions = bench
    out = tmp_path / "ans.jsonl"
    with pytest.raises(KeyboardInterrupt):
        answer.answer_questions(FakeEngine(die_after=1), questions, tmp_path, out,
                                GenerationConfig(), "m", batch_size=2)  # fmt: skip
    assert not out.exists()
    assert len((tmp_path / "ans.jsonl.partial").read_text().splitlines()) == 2
    engine = FakeEngine()
    rows = answer.answer_questions(engine, questions, tmp_path, out, GenerationConfig(), "m",
                                   batch_size=2)  # fmt: skip
    asked = [m[0]["content"] for b in engine.batches for m, _ in b]
    assert asked == ["<image>\nQ2?", "Q3?", "<image>\nQ4?"]  # Q0, Q1 not asked again
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]


def _interrupted(questions, tmp_path, out, **kwargs):
    """A run killed after its first batch (Q0, Q1)."""
    with pytest.raises(KeyboardInterrupt):
        answer.answer_questions(FakeEngine(die_after=1), questions, tmp_path, out,
                                GenerationConfig(), "m", batch_size=2, **kwargs)  # fmt: skip


def _asked(engine):
    return [m[0]["content"] for b in engine.batches for m, _ in b]


@pytest.mark.parametrize(
    ("change", "asked_again"),
    [
        ({"config": GenerationConfig(max_new_tokens=64)}, 5),  # answers may be cut shorter
        ({"config": GenerationConfig(temperature=0.7, seed=1)}, 5),
        ({"model_id": "other"}, 5),
        ({"model_key": "/runs/b/checkpoint-1000"}, 5),  # same folder name, another model
        ({"text": {0: "Q0, reworded?"}}, 4),
        ({"image": {0: "b.png"}}, 4),
        ({}, 3),
    ],
)
def test_resume_reuses_only_answers_to_the_same_request(bench, tmp_path, change, asked_again):
    _, questions = bench
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    out = tmp_path / "ans.jsonl"
    _interrupted(questions, tmp_path, out, model_key="/runs/a/checkpoint-1000")
    questions = [dict(q, text=change.get("text", {}).get(i, q["text"]),
                      image=change.get("image", {}).get(i, q["image"]))
                 for i, q in enumerate(questions)]  # fmt: skip
    engine = FakeEngine()
    rows = answer.answer_questions(engine, questions, tmp_path, out,
                                   change.get("config", GenerationConfig()),
                                   change.get("model_id", "m"), batch_size=2,
                                   model_key=change.get("model_key", "/runs/a/checkpoint-1000"))  # fmt: skip
    assert len(_asked(engine)) == asked_again
    assert [r["prompt"] for r in rows] == [q["text"] for q in questions]


def test_resume_past_a_torn_partial_line(bench, tmp_path):
    """A kill mid-write can cut a line inside a UTF-8 character: the next run skips it
    (no UnicodeDecodeError) and writes its first answer on a line of its own."""
    _, questions = bench
    out = tmp_path / "ans.jsonl"
    _interrupted(questions, tmp_path, out)
    partial = tmp_path / "ans.jsonl.partial"
    with partial.open("ab") as fh:
        fh.write(b'{"question_id": 2, "text": "caf\xc3')
    with pytest.raises(KeyboardInterrupt):
        answer.answer_questions(FakeEngine(die_after=1), questions, tmp_path, out,
                                GenerationConfig(), "m", batch_size=2)  # fmt: skip
    engine = FakeEngine()
    rows = answer.answer_questions(engine, questions, tmp_path, out, GenerationConfig(), "m")
    assert _asked(engine) == ["<image>\nQ4?"]  # Q2, Q3 answered after the torn line: kept
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]


def test_an_answer_holding_a_unicode_line_separator_is_resumed(bench, tmp_path):
    _, questions = bench

    class Separated(FakeEngine):
        def answer_batch(self, requests, config):
            return [t + "\u2028more" for t in super().answer_batch(requests, config)]

    out = tmp_path / "ans.jsonl"
    with pytest.raises(KeyboardInterrupt):
        answer.answer_questions(Separated(die_after=1), questions, tmp_path, out,
                                GenerationConfig(), "m", batch_size=2)  # fmt: skip
    engine = FakeEngine()
    rows = answer.answer_questions(engine, questions, tmp_path, out, GenerationConfig(), "m")
    assert len(_asked(engine)) == 3
    assert rows[0]["text"] == "answer to: <image>\nQ0? \u2028more"


def test_missing_image_listed(bench, tmp_path):
    _, questions = bench
    (tmp_path / "a.png").unlink()
    with pytest.raises(VistuneError, match=r"images missing under .* for question ids: 0, 2, 4"):
        answer.answer_questions(FakeEngine(), questions, tmp_path, tmp_path / "o.jsonl",
                                GenerationConfig(), "m")  # fmt: skip


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(answer, "require_engine", lambda: None)
    monkeypatch.setattr(answer, "load_engine", lambda model, batch_size=8, template=None: engine)
    return engine


def test_cli_answer(bench, tmp_path, fake_engine):
    q_path, _ = bench
    out = tmp_path / "out" / "answers.jsonl"
    rc = cli.main(["eval", "answer", "--model", "m", "--questions", str(q_path), "--out",
                   str(out), "--batch-size", "4"])  # fmt: skip
    assert rc == 0
    assert [len(b) for b in fake_engine.batches] == [4, 1]
    assert len(out.read_text().splitlines()) == 5


def test_cli_resume_tells_models_that_share_a_folder_name(bench, tmp_path, fake_engine):
    q_path, _ = bench
    out = tmp_path / "answers.jsonl"

    def run(model):
        return cli.main(["eval", "answer", "--model", str(tmp_path / model / "checkpoint-1000"),
                         "--questions", str(q_path), "--out", str(out), "--batch-size", "2"])  # fmt: skip

    fake_engine.die_after = 1
    assert run("a") == 130
    fake_engine.die_after, fake_engine.batches = None, []
    assert run("b") == 0
    assert sum(len(b) for b in fake_engine.batches) == 5  # a's two answers are not b's


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (
            ["--temperature", "-1"],
            "argument --temperature/--answer-temperature: must be at least 0 and finite",
        ),
        (
            ["--answer-temperature", "-1"],
            "argument --temperature/--answer-temperature: must be at least 0 and finite",
        ),
        (["--top-p", "0"], "argument --top-p: must be above 0 and at most 1, got 0.0"),
    ],
)
def test_cli_bad_answer_flags_are_one_line(bench, tmp_path, fake_engine, capsys, flags, message):
    """argparse's one line naming the flag (the flag's own check, not a rewritten
    GenerationConfig message), exit 2, before any model is loaded."""
    q_path, _ = bench
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "answer", "--model", "m", "--questions", str(q_path), "--out",
                  str(tmp_path / "a.jsonl"), *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ") and message in err, err
    assert len([ln for ln in err.splitlines() if "error" in ln]) == 1
    assert fake_engine.batches == []


def test_cli_a_bad_batch_size_is_argparse_s_one_line(bench, tmp_path, fake_engine, capsys):
    q_path, _ = bench
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "answer", "--model", "m", "--questions", str(q_path), "--out",
                  str(tmp_path / "a.jsonl"), "--batch-size", "0"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --batch-size: must be at least 1, got 0" in err
    assert fake_engine.batches == []


def test_cli_scienceqa_model(sqa_files, tmp_path, fake_engine):
    images = tmp_path / "images"
    for pid in ("1", "2", "5", "9"):  # the fixture's problems with an image
        (images / pid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(images / pid / "image.png")
    out = tmp_path / "out"
    rc = cli.main(["eval", "scienceqa", "--problems", str(sqa_files[0]), "--splits",
                   str(sqa_files[1]), "--model", "m", "--image-root", str(images),
                   "--out", str(out)])  # fmt: skip
    assert rc == 0
    prompts = [m[0]["content"] for b in fake_engine.batches for m, _ in b]
    assert prompts[0].startswith("<image>\nWhich is right for item 1?\nContext: N/A\nOptions:")
    assert prompts[2].startswith("Which is right for item 3?\nContext: N/A\nOptions:")
    report = json.loads((out / "report.json").read_text())
    assert report["ours"]["unparsed"]["count"] == 10  # the fake engine never gives a letter
    assert (out / "predictions.jsonl").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ensemble", "complement", "--other", "MALFORMED"], "line 1 (not JSON)"),
        (["--ensemble", "complement", "--other", "MISSING"], "predictions file not found"),
        (["--ensemble", "judge", "--other", "GOOD"], "needs --judge-base-url and --judge-model"),
    ],
)
def test_cli_scienceqa_model_checks_the_ensemble_before_generating(
    sqa_files, tmp_path, fake_engine, capsys, flags, message
):
    """Generated predictions are not reused by a rerun, so a bad --other file or missing
    judge flags must stop the run before the model answers, not after."""
    for pid in ("1", "2", "5", "9"):  # the fixture's problems with an image
        (tmp_path / pid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / pid / "image.png")
    (tmp_path / "MALFORMED").write_text("{oops\n")
    (tmp_path / "GOOD").write_text(
        "".join(json.dumps({"question_id": str(i), "text": "A"}) + "\n" for i in range(1, 11))
    )
    flags = [str(tmp_path / f) if f.isupper() else f for f in flags]
    rc = cli.main(["eval", "scienceqa", "--problems", str(sqa_files[0]), "--splits",
                   str(sqa_files[1]), "--model", "m", "--image-root", str(tmp_path),
                   "--out", str(tmp_path / "out"), *flags])  # fmt: skip
    assert rc == 2 and message in capsys.readouterr().err
    assert fake_engine.batches == []


def test_cli_without_engine_is_clear(bench, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vistune.serve.engine" else real(name, *a))  # fmt: skip
    q_path, _ = bench
    rc = cli.main(["eval", "answer", "--model", "m", "--questions", str(q_path), "--out",
                   str(tmp_path / "a.jsonl")])  # fmt: skip
    assert rc == 2
    assert "needs the generation engine (vistune.serve.engine)" in capsys.readouterr().err


def test_cli_answer_with_the_real_engine(bench, tmp_path, tiny_model):
    """The real engine on the tiny model: the command's answers are the engine's answers to
    the same requests, in question order."""
    from vistune.data.image import load_image
    from vistune.model.llava import LlavaModel
    from vistune.serve.engine import Engine

    q_path, questions = bench
    model_dir = tiny_model.save(tmp_path / "model")
    out = tmp_path / "answers.jsonl"
    rc = cli.main(["eval", "answer", "--model", str(model_dir), "--questions", str(q_path),
                   "--out", str(out), "--max-new-tokens", "5", "--batch-size", "5"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    engine = Engine(LlavaModel.load(model_dir))
    requests = [(answer.messages_for(q), load_image(tmp_path / q["image"]) if q["image"] else None)
                for q in questions]  # fmt: skip
    want = engine.answer_batch(requests, GenerationConfig(max_new_tokens=5, seed=0))
    assert [r["text"] for r in rows] == [w.strip() for w in want]
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["model_id"] == "model"
    assert all(r["text"] for r in rows)  # the tiny model says something (not a vacuous match)


def test_load_engine_loads_bf16_directly_with_the_same_answers(tiny_model, tmp_path, monkeypatch):
    """An fp32 load cast afterwards held both copies at once (28 GB for a 7B LLM); the
    model now loads in bf16 and answers exactly as the fp32-then-cast engine did."""
    import torch

    import vistune.model
    from vistune.model import load_model
    from vistune.serve.engine import Engine

    loaded = []

    def spy(spec, dtype=None):
        model = load_model(spec, dtype=dtype)
        loaded.append({p.dtype for p in model.llm.parameters()})
        return model

    monkeypatch.setattr(vistune.model, "load_model", spy)
    model_dir = tiny_model.save(tmp_path / "model")
    engine = answer.load_engine(model_dir, batch_size=2)
    assert loaded == [{torch.bfloat16}]  # as loaded, before the engine casts anything
    monkeypatch.undo()
    cast = Engine(load_model(model_dir), batch_size=2)
    image = Image.new("RGB", (16, 16), "blue")
    requests = [([{"role": "user", "content": "<image>\nWhat is it?"}], image),
                ([{"role": "user", "content": "Hello"}], None)]  # fmt: skip
    config = GenerationConfig(max_new_tokens=6)
    assert engine.answer_batch(requests, config) == cast.answer_batch(requests, config)


def test_load_engine_says_what_chat_says_about_the_model(tiny_model, tmp_path, capsys):
    """A stage-1 model answers through the plain template, which never shows it the
    question, and an untrained projector ignores the image: `eval answer` said neither."""
    import copy
    import dataclasses

    model = copy.deepcopy(tiny_model)
    model.config = dataclasses.replace(model.config, template="plain")
    model.projector_trained = False
    answer.load_engine(model.save(tmp_path / "stage1"))
    err = capsys.readouterr().err
    assert "untrained projector, so its answers ignore the image" in err
    assert "the plain template (a stage-1 model) renders only the image" in err
    model.config = dataclasses.replace(model.config, template="vicuna_v0")
    model.projector_trained = True
    answer.load_engine(model.save(tmp_path / "stage2"))
    assert "vistune: note" not in capsys.readouterr().err


def test_load_engine_takes_another_template(tiny_model, tmp_path, capsys):
    """`--template chat_template` lets a stage-1 model (plain) be asked the question."""
    import copy
    import dataclasses

    model = copy.deepcopy(tiny_model)
    model.config = dataclasses.replace(model.config, template="plain")
    engine = answer.load_engine(model.save(tmp_path / "stage1"), template="chat_template")
    assert engine.template == "chat_template"
    assert "plain template" not in capsys.readouterr().err

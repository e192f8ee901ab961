"""LLaVA-Bench judging (§5.1): score parsing, relative scores worked out by hand against a
scripted judge on loopback (with failing and malformed replies), repeats, resume, reports
and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vistune import cli
from vistune.errors import DataError
from vistune.eval import judge
from vistune.eval.journal import prompt_key


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("8 7", (8.0, 7.0)),
        ("8, 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("8.5 7", (8.5, 7.0)),
        ("(8, 7)", (8.0, 7.0)),
        ("**9 6**", (9.0, 6.0)),
        ("Assistant 1: 8, Assistant 2: 7", (8.0, 7.0)),
        ("Assistant 2: 7, Assistant 1: 8", None),  # not guessed: asked again
        ("\n\n10 1\nexplanation", (10.0, 1.0)),
        ("11 7", None),  # out of range
        ("0 5", None),
        ("-1 -1", None),
        ("8", None),  # missing
        ("8 7 6", None),
        ("I would give 8 and 7", None),
        ("The first answer is better.\n8 7", None),  # scores must be on the first line
        ("", None),
    ],
)
def test_parse_scores(text, want):
    assert judge.parse_scores(text) == want


def _bench(tmp: Path, write_jsonl) -> dict[str, Path]:
    """Five questions on two images: q1, q2 conv; q3 detail; q4, q5 complex."""
    cats = {"q1": "conv", "q2": "conv", "q3": "detail", "q4": "complex", "q5": "complex"}
    questions = [
        {"question_id": q, "image": "a.jpg" if q in ("q1", "q3") else "b.jpg",
         "text": f"Question {q}?", "category": c}
        for q, c in cats.items()
    ]  # fmt: skip
    context = [
        {"id": "a", "image": "a.jpg", "captions": ["A dog on grass.", "A brown dog."],
         "instances": [{"category": "dog", "bbox": [0.1, 0.2, 0.5, 0.9]}]},
        {"id": "b", "image": "b.jpg", "caption": "A red car parked by a wall."},
    ]  # fmt: skip
    ref = [{"question_id": q, "text": f"Reference {q}.", "answer_id": f"r{q}"} for q in cats]
    ans = [{"question_id": q, "text": f"Candidate {q}.", "answer_id": f"c{q}",
            "model_id": "m", "prompt": f"Question {q}?"} for q in cats]  # fmt: skip
    return {
        "questions": write_jsonl(tmp / "q.jsonl", questions),
        "context": write_jsonl(tmp / "ctx.jsonl", context),
        "reference": write_jsonl(tmp / "ref.jsonl", ref),
        "answers": write_jsonl(tmp / "ans.jsonl", ans),
    }


# Replies per question. retries=2 gives each question at most 3 requests.
SCRIPT = {
    "Question q1?": ["8 6\nAssistant 2 misses the colour."],  # (8, 6)
    "Question q2?": [500, "9, 9"],  # HTTP 500, asked again -> (9, 9)
    "Question q3?": ["Both are fine.", "11 3", "7 3"],  # unparsable, out of range -> (7, 3)
    "Question q4?": ["10 5"],  # (10, 5)
    "Question q5?": ["no scores", "8", "Assistant 1 wins"],  # fails 3 times -> excluded
}


def _args(files: dict[str, Path], url: str, out: Path, *extra: str) -> list[str]:
    args = ["eval", "judge", "--base-url", url, "--model", "judge", "--out", str(out),
            "--http-retries", "0", "--backoff", "0", "--retries", "2", *extra]  # fmt: skip
    for name, path in files.items():
        args += [f"--{name}", str(path)]
    return args


@pytest.mark.parametrize("workers", ["1", "3"])
def test_judge_relative_scores_by_hand(tmp_path, write_jsonl, scripted_judge, capsys, workers):
    files = _bench(tmp_path, write_jsonl)
    server = scripted_judge(SCRIPT, default="unexpected request")
    out = tmp_path / "out"
    assert cli.main(_args(files, server.url, out, "--workers", workers)) == 0
    report = json.loads((out / "report.json").read_text())
    rel = report["relative"]
    # conversation: candidate mean (6 + 9) / 2 = 7.5, reference (8 + 9) / 2 = 8.5
    assert rel["conversation"] == pytest.approx(7.5 / 8.5 * 100)  # 88.235...
    # detail: 3 / 7
    assert rel["detail"] == pytest.approx(3 / 7 * 100)  # 42.857...
    # complex: only q4 counts (q5 failed and is excluded, not scored): 5 / 10
    assert rel["complex"] == pytest.approx(50.0)
    # all pools the four judged questions: (6+9+3+5)/4 = 5.75 over (8+9+7+10)/4 = 8.5
    assert rel["all"] == pytest.approx(5.75 / 8.5 * 100)  # 67.647...
    # (had q5 been scored -1/-1, complex would read (5-1)/(10-1) = 44.4: not what we report)
    assert report["failures"]["count"] == 1
    assert report["failures"]["question_ids"] == ["q5"]
    assert "unparsable scores" in report["failures"]["items"][0]["reason"]
    assert report["runs"][0]["all"]["judged"] == 4
    assert report["questions"] == {"conversation": 2, "detail": 1, "complex": 2, "all": 5}
    # every request went out as scripted: 1 + 2 + 3 + 1 + 3
    assert [server.asked(f"Question q{i}?") for i in range(1, 6)] == [1, 2, 3, 1, 3]
    raw = [json.loads(x) for x in (out / "raw_judgements.jsonl").read_text().splitlines()]
    assert len(raw) == 10  # every attempt is kept, including the HTTP 500
    assert [r["error"] is None for r in raw if r["question_id"] == "q3"] == [False, False, True]
    assert any("request failed" in (r["error"] or "") for r in raw if r["question_id"] == "q2")
    for name in ("report.md", "report.png", "config.json"):
        assert (out / name).is_file()
    assert json.loads((out / "config.json").read_text())["repeats"] == 1
    assert "Failures (excluded from the means): 1 (question ids: q5)" in capsys.readouterr().out


def test_judge_prompt_holds_context_boxes_and_rubric(tmp_path, write_jsonl, scripted_judge):
    files = _bench(tmp_path, write_jsonl)
    server = scripted_judge({}, default="7 7")
    assert cli.main(_args(files, server.url, tmp_path / "out")) == 0
    q1 = next(r for r in server.requests if "Question q1?" in r["messages"][-1]["content"])
    text = q1["messages"][-1]["content"]
    assert text.startswith(
        "[Context]\nA dog on grass.\nA brown dog.\n\ndog: [0.100, 0.200, 0.500, 0.900]"
    )
    assert "[Assistant 1]\nReference q1.\n\n[End of Assistant 1]" in text
    assert "[Assistant 2]\nCandidate q1.\n\n[End of Assistant 2]" in text
    assert judge.load_rubric("conversation") in text
    q4 = next(r for r in server.requests if "Question q4?" in r["messages"][-1]["content"])
    assert judge.load_rubric("complex") in q4["messages"][-1]["content"]
    assert q4["messages"][-1]["content"].startswith("[Context]\nA red car parked by a wall.\n\n[Q")


def test_repeats_mean_and_population_std():
    item = judge.BenchItem("q", "conversation", "Q?", "ctx", "ref", "cand")
    replies = iter(["10 8", "10 6"])  # run 0: 80 %, run 1: 60 %
    js = judge.run_judge([item], lambda m: next(replies), repeats=2, retries=0)
    report = judge.summarize([item], js, repeats=2)
    assert report["relative"]["conversation"] == pytest.approx(70.0)  # (80 + 60) / 2
    # population std: sqrt(((80-70)^2 + (60-70)^2) / 2) = 10 (the sample std would be 14.14)
    assert report["std"]["conversation"] == pytest.approx(10.0)
    assert report["std"]["all"] == pytest.approx(10.0)
    assert report["std"]["detail"] is None and report["relative"]["detail"] is None
    assert [r["conversation"]["relative"] for r in report["runs"]] == pytest.approx([80.0, 60.0])


def test_resume_asks_only_what_failed(tmp_path, write_jsonl, scripted_judge):
    files = _bench(tmp_path, write_jsonl)
    out = tmp_path / "out"
    first = scripted_judge(SCRIPT, default="unexpected request")
    assert cli.main(_args(files, first.url, out)) == 0
    with (out / "raw_judgements.jsonl").open("ab") as raw:  # killed mid-write: a torn line
        raw.write(b'{"repeat": 0, "question_id": "q5", "content": "caf\xc3')
    second = scripted_judge({"Question q5?": ["6 3"]}, default="1 1")
    assert cli.main(_args(files, second.url, out)) == 0
    assert len(second.requests) == 1  # only q5 (failed before) is asked again
    third = scripted_judge({}, default="1 1")
    assert cli.main(_args(files, third.url, out)) == 0
    assert third.requests == []  # q5's answer was kept on a line of its own
    report = json.loads((out / "report.json").read_text())
    assert report["failures"]["count"] == 0
    assert report["relative"]["complex"] == pytest.approx((5 + 3) / (10 + 6) * 100)  # 50.0
    assert report["relative"]["all"] == pytest.approx(
        (6 + 9 + 3 + 5 + 3) / (8 + 9 + 7 + 10 + 6) * 100
    )


def test_resume_asks_again_when_the_judge_or_its_settings_change(
    tmp_path, write_jsonl, scripted_judge
):
    files = _bench(tmp_path, write_jsonl)
    out = tmp_path / "out"
    assert cli.main(_args(files, scripted_judge({}, default="8 4").url, out)) == 0
    # a larger reply limit must not reuse judgements cut at the old one
    for extra in (["--model", "j2"], ["--temperature", "0.7"], ["--max-tokens", "2048"]):
        server = scripted_judge({}, default="8 4")
        assert cli.main(_args(files, server.url, out, *extra)) == 0
        assert len(server.requests) == 5, extra
        again = scripted_judge({}, default="8 4")
        assert cli.main(_args(files, again.url, out, *extra)) == 0
        assert again.requests == [], extra


def test_a_journal_from_before_the_token_limit_was_keyed_is_asked_again(
    tmp_path, write_jsonl, scripted_judge, capsys
):
    """Old records (keyed by model and temperature alone) cannot show which limit cut
    them: they are ignored, and their questions asked again, not reused or a crash."""
    files = _bench(tmp_path, write_jsonl)
    out = tmp_path / "out"
    out.mkdir()
    items = judge.load_bench(**files)
    old = [{"repeat": 0, "question_id": i.question_id, "category": i.category, "attempt": 0,
            "prompt_key": prompt_key(judge.judge_messages(i, judge.load_rubric(i.category)),
                                     "judge|temperature=0.2"),
            "content": "9 1", "scores": [9, 1], "error": None} for i in items]  # fmt: skip
    write_jsonl(out / "raw_judgements.jsonl", old)
    server = scripted_judge({}, default="8 4")
    capsys.readouterr()
    assert cli.main(_args(files, server.url, out)) == 0
    assert len(server.requests) == 5
    assert json.loads((out / "report.json").read_text())["relative"]["all"] == 50.0
    # said before asking, not found out from the bill
    raw = out / "raw_judgements.jsonl"
    assert f"5 replies kept in {raw} are not reused: their key differs" in capsys.readouterr().err
    again = scripted_judge({}, default="8 4")
    assert cli.main(_args(files, again.url, out)) == 0
    assert again.requests == [] and "not reused" not in capsys.readouterr().err


def test_changed_settings_say_how_many_kept_judgements_are_not_reused(
    tmp_path, write_jsonl, scripted_judge, capsys
):
    files = _bench(tmp_path, write_jsonl)
    out = tmp_path / "out"
    assert cli.main(_args(files, scripted_judge({}, default="8 4").url, out, "--repeats", "2")) == 0
    assert "not reused" not in capsys.readouterr().err
    # one repeat, a larger limit: the 5 requests of repeat 0 have replies under the old key
    server = scripted_judge({}, default="8 4")
    assert cli.main(_args(files, server.url, out, "--max-tokens", "2048")) == 0
    err = capsys.readouterr().err
    assert f"5 replies kept in {out / 'raw_judgements.jsonl'} are not reused" in err
    assert cli.main(_args(files, server.url, out, "--no-resume")) == 0
    assert "not reused" not in capsys.readouterr().err


def test_a_local_judge_asks_again_under_another_token_limit(tmp_path, write_jsonl, monkeypatch):
    limits = []

    class FakeLocalJudge:
        def __init__(self, model_dir, max_new_tokens):
            self.max_new_tokens = max_new_tokens

        def complete(self, messages):
            limits.append(self.max_new_tokens)
            return "8 4"

    monkeypatch.setattr(judge, "LocalJudge", FakeLocalJudge)
    files = _bench(tmp_path, write_jsonl)
    args = ["eval", "judge", "--local-judge", str(tmp_path), "--out", str(tmp_path / "out")]
    for name, path in files.items():
        args += [f"--{name}", str(path)]
    for extra, asked in ((["--max-tokens", "8"], [8] * 5), (["--max-tokens", "8"], []),
                         (["--max-tokens", "16"], [16] * 5),
                         # greedy: the temperature changes nothing, nothing is asked again
                         (["--max-tokens", "16", "--temperature", "0.7"], [])):  # fmt: skip
        limits.clear()
        assert cli.main([*args, *extra]) == 0
        assert limits == asked, extra


def test_a_judge_down_on_every_try_stops_the_run_and_resume_goes_on(
    tmp_path, write_jsonl, scripted_judge, capsys
):
    files = _bench(tmp_path, write_jsonl)
    server = scripted_judge({}, default=503)
    out = tmp_path / "out"
    assert cli.main(_args(files, server.url, out, "--no-resume")) == 2
    err = capsys.readouterr().err
    assert f"0 of 5 answers are kept in {out / 'raw_judgements.jsonl'}" in err
    assert "rerun with --resume" in err
    assert len(server.requests) == 3  # q1's 3 tries, then the run stops: not 5 x 3
    assert len((out / "raw_judgements.jsonl").read_text().splitlines()) == 3
    working = scripted_judge({}, default="8 4")
    assert cli.main(_args(files, working.url, out)) == 0
    assert len(working.requests) == 5
    assert json.loads((out / "report.json").read_text())["relative"]["all"] == 50.0


def test_all_judgements_failing_exits_1_and_says_why(tmp_path, write_jsonl, scripted_judge, capsys):
    files = _bench(tmp_path, write_jsonl)
    server = scripted_judge({}, default="no scores here")
    assert cli.main(_args(files, server.url, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "5 of 5 judgements failed" in err and "unparsable scores" in err


@pytest.mark.parametrize(
    ("target", "rows", "message"),
    [
        ("answers", [{"question_id": "q1", "text": "x"}, {"question_id": "q9", "text": "y"}],
         r"does not match the questions; missing ids: q2, q3, q4, q5; ids not in the questions: q9"),
        ("reference", [{"question_id": "q1", "text": "x"}, {"question_id": "q1", "text": "y"}],
         r"duplicate question_ids: q1"),
        ("questions", [{"question_id": "q1", "image": "zzz.jpg", "text": "?", "category": "conv"}],
         r"no entry for the images of question ids q1"),
        ("questions", [{"question_id": "q1", "image": "a.jpg", "text": "?", "category": "chat"}],
         r"unknown category for question ids q1"),
        ("context", [{"image": "a.jpg", "captions": 3}, {"image": "b.jpg", "caption": "x"}],
         r"image a.jpg needs `caption`"),
        ("context", [{"image": "a.jpg", "caption": "x", "instances": [{"category": "dog", "bbox": [0, 0, 1]}]},
                     {"image": "b.jpg", "caption": "x"}], r"image a.jpg has a malformed instance"),
        ("context", [{"image": "a.jpg", "caption": "x", "instances": 5},
                     {"image": "b.jpg", "caption": "x"}], r"image a.jpg: `instances` must be a list"),
        ("questions", [{"question_id": "q1", "image": "a.jpg", "text": "?", "category": ["conv"]}],
         r"unknown category for question ids q1"),
    ],
)  # fmt: skip
def test_bad_input_names_ids(tmp_path, write_jsonl, target, rows, message):
    files = _bench(tmp_path, write_jsonl)
    write_jsonl(files[target], rows)
    with pytest.raises(DataError, match=message):
        judge.load_bench(**files)


def test_empty_and_malformed_files(tmp_path, write_jsonl, capsys):
    files = _bench(tmp_path, write_jsonl)
    files["answers"].write_text("")
    with pytest.raises(DataError, match="answers file is empty"):
        judge.load_bench(**files)
    files["answers"].write_text('{"question_id": "q1", "text": "x"}\n{oops\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2 \(not JSON\), line 3 \(not an object\)"):
        judge.load_bench(**files)
    rc = cli.main(_args(files, "http://127.0.0.1:9/v1", tmp_path / "o"))
    assert rc == 2
    assert "malformed lines: line 2 (not JSON)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-tokens", "0", "must be at least 1, got 0"),
        ("--timeout", "0", "must be above 0 and finite, got 0.0"),
        ("--backoff", "-1", "must be at least 0 and finite, got -1.0"),
        ("--http-retries", "-1", "must be at least 0, got -1"),
        ("--retries", "-1", "must be at least 0, got -1"),
        ("--temperature", "nan", "must be at least 0 and finite, got nan"),
        ("--base-url", "localhost:8000/v1", "must start with http:// or https://, got 'local"),
    ],
)
@pytest.mark.parametrize("command", ["judge", "build", "scienceqa"])
def test_bad_endpoint_flags_are_one_line_not_a_traceback(command, flag, value, message, capsys):
    """Each subcommand with a judge or teacher: a bad value is named before any work (a
    negative --retries used to ask nothing and fail every question). scienceqa's judge flags
    carry `judge-` (its --temperature is the answering model's); argparse names the new
    flag and its old name."""
    named = flag
    if command == "scienceqa":
        flag = "--judge-" + flag[2:]
        old = named not in ("--base-url", "--temperature")
        named = f"{flag}/{named}" if old else flag
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", command, flag, value])
    assert exit_.value.code == 2
    assert f"argument {named}: {message}" in capsys.readouterr().err


def test_local_judge_failure_is_reported(tiny_llm_dir):
    """A local HF judge (a tiny random LM: its text never holds two scores) plugs into the
    same loop, and what it cannot score is reported as a failure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = judge.LocalJudge(tiny_llm_dir, max_new_tokens=6)
    item = judge.BenchItem("q1", "detail", "Describe it.", "A cat.", "A cat sits.", "A dog.")
    messages = judge.judge_messages(item, "Rate both.")
    text = local.complete(messages)
    # the reply is only the continuation, decoded: the same as generating by hand
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)  # fmt: skip
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert text == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    local.model.config.max_position_embeddings = 4096  # the rubric outgrows the tiny LM's 512
    (j,) = judge.run_judge([item], local.complete, repeats=1, retries=1)
    assert j.scores is None and j.attempts == 2 and "unparsable" in j.reason
    # the reply stops at the judge's context; a prompt that fills it fails that question
    prompt = ids["input_ids"].shape[1]
    local.model.config.max_position_embeddings = prompt + 2
    assert len(tok(local.complete(messages), add_special_tokens=False)["input_ids"]) <= 2
    local.model.config.max_position_embeddings = prompt
    (j,) = judge.run_judge([item], local.complete, repeats=1, retries=0)
    assert j.scores is None
    assert re.fullmatch(
        rf"request failed: the prompt is \d+ tokens, the judge reads {prompt}", j.reason
    )


def test_a_local_judge_folder_is_checked_and_never_unpickled(tiny_llm_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from vistune.errors import ModelDirError

    with pytest.raises(ModelDirError, match="judge directory not found"):
        judge.LocalJudge(tmp_path / "nope")
    pickled = shutil.copytree(tiny_llm_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"pickle \.bin files are never loaded"):
        judge.LocalJudge(pickled)
    bare = shutil.copytree(tiny_llm_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="has no chat template"):
        judge.LocalJudge(bare)


def test_a_judge_down_stops_every_worker(tmp_path, write_jsonl, scripted_judge, capsys):
    files = _bench(tmp_path, write_jsonl)
    server = scripted_judge({}, default=503)
    out = tmp_path / "out"
    assert cli.main(_args(files, server.url, out, "--workers", "2")) == 2
    assert "0 of 5 answers are kept" in capsys.readouterr().err
    # at most the two questions in flight when the judge was found down are tried (2 x 3),
    # not every question (5 x 3)
    assert len(server.requests) <= 6

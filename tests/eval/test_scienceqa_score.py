"""ScienceQA scoring (Table 7 columns), prediction parsing and the two ensembles (§5.2).

The fixture's 10 test problems (conftest.SQA_TEST) with our predictions below:

pid subject hint image grade answer  prediction               parsed  right  columns
1   NAT     -    img   3     A       "The answer is A."       A       yes    NAT IMG G1-6
2   NAT     yes  img   8     B       "B"                      B       yes    NAT TXT IMG G7-12
3   NAT     -    -     5     C       "A. Because ..."         A       no     NAT NO G1-6
4   SOC     yes  -     4     A       "... The answer is (A)"  A       yes    SOC TXT G1-6
5   SOC     -    img   10    B       "I am not sure"          -       no     SOC IMG G7-12
6   SOC     -    -     7     B       "Lecture ... is B."      B       yes    SOC NO G7-12
7   LAN     yes  -     2     A       "The answer is C." (2 ch) -      no     LAN TXT G1-6
8   LAN     -    -     6     B       "B."                     B       yes    LAN NO G1-6
9   LAN     yes  img   12    D       "D"                      D       yes    LAN TXT IMG G7-12
10  NAT     -    -     9     A       "b" (lower case)         -       no     NAT NO G7-12
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from vistune import cli
from vistune.chat_client import EndpointDownError
from vistune.data.scienceqa import load_scienceqa
from vistune.errors import DataError
from vistune.eval import scienceqa as sqa

OURS = {
    "1": "The answer is A.",
    "2": "B",
    "3": "A. Because it is the first.",
    "4": "Some reasoning. The answer is (A)",
    "5": "I am not sure",
    "6": "Lecture 6. Solution 6. The answer is B.",
    "7": "The answer is C.",
    "8": "B.",
    "9": "D",
    "10": "b",
}
# The other model (the paper's text-only GPT-4): right on 2, 3, 5, 7, 10; no answer on 4, 6, 9.
OTHER = {
    "1": "The answer is B.",
    "2": "B",
    "3": "The answer is C.",
    "4": "There is insufficient context to answer.",
    "5": "The answer is B.",
    "6": "no idea",
    "7": "A",
    "8": "A",
    "9": "I cannot see the image.",
    "10": "A",
}


@pytest.fixture
def problems(sqa_files):
    return load_scienceqa(*sqa_files, "test")


@pytest.mark.parametrize(
    ("text", "n", "want"),
    [
        ("B", 2, "B"),
        ("  C \n", 3, "C"),
        ("A. Because", 2, "A"),
        ("A.", 2, "A"),
        ("The answer is D.", 4, "D"),
        ("The answer is B", 2, "B"),
        ("The answer is (B).", 2, "B"),
        ("First The answer is A. then The answer is B.", 2, "B"),
        ("LECTURE: x\nThe answer is C.", 3, "C"),
        ("The answer is C.", 2, None),  # not one of the 2 options
        ("b", 2, None),
        ("I think B", 2, None),
        ("A.5 is the value", 2, None),
        ("", 2, None),
    ],
)
def test_parse_answer(text, n, want):
    assert sqa.parse_answer(text, n) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Reasoning step by step.\nThe answer is C.", "C"),
        ("Final answer: A", "A"),
        ("Final answer: (B).", "B"),
        ("My answer is D", "D"),
        ("Answer: Both assistants are wrong here.", None),  # not B: no letter given
        ("The best answer: Clearly neither.", None),  # not C
        ("I cannot tell.", None),
    ],
)
def test_parse_judge_letter(text, want):
    assert sqa.parse_judge_letter(text, 4) == want


def test_score_by_table7_columns(problems):
    result = sqa.score(problems, sqa.parse_all(problems, OURS))
    acc = result.accuracy
    # right: 1, 2, 4, 6, 8, 9 -> 6 / 10
    assert acc["average"] == pytest.approx(60.0)
    assert acc["NAT"] == pytest.approx(50.0)  # 1, 2, 3, 10 -> 1, 2 right: 2/4
    assert acc["SOC"] == pytest.approx(200 / 3)  # 4, 5, 6 -> 4, 6: 2/3
    assert acc["LAN"] == pytest.approx(200 / 3)  # 7, 8, 9 -> 8, 9: 2/3
    assert acc["TXT"] == pytest.approx(75.0)  # hint: 2, 4, 7, 9 -> 2, 4, 9: 3/4
    assert acc["IMG"] == pytest.approx(75.0)  # image: 1, 2, 5, 9 -> 1, 2, 9: 3/4
    assert acc["NO"] == pytest.approx(50.0)  # neither: 3, 6, 8, 10 -> 6, 8: 2/4
    assert acc["G1-6"] == pytest.approx(60.0)  # 1, 3, 4, 7, 8 -> 1, 4, 8: 3/5
    assert acc["G7-12"] == pytest.approx(60.0)  # 2, 5, 6, 9, 10 -> 2, 6, 9: 3/5
    # 2 and 9 have both a hint and an image: counted in TXT and in IMG (official scorer)
    assert result.counts == {
        "NAT": 4, "SOC": 3, "LAN": 3, "TXT": 4, "IMG": 4, "NO": 4,
        "G1-6": 5, "G7-12": 5, "average": 10,
    }  # fmt: skip
    assert (result.correct, result.total) == (6, 10)
    assert result.unparsed == ["5", "7", "10"]


def test_empty_column_is_none(problems):
    only_lan = [p for p in problems if p.subject == "language science"]
    acc = sqa.score(only_lan, {"7": "A", "8": "A", "9": "D"}).accuracy
    assert acc["NAT"] is None and acc["SOC"] is None
    assert acc["LAN"] == pytest.approx(200 / 3)  # 7 and 9 right of 7, 8, 9


def test_complement(problems):
    ours = sqa.parse_all(problems, OURS)
    other = sqa.parse_all(problems, OTHER)
    assert sqa.score(problems, other).accuracy["average"] == pytest.approx(50.0)
    letters = sqa.complement(problems, ours, other)
    # other's letter except 4, 6, 9 (no answer) where ours (A, B, D, all right) is used;
    # wrong: 1 (other says B) and 8 (other says A) -> 8 / 10
    assert letters["4"] == "A" and letters["6"] == "B" and letters["9"] == "D"
    assert letters["1"] == "B"
    assert sqa.score(problems, letters).accuracy["average"] == pytest.approx(80.0)


def test_judge_ensemble(problems, scripted_judge):
    from vistune.chat_client import ChatClient, ClientConfig

    server = scripted_judge(
        {
            "item 1?": ["The answer is A."],
            "item 3?": ["Reasoning. The answer is C."],
            "item 4?": ["The answer is A."],
            "item 5?": [500, "The answer is B."],  # failed request, asked again
            "item 6?": ["I cannot decide.", "Both could be right.", "Unsure."],  # gives up
            "item 7?": ["The answer is A."],
            "item 8?": ["The answer is A."],  # the judge is wrong here
            "item 9?": ["The answer is D."],
            "item 10?": ["Final answer: A"],
        },
        default="unexpected request",
    )
    client = ChatClient(ClientConfig(server.url, "judge", http_retries=0, backoff=0.0))
    result = sqa.judge_ensemble(problems, OURS, OTHER, client.complete, retries=2)
    # answers differ everywhere but pid 2 (both B)
    assert result.asked == ["1", "3", "4", "5", "6", "7", "8", "9", "10"]
    assert server.asked("item 2?") == 0
    assert server.asked("item 5?") == 2 and server.asked("item 6?") == 3
    assert result.failures == ["6"]  # judge failed 3 times -> ours (B, right) kept, and listed
    assert result.letters["6"] == "B"
    down = scripted_judge({}, default=503)
    client = ChatClient(ClientConfig(down.url, "judge", http_retries=0, backoff=0.0))
    with pytest.raises(EndpointDownError):  # not nine answers kept by default, silently
        sqa.judge_ensemble(problems, OURS, OTHER, client.complete, retries=2)
    assert len(down.requests) == 3  # the first question's three tries
    # right everywhere except 8 -> 9 / 10
    assert sqa.score(problems, result.letters).accuracy["average"] == pytest.approx(90.0)
    # both full outputs reach the judge
    first = server.requests[0]["messages"][-1]["content"]
    assert OURS["1"] in first and OTHER["1"] in first and "(A) choice 1-0" in first


def test_twin_problems_keep_their_own_judge_replies(problems, tmp_path):
    """ScienceQA repeats questions: two problems with the same text and the same two
    outputs send the judge the same messages; a resumed run keeps each one's reply."""
    from vistune.eval.journal import appender

    twin = dataclasses.replace(problems[0], pid="twin")
    pair = [problems[0], twin]
    ours, other = {"1": OURS["1"], "twin": OURS["1"]}, {"1": OTHER["1"], "twin": OTHER["1"]}
    replies = iter(["The answer is A.", "The answer is B."])  # a judge that samples
    path = tmp_path / "raw_judgements.jsonl"
    with appender(path) as log:
        whole = sqa.judge_ensemble(pair, ours, other, lambda m: next(replies), 0, log)
    assert whole.letters == {"1": "A", "twin": "B"}

    def unreachable(messages):
        raise AssertionError("asked again")

    again = sqa.judge_ensemble(pair, ours, other, unreachable, 0, done=sqa.kept_replies(path))
    assert again.letters == whole.letters


def _run(args):
    return cli.main(["eval", "scienceqa", *args])


def test_cli_writes_report(sqa_files, tmp_path, write_jsonl, capsys):
    preds = write_jsonl(
        tmp_path / "p.jsonl", [{"question_id": k, "text": v} for k, v in OURS.items()]
    )
    out = tmp_path / "out"
    args = ["--problems", str(sqa_files[0]), "--splits", str(sqa_files[1]), "--split", "test"]
    assert _run([*args, "--predictions", str(preds), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["average"] == pytest.approx(60.0)
    assert report["accuracy"]["TXT"] == pytest.approx(75.0)
    assert set(report["accuracy"]) == set(sqa.COLUMNS)
    assert report["ours"]["unparsed"] == {"count": 3, "question_ids": ["5", "7", "10"]}
    config = json.loads((out / "config.json").read_text())
    assert config["split"] == "test" and config["predictions"] == str(preds)
    assert (
        "| ours | 50.00 | 66.67 | 66.67 | 75.00 | 75.00 | 50.00 | 60.00 | 60.00 | 60.00 |"
        in (out / "report.md").read_text()
    )
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "Unparsed predictions (counted wrong): 3 (5, 7, 10)" in capsys.readouterr().out


def test_cli_complement(sqa_files, tmp_path, write_jsonl):
    ours = write_jsonl(
        tmp_path / "o.jsonl", [{"question_id": k, "text": v} for k, v in OURS.items()]
    )
    other = write_jsonl(
        tmp_path / "g.jsonl", [{"question_id": k, "text": v} for k, v in OTHER.items()]
    )
    out = tmp_path / "out"
    rc = _run(
        ["--problems", str(sqa_files[0]), "--splits", str(sqa_files[1]), "--predictions",
         str(ours), "--ensemble", "complement", "--other", str(other), "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["ours"]["accuracy"]["average"] == pytest.approx(60.0)
    assert report["other"]["accuracy"]["average"] == pytest.approx(50.0)
    assert report["average"] == pytest.approx(80.0)


def test_predictions_must_match_split(sqa_files, tmp_path, write_jsonl, problems):
    rows = [{"question_id": k, "text": v} for k, v in OURS.items() if k not in ("3", "7")]
    rows.append({"question_id": "99", "text": "A"})
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"missing ids: 3, 7; ids not in the questions: 99"):
        sqa.read_predictions(path, problems)


def test_duplicate_and_malformed_predictions(tmp_path, problems, capsys, sqa_files):
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"question_id": "1", "text": "A"}\n{"question_id": "1", "text": "B"}\n')
    with pytest.raises(DataError, match=r"duplicate question_ids: 1"):
        sqa.read_predictions(dup, problems)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "1", "text": "A"}\nnot json\n\n{"question_id": "2"}\n')
    with pytest.raises(DataError, match=r"line 2 \(not JSON\), line 4 \(missing text\)"):
        sqa.read_predictions(bad, problems)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc = _run(["--problems", str(sqa_files[0]), "--splits", str(sqa_files[1]), "--predictions",
               str(empty), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2
    assert f"predictions file is empty: {empty}" in capsys.readouterr().err


def test_cli_judge_ensemble(sqa_files, tmp_path, write_jsonl, scripted_judge):
    ours = write_jsonl(
        tmp_path / "o.jsonl", [{"question_id": k, "text": v} for k, v in OURS.items()]
    )
    other = write_jsonl(
        tmp_path / "g.jsonl", [{"question_id": k, "text": v} for k, v in OTHER.items()]
    )
    # the judge always backs the other model, except on 6 where it never gives a letter
    script = {f"item {pid}?": [f"The answer is {sqa.parse_answer(OTHER[pid], 4)}."]
              for pid in ("1", "3", "5", "7", "8", "10")}  # fmt: skip
    script |= {f"item {pid}?": ["Hmm."] * 2 for pid in ("4", "6", "9")}
    server = scripted_judge(script, default="unexpected request")
    out = tmp_path / "out"
    rc = _run(
        ["--problems", str(sqa_files[0]), "--splits", str(sqa_files[1]), "--predictions",
         str(ours), "--ensemble", "judge", "--other", str(other), "--out", str(out),
         "--judge-base-url", server.url, "--judge-model", "j", "--http-retries", "0",
         "--backoff", "0", "--retries", "1"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    # judged: other's letter on 1 (wrong), 3, 5, 7, 8 (wrong), 10; 4, 6, 9 keep ours (right);
    # 2 agreed (right) -> right on 2, 3, 4, 5, 6, 7, 9, 10 = 8 / 10
    assert report["average"] == pytest.approx(80.0)
    assert report["judge"]["failures"] == {"count": 3, "question_ids": ["4", "6", "9"]}
    assert (
        "Judge failures (our answer kept in the ensemble): 3 (4, 6, 9)"
        in (out / "report.md").read_text()
    )
    raw = [json.loads(x) for x in (out / "raw_judgements.jsonl").read_text().splitlines()]
    assert len(raw) == 6 + 3 * 2  # every attempt kept


# The judge's letter per pid where the two models differ (every one of the nine parses)
JUDGED = {"1": "A", "3": "C", "4": "A", "5": "B", "6": "C", "7": "A", "8": "A", "9": "D", "10": "A"}


def _judge_script(pids=tuple(JUDGED)):
    return {f"item {pid}?": [f"The answer is {JUDGED[pid]}."] for pid in pids}


def _ensemble(sqa_files, tmp_path, write_jsonl, out, url, *extra, other=OTHER):
    ours = write_jsonl(
        tmp_path / "o.jsonl", [{"question_id": k, "text": v} for k, v in OURS.items()]
    )
    other = write_jsonl(
        tmp_path / "g.jsonl", [{"question_id": k, "text": v} for k, v in other.items()]
    )
    return _run(
        ["--problems", str(sqa_files[0]), "--splits", str(sqa_files[1]), "--predictions",
         str(ours), "--ensemble", "judge", "--other", str(other), "--out", str(out),
         "--judge-base-url", url, "--judge-model", "j", "--http-retries", "0", "--backoff",
         "0", "--retries", "1", *extra]
    )  # fmt: skip


def test_a_judge_ensemble_stopped_by_a_dead_judge_resumes_asking_only_the_rest(
    sqa_files, tmp_path, write_jsonl, scripted_judge, capsys
):
    whole = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, tmp_path / "whole", whole.url) == 0
    assert len(whole.requests) == 9
    out = tmp_path / "out"
    dying = scripted_judge(_judge_script(), default="unexpected request", dies_after=4)
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, dying.url) == 2
    err = capsys.readouterr().err
    assert f"4 of 9 answers are kept in {out / 'raw_judgements.jsonl'}" in err
    assert "rerun with --resume" in err
    assert len(dying.requests) == 4 + 2  # pid 5's two tries, then the run stops
    assert not (out / "report.json").exists()
    working = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, working.url) == 0
    # answered before the judge died: 1, 3, 4, 5; asked now: the other five, once each
    assert [working.asked(f"item {pid}?") for pid in JUDGED] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    for name in ("report.json", "report.md"):
        assert (out / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    report = json.loads((out / "report.json").read_text())
    assert report["judge"]["asked"] == list(JUDGED) and report["judge"]["failures"]["count"] == 0
    # wrong on 6 and 8 only (the judge says C and A; both are B) -> 8 / 10
    assert report["average"] == pytest.approx(80.0)


def test_a_judge_ensemble_resumes_past_a_torn_line_and_asks_failures_again(
    sqa_files, tmp_path, write_jsonl, scripted_judge
):
    out = tmp_path / "out"
    script = _judge_script() | {"item 6?": ["Hmm.", "Unsure."]}  # pid 6 fails both tries
    first = scripted_judge(script, default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, first.url) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["judge"]["failures"]["question_ids"] == ["6"]
    with (out / "raw_judgements.jsonl").open("ab") as raw:  # killed mid-write: a torn line
        raw.write(b'{"question_id": "7", "prompt_key": "0123", "content": "caf\xc3')
    second = scripted_judge(_judge_script(["6"]), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, second.url) == 0
    assert len(second.requests) == 1 and second.asked("item 6?") == 1
    down = scripted_judge({}, default=503)
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, down.url) == 0
    assert down.requests == []  # 6's answer was kept on a line of its own
    report = json.loads((out / "report.json").read_text())
    assert report["judge"]["failures"]["count"] == 0
    assert report["ensemble"]["parsed"]["6"] == "C"  # the judge's letter now, not ours (B)


def test_a_judge_ensemble_asks_again_when_the_requests_change(
    sqa_files, tmp_path, write_jsonl, scripted_judge
):
    out = tmp_path / "out"
    first = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, first.url) == 0
    for extra in (["--judge-model", "j2"], ["--judge-temperature", "0.7"], ["--max-tokens", "2048"],
                  ["--judge-max-tokens", "4096"], ["--no-resume"]):  # fmt: skip
        server = scripted_judge(_judge_script(), default="unexpected request")
        assert _ensemble(sqa_files, tmp_path, write_jsonl, out, server.url, *extra) == 0
        assert len(server.requests) == 9, extra  # another judge (or a fresh start)
    raw = [json.loads(x) for x in (out / "raw_judgements.jsonl").read_text().splitlines()]
    assert len(raw) == 9  # --no-resume started the file afresh
    # the other model's text changes on pid 3 (same letter): only that request is new
    changed = OTHER | {"3": "Clearly the answer is C."}
    server = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, server.url, other=changed) == 0
    assert len(server.requests) == 1 and server.asked("item 3?") == 1


def test_a_judge_ensemble_says_how_many_kept_replies_are_not_reused(
    sqa_files, tmp_path, write_jsonl, scripted_judge, capsys
):
    out = tmp_path / "out"
    first = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, first.url) == 0
    assert "not reused" not in capsys.readouterr().err
    server = scripted_judge(_judge_script(), default="unexpected request")
    assert _ensemble(sqa_files, tmp_path, write_jsonl, out, server.url, "--max-tokens", "2048") == 0
    raw = out / "raw_judgements.jsonl"
    assert f"9 replies kept in {raw} are not reused" in capsys.readouterr().err
    assert len(server.requests) == 9

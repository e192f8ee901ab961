"""ScienceQA scoring and two-model ensembling (paper §5.2, Table 7).

Parsing a prediction (LLaVA's eval_science_qa.py rules, case-sensitive), in order:
1. the whole text (stripped) is a bare letter, e.g. "B";
2. it starts with a letter and a period, e.g. "B. Because ..." or "B.";
3. it contains "The answer is X" (last occurrence; brackets "(X)" allowed).
The letter must be one of the problem's options; anything else is unparsed, counted wrong
and listed in the report.

Columns follow the official scorer (lupantech/ScienceQA tools/evaluate_acc.py):
NAT/SOC/LAN by `subject`; TXT = the hint is non-empty, IMG = there is an image,
NO = neither. A problem with both a hint and an image counts in TXT *and* IMG (so
TXT + IMG + NO can exceed the total). G1-6 / G7-12 by `grade`. `average` is over all
problems. A column with no problems is None (the official script would divide by zero).

Ensembling (§5.2): `complement` keeps the other model's answer and uses ours only where
the other gives no parsable answer; `judge` asks a judge model for the final answer
wherever the two parsed answers differ (including where one is unparsed). Its replies are
logged as they arrive, and one that gave a letter is reused by a rerun that would send the
same judge the same messages (vistune.eval.journal).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vistune.data.records import read_journal, read_jsonl
from vistune.data.scienceqa import OPTIONS, SUBJECTS, ScienceQAProblem, build_question
from vistune.eval.ask import Try, Unusable, ask
from vistune.eval.journal import prompt_key
from vistune.eval.report import check_same_ids, index_by

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "average")
_PREFIX = re.compile(r"^([A-E])\.(?:\s|$)")
_ANSWER_IS = re.compile(r"The answer is \(?([A-E])\)?")
# the letter must stand alone: "Answer: Both are wrong" gives no letter, not B
_JUDGE_LETTER = re.compile(r"\b(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*\(?([A-E])\b\)?")


def parse_answer(text: str, n_choices: int) -> str | None:
    """The option letter a prediction gives, or None (rules in the module docstring)."""
    valid = OPTIONS[:n_choices]
    flat = text.strip().replace("\n", ". ")
    letter: str | None = None
    if len(flat) == 1 and flat in OPTIONS:
        letter = flat
    elif m := _PREFIX.match(flat):
        letter = m.group(1)
    else:
        found = _ANSWER_IS.findall(flat)
        letter = found[-1] if found else None
    return letter if letter is not None and letter in valid else None


def column_memberships(p: ScienceQAProblem) -> list[str]:
    """The Table 7 columns (besides `average`) this problem counts in."""
    cols = []
    if p.subject in SUBJECTS:
        cols.append(SUBJECTS[p.subject])
    if p.has_text:
        cols.append("TXT")
    if p.has_image:
        cols.append("IMG")
    if p.no_context:
        cols.append("NO")
    grade = p.grade_number
    if grade is not None:
        cols.append("G1-6" if grade <= 6 else "G7-12")
    return cols


@dataclass(frozen=True)
class ScienceQAScore:
    accuracy: dict[str, float | None]
    """Column -> accuracy in percent (COLUMNS order), None for an empty column."""
    counts: dict[str, int]
    """Column -> number of problems in it."""
    correct: int
    total: int
    unparsed: list[str] = field(default_factory=list)
    """pids whose prediction gave no valid letter (counted wrong)."""
    parsed: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "counts": self.counts,
            "correct": self.correct,
            "total": self.total,
            "unparsed": {"count": len(self.unparsed), "question_ids": self.unparsed},
            "parsed": self.parsed,
        }


def score(problems: Sequence[ScienceQAProblem], letters: dict[str, str | None]) -> ScienceQAScore:
    """Accuracy per Table 7 column from parsed letters (pid -> letter or None)."""
    hits = {c: 0 for c in COLUMNS}
    counts = {c: 0 for c in COLUMNS}
    for p in problems:
        right = letters.get(p.pid) == p.answer_letter
        for col in [*column_memberships(p), "average"]:
            counts[col] += 1
            hits[col] += int(right)
    accuracy = {c: (100.0 * hits[c] / counts[c] if counts[c] else None) for c in COLUMNS}
    unparsed = [p.pid for p in problems if letters.get(p.pid) is None]
    return ScienceQAScore(
        accuracy,
        counts,
        hits["average"],
        counts["average"],
        unparsed,
        {p.pid: letters.get(p.pid) for p in problems},
    )


def parse_all(problems: Sequence[ScienceQAProblem], texts: dict[str, str]) -> dict[str, str | None]:
    return {p.pid: parse_answer(texts[p.pid], len(p.choices)) for p in problems}


def read_predictions(path: str | Path, problems: Sequence[ScienceQAProblem]) -> dict[str, str]:
    """pid -> text from a JSONL of {question_id, text}; ids must match the split exactly."""
    rows = read_jsonl(path, "predictions", required=("question_id", "text"))
    by_id = index_by(rows, "question_id", "predictions", path)
    check_same_ids([p.pid for p in problems], by_id, "predictions", path)
    return {k: str(v["text"]) for k, v in by_id.items()}


def complement(
    problems: Sequence[ScienceQAProblem], ours: dict[str, str | None], other: dict[str, str | None]
) -> dict[str, str | None]:
    """The other model's letter, ours where the other gave none (paper: GPT-4 complement)."""
    return {p.pid: other[p.pid] if other[p.pid] is not None else ours[p.pid] for p in problems}


def load_judge_prompt() -> str:
    return (
        resources.files("vistune.eval")
        .joinpath("rubrics/scienceqa_judge.txt")
        .read_text(encoding="utf-8")
    )


def judge_messages(p: ScienceQAProblem, answer_1: str, answer_2: str, prompt: str) -> list[dict]:
    """The judge request: the question and both models' full outputs, then the instructions."""
    content = (
        f"[Question]\n{build_question(p)}\n\n"
        f"[Assistant 1]\n{answer_1}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer_2}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{prompt}\n"
    )
    return [
        {"role": "system", "content": "You are a careful expert in science questions."},
        {"role": "user", "content": content},
    ]


def parse_judge_letter(text: str, n_choices: int) -> str | None:
    """The judge's final letter: the ScienceQA rules, then "answer: X"-style phrasing."""
    letter = parse_answer(text, n_choices)
    if letter is None:
        found = _JUDGE_LETTER.findall(text)
        letter = found[-1] if found else None
    return letter if letter is not None and letter in OPTIONS[:n_choices] else None


def judge_requests(
    problems: Sequence[ScienceQAProblem], ours_text: dict[str, str], other_text: dict[str, str]
) -> dict[str, list[dict]]:
    """pid -> the judge's messages, for the problems whose two parsed answers differ."""
    prompt = load_judge_prompt()
    ours = parse_all(problems, ours_text)
    other = parse_all(problems, other_text)
    return {
        p.pid: judge_messages(p, ours_text[p.pid], other_text[p.pid], prompt)
        for p in problems
        if ours[p.pid] != other[p.pid]
    }


@dataclass
class JudgeEnsemble:
    letters: dict[str, str | None]
    asked: list[str]
    """pids where the two models differed and the judge was asked (now or in a run whose
    replies were kept)."""
    failures: list[str]
    """pids where the judge gave no letter after all tries (our answer kept)."""


def judge_ensemble(
    problems: Sequence[ScienceQAProblem],
    ours_text: dict[str, str],
    other_text: dict[str, str],
    complete: Callable[[list[dict]], str],
    retries: int = 2,
    log: Callable[[dict], None] | None = None,
    done: dict[tuple[str, str], str] | None = None,
    judge_id: str = "",
) -> JudgeEnsemble:
    """Where the parsed answers differ, ask `complete` (a judge model) for the final letter.

    Ours is Assistant 1, the other model Assistant 2. A judge that fails (endpoint error
    or no letter) `retries + 1` times keeps our answer and is listed in `failures`; one
    down on its last try (EndpointDownError) stops the ensemble with that error. Every
    reply or error goes to `log` as it arrives; `done` holds replies kept by an earlier run
    (`kept_replies`), used without asking when they give a letter.
    """
    ours = parse_all(problems, ours_text)
    requests = judge_requests(problems, ours_text, other_text)
    done = done or {}
    letters: dict[str, str | None] = {}
    asked, failures = [], []
    for p in problems:
        if p.pid not in requests:  # both gave the same letter (or none)
            letters[p.pid] = ours[p.pid]
            continue
        asked.append(p.pid)
        messages = requests[p.pid]
        key = prompt_key(messages, judge_id)
        kept = done.get((p.pid, key))
        letter = parse_judge_letter(kept, len(p.choices)) if kept is not None else None
        if letter is None:
            letter = _ask_judge(p, messages, key, complete, retries, log)
        if letter is None:
            failures.append(p.pid)
            letter = ours[p.pid]
        letters[p.pid] = letter
    return JudgeEnsemble(letters, asked, failures)


def _ask_judge(
    p: ScienceQAProblem,
    messages: list[dict],
    key: str,
    complete: Callable[[list[dict]], str],
    retries: int,
    log: Callable[[dict], None] | None,
) -> str | None:
    """The judge's letter for one problem in at most `retries + 1` requests, else None."""

    def parse(reply: str) -> str:
        letter = parse_judge_letter(reply, len(p.choices))
        if letter is None:
            raise Unusable("no letter")
        return letter

    def record(tried: Try[str]) -> None:
        entry = {"question_id": p.pid, "attempt": tried.attempt, "prompt_key": key}
        if log is None:
            return
        if tried.content is None:
            log({**entry, "error": str(tried.error)})
        else:
            log({**entry, "content": tried.content, "letter": tried.value})

    return ask(lambda: complete(messages), parse, retries, record).value


def kept_replies(path: str | Path) -> dict[tuple[str, str], str]:
    """(pid, prompt key) -> a judge reply that gave a letter, from an earlier
    raw_judgements.jsonl. Keyed by pid too: ScienceQA repeats questions, so two problems
    can send the same messages, and each keeps its own reply as in an uninterrupted run."""
    return {
        (str(r["question_id"]), str(r["prompt_key"])): r["content"]
        for r in read_journal(path)
        if "prompt_key" in r
        and "question_id" in r
        and r.get("letter")
        and isinstance(r.get("content"), str)
    }


ENSEMBLES = ("complement", "judge")

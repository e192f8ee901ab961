"""LLaVA-Bench judging: relative scores of a candidate against a reference (paper §5.1,
Tables 4-5; LLaVA's eval_gpt_review_visual.py and summarize_gpt_review.py).

For each question a text-only judge sees the image context (captions, plus boxes for
COCO-style data), the question, the reference answer (Assistant 1: the text-only teacher
answering from the ground-truth context) and the candidate (Assistant 2), followed by the
rubric of the question's category (rubrics/<category>.txt). Its first line holds the two
1-10 scores. Relative score = mean(candidate) / mean(reference) x 100 over the judged
questions of a category; `all` pools every judged question (as LLaVA's summary does).

No silent failures: a judgement whose request fails or whose first line is not two scores
in 1-10 is asked again (a new request) up to `retries` times, then recorded as a failure
and left out of the means, never scored. With `repeats` K the judge runs K times and the
report gives mean and population standard deviation (ddof=0) of the K relative scores.

File formats (LLaVA-Bench's own): questions {question_id, image, text, category}; context
{image, caption (str) | captions (list), instances?: [{category, bbox: [x1, y1, x2, y2]}]}
(`boxes` is accepted for `instances`); answers and reference {question_id, text, ...}.
"""

from __future__ import annotations

import re
import statistics
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vistune.data.annotations import Box
from vistune.data.formats import RESPONSE_TYPES
from vistune.data.records import read_journal, read_jsonl
from vistune.errors import DataError
from vistune.eval.ask import Try, Unusable, ask
from vistune.eval.journal import prompt_key
from vistune.eval.report import check_same_ids, index_by, list_ids
from vistune.local_chat import LocalChatModel

CATEGORIES = RESPONSE_TYPES
CATEGORY_ALIASES = {
    "conversation": "conversation",
    "conv": "conversation",
    "detail": "detail",
    "complex": "complex",
}
"""Category names in question files -> our names (LLaVA-Bench writes `conv`)."""
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_LABEL = re.compile(r"assistant\s*[12]\s*[:=]?|scores?\s*[:=]?", re.IGNORECASE)

Complete = Callable[[list[dict]], str]


@dataclass(frozen=True)
class BenchItem:
    question_id: str
    category: str
    question: str
    context: str
    """Rendered context: captions, a blank line, then `category: [x1, y1, x2, y2]` lines."""
    reference: str
    candidate: str


@dataclass(frozen=True)
class Judgement:
    """The final outcome of one question in one run (scores None = failure)."""

    repeat: int
    question_id: str
    category: str
    attempts: int
    scores: tuple[float, float] | None
    content: str | None
    reason: str | None = None


def load_rubric(category: str) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    path = resources.files("vistune.eval").joinpath(f"rubrics/{category}.txt")
    return path.read_text(encoding="utf-8").strip()


def render_context(row: dict, path: str | Path) -> str:
    """Captions then boxes, like the teacher's context (vistune.datagen.context)."""
    captions = row.get("captions", row.get("caption"))
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(
            f"context file {path}: image {row.get('image')} needs `caption` "
            "(a string) or `captions` (a list of strings)"
        )
    text = "\n".join(c.strip() for c in captions)
    instances = row.get("instances", row.get("boxes")) or []
    if not isinstance(instances, list):
        raise DataError(
            f"context file {path}: image {row.get('image')}: `instances` must be a list of "
            f"{{category, bbox: [x1, y1, x2, y2]}}, got {instances!r}"
        )
    boxes = []
    for inst in instances:
        try:
            xyxy = tuple(float(v) for v in inst["bbox"])
            if len(xyxy) != 4:
                raise ValueError("bbox needs 4 numbers")
            boxes.append(Box(str(inst["category"]), xyxy))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"context file {path}: image {row.get('image')} has a malformed "
                f"instance {inst!r} (want {{category, bbox: [x1, y1, x2, y2]}})"
            ) from err
    if boxes:
        text += "\n\n" + "\n".join(b.render() for b in boxes)
    return text


def load_bench(
    questions: str | Path, context: str | Path, reference: str | Path, answers: str | Path
) -> list[BenchItem]:
    """Join LLaVA-Bench's four files into judge items, in question-file order.

    DataError (listing the offending ids) for duplicate ids, unknown categories, questions
    whose image has no context, and reference/answer files whose ids differ from the questions.
    """
    q_rows = read_jsonl(questions, "questions", ("question_id", "image", "text", "category"))
    q_by_id = index_by(q_rows, "question_id", "questions", questions)
    bad_cat = [k for k, r in q_by_id.items()
               if not isinstance(r["category"], str) or r["category"] not in CATEGORY_ALIASES]  # fmt: skip
    if bad_cat:
        raise DataError(
            f"questions file {questions}: unknown category for question ids "
            f"{list_ids(bad_cat)}; valid: {', '.join(CATEGORY_ALIASES)}"
        )
    ctx_by_image = index_by(read_jsonl(context, "context", ("image",)), "image", "context", context)
    no_ctx = [k for k, r in q_by_id.items() if str(r["image"]) not in ctx_by_image]
    if no_ctx:
        raise DataError(
            f"context file {context} has no entry for the images of question ids {list_ids(no_ctx)}"
        )
    texts = {}
    for name, path in (("reference", reference), ("answers", answers)):
        by_id = index_by(read_jsonl(path, name, ("question_id", "text")), "question_id", name, path)
        check_same_ids(q_by_id, by_id, name, path)
        texts[name] = {k: str(v["text"]) for k, v in by_id.items()}
    rendered = {img: render_context(row, context) for img, row in ctx_by_image.items()}
    return [
        BenchItem(
            qid,
            CATEGORY_ALIASES[r["category"]],
            str(r["text"]),
            rendered[str(r["image"])],
            texts["reference"][qid],
            texts["answers"][qid],
        )
        for qid, r in q_by_id.items()
    ]


def judge_messages(item: BenchItem, rubric: str) -> list[dict]:
    """The judge request, laid out as in LLaVA's review scripts."""
    content = (
        f"[Context]\n{item.context}\n\n"
        f"[Question]\n{item.question}\n\n"
        f"[Assistant 1]\n{item.reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{item.candidate}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{rubric}\n\n"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores on the first non-blank line ("8 7", "8, 7", "8.5 7", "(8, 7)",
    "Assistant 1: 8, Assistant 2: 7"); None unless exactly two numbers, both in 1-10, and
    unless labels, if any, name Assistant 1 then Assistant 2 (another order is asked again
    rather than guessed)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    labels = re.findall(r"assistant\s*([12])", lines[0], re.IGNORECASE)
    if labels and labels != ["1", "2"]:  # "Assistant 2: 7, Assistant 1: 8": ask again
        return None
    first = _LABEL.sub(" ", lines[0].replace("*", ""))
    nums = _NUMBER.findall(first)
    if len(nums) != 2 or re.search(r"[A-Za-z]", _NUMBER.sub(" ", first)):
        return None
    a, b = float(nums[0]), float(nums[1])
    if not (1 <= a <= 10 and 1 <= b <= 10):
        return None
    return a, b


def judge_one(
    item: BenchItem,
    repeat: int,
    complete: Complete,
    retries: int,
    log: Callable[[dict], None] | None = None,
    judge_id: str = "",
) -> Judgement:
    """Ask until two valid scores come back, at most `retries + 1` requests
    (vistune.eval.ask); every reply (or error) goes to `log`. When the last try finds the
    endpoint down or refusing the key (EndpointDownError, after the client's own retries)
    that error is raised: it would fail every question."""
    messages = judge_messages(item, load_rubric(item.category))
    key = prompt_key(messages, judge_id)

    def parse(content: str) -> tuple[float, float]:
        scores = parse_scores(content)
        if scores is None:
            raise Unusable("unparsable scores: " + repr(content.strip()[:80]))
        return scores

    def record(tried: Try[tuple[float, float]]) -> None:
        if log is not None:
            log({"repeat": repeat, "question_id": item.question_id, "category": item.category,
                 "attempt": tried.attempt, "prompt_key": key, "content": tried.content,
                 "scores": list(tried.value) if tried.value else None,
                 "error": _reason(tried.error)})  # fmt: skip

    outcome = ask(lambda: complete(messages), parse, retries, record)
    return Judgement(repeat, item.question_id, item.category, outcome.attempts, outcome.value,
                     outcome.content, _reason(outcome.error))  # fmt: skip


def _reason(error: Exception | None) -> str | None:
    """A failed try as the journal and the report say it."""
    if error is None or isinstance(error, Unusable):
        return None if error is None else str(error)
    return f"request failed: {error}"


def relative_scores(judgements: Sequence[Judgement]) -> dict[str, dict[str, float | int | None]]:
    """Per category and `all`: judged count, mean reference, mean candidate, relative (%)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for cat in (*CATEGORIES, "all"):
        ok = [j.scores for j in judgements if j.scores and cat in (j.category, "all")]
        ref = statistics.fmean(s[0] for s in ok) if ok else None
        cand = statistics.fmean(s[1] for s in ok) if ok else None
        out[cat] = {
            "judged": len(ok),
            "reference": ref,
            "candidate": cand,
            "relative": 100.0 * cand / ref if ok else None,
        }
    return out


def summarize(items: Sequence[BenchItem], judgements: Sequence[Judgement], repeats: int) -> dict:
    """The report: mean (and std over runs) of relative scores, failures, per-run details."""
    runs = [relative_scores([j for j in judgements if j.repeat == r]) for r in range(repeats)]
    relative: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for cat in (*CATEGORIES, "all"):
        vals = [run[cat]["relative"] for run in runs if run[cat]["relative"] is not None]
        relative[cat] = statistics.fmean(vals) if vals else None
        std[cat] = statistics.pstdev(vals) if len(vals) > 1 else None
    failed = [j for j in judgements if j.scores is None]
    return {
        "relative": relative,
        "std": std,
        "std_kind": "population standard deviation (ddof=0) of the per-run relative scores",
        "repeats": repeats,
        "questions": {cat: sum(i.category == cat for i in items) for cat in CATEGORIES}
        | {"all": len(items)},
        "runs": runs,
        "failures": {
            "count": len(failed),
            "question_ids": sorted({j.question_id for j in failed}),
            "items": [
                {"repeat": j.repeat, "question_id": j.question_id, "reason": j.reason}
                for j in failed
            ],
        },
        "judgements": [asdict(j) for j in judgements],
    }


def run_judge(
    items: Sequence[BenchItem],
    complete: Complete,
    repeats: int = 1,
    retries: int = 2,
    log: Callable[[dict], None] | None = None,
    progress: Callable[[], None] | None = None,
    done: dict[tuple[int, str], Judgement] | None = None,
    judge_id: str = "",
    workers: int = 1,
) -> list[Judgement]:
    """Judge every item `repeats` times, `workers` requests in flight (the client must be
    thread-safe when > 1); `done` holds judgements reused from a previous run. Results are
    in (repeat, item) order whatever order they finish in. A job that raises (the judge
    down) stops the run: only the jobs already in flight finish, no other starts."""
    if repeats < 1 or retries < 0 or workers < 1:
        raise ValueError(f"need repeats >= 1, retries >= 0, workers >= 1; got {repeats}, "
                         f"{retries}, {workers}")  # fmt: skip
    done = done or {}
    lock = threading.Lock()
    stop = threading.Event()  # set by a job that raised: no later job sends a request

    def one(r: int, item: BenchItem) -> Judgement:
        prior = done.get((r, item.question_id))
        if prior is None:
            if stop.is_set():
                raise CancelledError
            try:
                prior = judge_one(item, r, complete, retries, _locked(log, lock), judge_id)
            except BaseException:
                stop.set()
                raise
        if progress is not None:
            with lock:
                progress()
        return prior

    jobs = [(r, item) for r in range(repeats) for item in items]
    if workers == 1:
        return [one(r, item) for r, item in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: one(*job), jobs))


def _locked(log: Callable[[dict], None] | None, lock: threading.Lock):
    if log is None:
        return None

    def write(record: dict) -> None:
        with lock:
            log(record)

    return write


def reusable(
    raw_path: str | Path, items: Sequence[BenchItem], judge_id: str = ""
) -> dict[tuple[int, str], Judgement]:
    """Successful judgements in an earlier raw_judgements.jsonl by the same judge on the
    same prompt (so an interrupted run resumes without asking again)."""
    keys = {
        i.question_id: (
            i.category,
            prompt_key(judge_messages(i, load_rubric(i.category)), judge_id),
        )
        for i in items
    }
    done: dict[tuple[int, str], Judgement] = {}
    for rec in read_journal(raw_path):
        try:
            qid, scores = str(rec["question_id"]), rec.get("scores")
            if scores and qid in keys and rec.get("prompt_key") == keys[qid][1]:
                done[(int(rec["repeat"]), qid)] = Judgement(
                    int(rec["repeat"]),
                    qid,
                    keys[qid][0],
                    int(rec["attempt"]) + 1,
                    (float(scores[0]), float(scores[1])),
                    rec.get("content"),
                )
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return done


class LocalJudge:
    """A judge from a local Hugging Face causal LM directory (its chat template, greedy;
    vistune.local_chat, as datagen's local teacher).

    The folder is checked and loaded when the judge is made (safetensors weights only,
    never a pickle; no custom code), and a problem with it is one ModelDirError; a prompt
    that fills its context fails that question alone (PromptTooLong, a VistuneError)."""

    def __init__(self, model_dir: str | Path, max_new_tokens: int = 256) -> None:
        self.lm = LocalChatModel(model_dir, "judge", max_new_tokens)
        self.lm.load()

    @property
    def model(self) -> Any:
        return self.lm.model

    def complete(self, messages: list[dict]) -> str:
        return self.lm.reply(messages).text

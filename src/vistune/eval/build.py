"""Build a LLaVA-Bench (COCO)-style benchmark from a COCO-layout split (paper §5.1).

The paper samples 30 COCO-Val-2014 images and, with the data generation pipeline of §3,
makes one question of each type (conversation, detailed description, complex reasoning)
per image, 90 in all. The reference answer is the text-only teacher's own answer from the
ground-truth captions and boxes, the "approximate theoretical upper bound" the judge
compares against.

Here the datagen teacher (`rules` offline on the built-in scenes, `openai` for a real
GPT-4-class teacher, `local`) answers the datagen prompts; the first question/answer pair
of its reply becomes the benchmark question and the reference. The output folder holds
LLaVA-Bench's files (formats in docs/EVAL.md):

    questions.jsonl          {question_id, image, text, category: conv|detail|complex}
    context.jsonl            {id, image, captions, instances: [{category, bbox}]}
    answers_reference.jsonl  {question_id, text, answer_id, model_id}
    build.json               teacher, seed, split, images, failed questions
    build_requests.jsonl     every accepted teacher reply as it arrives, keyed by its
                             image and prompt_key (vistune.eval.journal): a rerun
                             reuses them
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vistune.data.annotations import ImageContext
from vistune.data.conversation import IMAGE_PLACEHOLDER
from vistune.data.formats import RESPONSE_TYPES, load_coco
from vistune.data.records import read_journal
from vistune.datagen.context import screen_contexts
from vistune.datagen.messages import build_messages, detail_question
from vistune.datagen.parse import RejectedOutput, parse_response
from vistune.datagen.teachers import Request, Teacher
from vistune.errors import DataError, EndpointError
from vistune.eval.ask import Try, Unusable, ask
from vistune.eval.journal import prompt_key

BENCH_CATEGORY = {"conversation": "conv", "detail": "detail", "complex": "complex"}
"""Our response types -> LLaVA-Bench's category names."""


@dataclass
class Bench:
    questions: list[dict] = field(default_factory=list)
    contexts: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    """{image, category, reason} of questions the teacher could not make."""


def sample_contexts(
    coco_dir: str | Path, split: str, n_images: int, seed: int
) -> list[ImageContext]:
    """`n_images` usable images of the split (image on disk, captions), drawn by seed."""
    contexts, skipped = load_coco(coco_dir, split)
    usable = screen_contexts(contexts, Path(coco_dir), skipped)
    if len(usable) < n_images:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none skipped"
        raise DataError(
            f"{coco_dir} split {split!r} has {len(usable)} usable images, "
            f"{n_images} asked ({reasons})"
        )
    picked = random.Random(f"vistune-bench:{seed}").sample(range(len(usable)), n_images)
    return [usable[i] for i in sorted(picked)]


def context_row(ctx: ImageContext) -> dict:
    """LLaVA-Bench COCO context line: captions and normalised boxes."""
    return {
        "id": ctx.image_id,
        "image": ctx.image,
        "captions": list(ctx.captions),
        "instances": [{"category": b.category, "bbox": [round(v, 4) for v in b.xyxy]}
                      for b in ctx.boxes],
    }  # fmt: skip


def first_pair(rtype: str, text: str, question: str | None) -> tuple[str, str]:
    """The first (question, answer) of a teacher reply, without the image placeholder."""
    turns = parse_response(rtype, text, question)
    human = turns[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    return human, turns[1]["value"].strip()


def _request(rtype: str, ctx: ImageContext, seed: int) -> Request:
    question = detail_question(ctx.image_id, seed) if rtype == "detail" else None
    return Request(rtype, ctx, build_messages(rtype, ctx, question), question)


ReplyKey = tuple[str, str]
"""(image, prompt key). The teacher sees only the annotations, so two images annotated
alike send the same messages; the image keeps their replies apart (as an uninterrupted
run, which asks each image's request)."""


def request_keys(contexts: list[ImageContext], seed: int, teacher_id: str) -> list[ReplyKey]:
    """The key of every request `build_bench` makes (to count what is kept)."""
    return [(ctx.image, prompt_key(_request(rtype, ctx, seed).messages, teacher_id))
            for ctx in contexts for rtype in RESPONSE_TYPES]  # fmt: skip


def _ask(
    teacher: Teacher,
    rtype: str,
    ctx: ImageContext,
    seed: int,
    retries: int,
    done: dict[ReplyKey, str],
    log: Callable[[dict], None] | None,
    teacher_id: str,
) -> tuple[tuple[str, str] | None, str | None]:
    """(question, answer) from a kept reply or the teacher, else (None, why it failed).

    An accepted reply is logged before it is used, so a run stopped later keeps it."""
    request = _request(rtype, ctx, seed)
    question = request.question
    key = prompt_key(request.messages, teacher_id)
    if (ctx.image, key) in done:
        try:
            return first_pair(rtype, done[ctx.image, key], question), None
        except RejectedOutput:
            pass  # kept under an older parser that accepted it: ask again

    def parse(reply: str) -> tuple[str, str]:
        try:
            return first_pair(rtype, reply, question)
        except RejectedOutput as err:
            raise Unusable(str(err)) from err

    def keep(tried: Try[tuple[str, str]]) -> None:
        if log is not None and tried.error is None:
            log({"prompt_key": key, "image": ctx.image, "category": rtype,
                 "attempt": tried.attempt, "content": tried.content})  # fmt: skip

    outcome = ask(lambda: teacher.respond(request), parse, retries, keep,
                  failures=(RejectedOutput, EndpointError))  # fmt: skip
    return outcome.value, None if outcome.value is not None else str(outcome.error)


def build_bench(
    contexts: list[ImageContext],
    teacher: Teacher,
    seed: int = 0,
    retries: int = 2,
    progress: Callable[[], None] | None = None,
    log: Callable[[dict], None] | None = None,
    done: dict[ReplyKey, str] | None = None,
    teacher_id: str = "",
) -> Bench:
    """One question per type per image, with the teacher's answer as the reference.

    A reply the parser rejects (or a failing endpoint) is asked again up to `retries`
    times; a question still missing is recorded in `failures`, never invented. An endpoint
    down on every try raises EndpointDownError. `done` holds replies kept by an earlier run
    (`kept_replies`), used without asking; each newly accepted reply goes to `log` as it
    arrives, its prompt key naming `teacher_id` (another teacher is asked afresh).
    """
    done = done or {}
    bench = Bench()
    for ctx in contexts:
        bench.contexts.append(context_row(ctx))
        for rtype in RESPONSE_TYPES:
            pair, reason = _ask(teacher, rtype, ctx, seed, retries, done, log, teacher_id)
            if progress is not None:
                progress()
            if pair is None:
                bench.failures.append({"image": ctx.image, "category": rtype, "reason": reason})
                continue
            qid = len(bench.questions)
            bench.questions.append({"question_id": qid, "image": ctx.image, "text": pair[0],
                                    "category": BENCH_CATEGORY[rtype]})  # fmt: skip
            bench.references.append({"question_id": qid, "text": pair[1],
                                     "answer_id": f"ref-{qid}", "model_id": teacher.name})  # fmt: skip
    return bench


def kept_replies(path: str | Path) -> dict[ReplyKey, str]:
    """(image, prompt key) -> accepted teacher reply, from an earlier build_requests.jsonl
    (a record naming no image cannot be told apart from a twin's and is skipped)."""
    return {
        (str(r["image"]), str(r["prompt_key"])): r["content"]
        for r in read_journal(path)
        if "prompt_key" in r and "image" in r and isinstance(r.get("content"), str)
    }

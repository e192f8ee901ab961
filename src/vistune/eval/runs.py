"""The evaluation runs behind `vistune eval`: inputs in, a report folder out (paper §5).

Each run reads its inputs, resumes from its journal where it has one (`resume`; otherwise
the journal is deleted and everything is asked again), asks its model, and writes the
folder: report.json, report.md, report.png and config.json (`settings`, the command's
flags) through vistune.eval.report. A run returns the table the command prints; notes
for the user go to `say`, progress to the bars `bars(total, label)` makes. The judge or
teacher down on every try stops a run with one VistuneError saying what is kept.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vistune.chat_client import ChatClient, EndpointDownError
from vistune.config import ClientConfig, GenerationConfig
from vistune.errors import VistuneError
from vistune.eval import judge
from vistune.eval.journal import appender, prompt_key, requester_id
from vistune.eval.report import markdown_table, write_run
from vistune.eval.resume import endpoint_id, kept_note, rekeyed_note
from vistune.files import write_json, write_jsonl


class Bar(Protocol):
    """A progress bar (tqdm's interface)."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


Bars = Callable[[int, str], Bar]
"""(total, label) -> a bar."""
Say = Callable[[str], None]


def _noted(say: Say, note: str | None) -> None:
    if note:
        say(note)


def judge_bench(
    files: dict[str, Path],
    out: Path,
    client: ClientConfig | None,
    local_judge: Path | None,
    *,
    max_tokens: int,
    repeats: int,
    retries: int,
    workers: int,
    resume: bool,
    settings: dict,
    bars: Bars,
    say: Say,
) -> tuple[str, int]:
    """LLaVA-Bench relative scores (`files`: questions, context, reference, answers) from
    a local judge folder or an endpoint; (table, exit code: 1 when every judgement failed)."""
    items = judge.load_bench(**files)
    if local_judge is not None:
        complete = judge.LocalJudge(local_judge, max_tokens).complete
        # the full path: two models may share a folder name; greedy, so no temperature
        judge_id = requester_id(str(Path(local_judge).resolve()), max_tokens=max_tokens)
        workers = 1
    else:
        assert client is not None
        complete = ChatClient(client).complete
        judge_id = endpoint_id(client)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "raw_judgements.jsonl"
    done = judge.reusable(raw_path, items, judge_id) if resume else {}
    if not resume:
        raw_path.unlink(missing_ok=True)
    else:
        keys = {i.question_id: prompt_key(judge.judge_messages(i, judge.load_rubric(i.category)),
                                          judge_id) for i in items}  # fmt: skip
        expected = {(r, q): k for r in range(repeats) for q, k in keys.items()}
        _noted(say, rekeyed_note(raw_path, expected,
                                 lambda r: (int(r["repeat"]), str(r["question_id"])),
                                 lambda r: bool(r.get("scores"))))  # fmt: skip
    bar = bars(len(items) * repeats, "judging")
    with appender(raw_path) as log:
        try:
            judgements = judge.run_judge(items, complete, repeats, retries, log, bar.update,
                                         done, judge_id, workers)  # fmt: skip
        except EndpointDownError as err:
            bar.close()
            keys = [(r, i.question_id) for r in range(repeats) for i in items]
            raise VistuneError(
                f"the judge is unreachable or refuses us ({err}); "
                f"{kept_note(keys, judge.reusable(raw_path, items, judge_id), raw_path)}"
            ) from None
    bar.close()
    report = judge.summarize(items, judgements, repeats)
    report["raw_judgements"] = raw_path.name
    table = _judge_table(report, repeats)
    std = report["std"] if repeats > 1 else None
    write_run(out, report, settings, table + "\n", report["relative"],
              "LLaVA-Bench relative score", std)  # fmt: skip
    failed = [j for j in judgements if j.scores is None]
    if failed:
        reasons = collections.Counter((j.reason or "?").split(":")[0] for j in failed)
        say(f"{len(failed)} of {len(judgements)} judgements failed and are excluded "
            f"(most often: {reasons.most_common(1)[0][0]}; details in {raw_path})")  # fmt: skip
    return table, 1 if len(failed) == len(judgements) else 0


def _judge_table(report: dict, repeats: int) -> str:
    cols = [*judge.CATEGORIES, "all"]
    rows = [("relative (%)", [report["relative"][c] for c in cols])]
    if repeats > 1:
        rows.append(("std (runs)", [report["std"][c] for c in cols]))
    rows.append(("judged", [report["runs"][0][c]["judged"] for c in cols]))
    table = markdown_table(cols, rows)
    table += f"\nFailures (excluded from the means): {report['failures']['count']}"
    if report["failures"]["question_ids"]:
        table += f" (question ids: {', '.join(report['failures']['question_ids'])})"
    return table


@dataclass(frozen=True)
class Answerer:
    """A model folder (or `default`) that answers questions: `eval answer` and --model."""

    model: str
    generation: GenerationConfig
    batch_size: int = 8
    template: str | None = None
    """A conversation template instead of the model's own."""


def answer(
    answerer: Answerer, questions: list[dict], images: Path, out: Path, bars: Bars
) -> dict[str, str]:
    """The answers to `questions`, kept in `out` (resumable); question id -> answer text."""
    from vistune.eval.answer import answer_questions, check_images, load_engine

    check_images(questions, images)
    model = answerer.model
    engine = load_engine(model, answerer.batch_size, answerer.template)
    # resuming tells models by their full path: two may share a folder name (checkpoint-1000)
    model_key = model if model == "default" else str(Path(model).resolve())
    bar = bars(len(questions), "answering")
    try:
        rows = answer_questions(engine, questions, images, out, answerer.generation,
                                Path(model).name, answerer.batch_size, bar.update,
                                model_key)  # fmt: skip
    finally:
        bar.close()
    return {str(r["question_id"]): r["text"] for r in rows}


def scienceqa(
    problems_file: Path,
    splits_file: Path,
    split: str,
    predictions: Path | None,
    answerer: Answerer | None,
    image_root: Path | None,
    out: Path,
    *,
    ensemble: str | None,
    other: Path | None,
    client: ClientConfig | None,
    retries: int,
    resume: bool,
    settings: dict,
    bars: Bars,
    say: Say,
) -> str:
    """ScienceQA accuracy (Table 7) of `predictions`, or of `answerer`'s answers, alone or
    ensembled with `other`'s (§5.2); the table the command prints."""
    from vistune.data.scienceqa import load_scienceqa
    from vistune.eval import scienceqa as sqa

    problems = load_scienceqa(problems_file, splits_file, split, image_root)
    if ensemble and other is None:
        raise VistuneError(f"--ensemble {ensemble} needs --other PREDICTIONS.jsonl")
    if ensemble == "judge" and client is None:
        raise VistuneError("--ensemble judge needs --judge-base-url and --judge-model")
    # checked before --model generates: a rerun answers every question again
    other_text = sqa.read_predictions(other, problems) if ensemble and other else {}
    if predictions is not None:
        ours_text = sqa.read_predictions(predictions, problems)
    else:
        assert answerer is not None
        ours_text = _scienceqa_answers(problems, answerer, image_root, out, bars)
    ours = sqa.score(problems, sqa.parse_all(problems, ours_text))
    report: dict = {"split": split, "ours": ours.to_dict()}
    rows = [("ours", [ours.accuracy[c] for c in sqa.COLUMNS])]
    final = ours
    if ensemble:
        other_letters = sqa.parse_all(problems, other_text)
        second = sqa.score(problems, other_letters)
        report["other"] = second.to_dict()
        rows.append(("other", [second.accuracy[c] for c in sqa.COLUMNS]))
        if ensemble == "complement":
            final = sqa.score(problems, sqa.complement(problems, ours.parsed, other_letters))
        else:
            assert client is not None
            result = judge_ensemble(problems, ours_text, other_text, client, out, retries,
                                    resume, say)  # fmt: skip
            final = sqa.score(problems, result.letters)
            report["judge"] = {"asked": result.asked, "failures": {
                "count": len(result.failures), "question_ids": result.failures}}  # fmt: skip
        report["ensemble"] = {"method": ensemble, **final.to_dict()}
        rows.append((f"ensemble ({ensemble})", [final.accuracy[c] for c in sqa.COLUMNS]))
    report["accuracy"] = final.accuracy
    report["average"] = final.accuracy["average"]
    table = markdown_table(sqa.COLUMNS, rows)
    table += f"\nUnparsed predictions (counted wrong): {len(ours.unparsed)}"
    if ours.unparsed:
        table += f" ({', '.join(ours.unparsed)})"
    if "judge" in report and report["judge"]["failures"]["count"]:
        failed = report["judge"]["failures"]
        table += (f"\nJudge failures (our answer kept in the ensemble): {failed['count']}"
                  f" ({', '.join(failed['question_ids'])})")  # fmt: skip
    write_run(out, report, settings, table + "\n", final.accuracy, "ScienceQA accuracy")
    return table


def _scienceqa_answers(
    problems: list, answerer: Answerer, image_root: Path | None, out: Path, bars: Bars
) -> dict[str, str]:
    from vistune.data.scienceqa import build_question
    from vistune.eval.answer import require_engine

    require_engine()
    if any(p.has_image for p in problems) and image_root is None:
        raise VistuneError("--model on a split with images needs --image-root")
    questions = [{"question_id": p.pid, "image": p.image_rel, "text": build_question(p)}
                 for p in problems]  # fmt: skip
    root = image_root if image_root is not None else Path(".")
    return answer(answerer, questions, root, out / "predictions.jsonl", bars)


def judge_ensemble(
    problems: list,
    ours_text: dict,
    other_text: dict,
    client: ClientConfig,
    out: Path,
    retries: int,
    resume: bool,
    say: Say,
):
    """`--ensemble judge`, each reply appended to raw_judgements.jsonl as it arrives."""
    from vistune.eval import scienceqa as sqa

    chat = ChatClient(client)
    judge_id = endpoint_id(client)
    raw_path = out / "raw_judgements.jsonl"
    done = sqa.kept_replies(raw_path) if resume else {}
    if not resume:
        raw_path.unlink(missing_ok=True)
    else:
        requests = sqa.judge_requests(problems, ours_text, other_text)
        _noted(say, rekeyed_note(
            raw_path, {pid: prompt_key(m, judge_id) for pid, m in requests.items()},
            lambda r: str(r["question_id"]),
            lambda r: bool(r.get("letter")) and isinstance(r.get("content"), str)))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    try:
        with appender(raw_path) as log:
            return sqa.judge_ensemble(problems, ours_text, other_text, chat.complete,
                                      retries, log, done, judge_id)  # fmt: skip
    except EndpointDownError as err:
        keys = [(pid, prompt_key(m, judge_id))
                for pid, m in sqa.judge_requests(problems, ours_text, other_text).items()]  # fmt: skip
        raise VistuneError(
            f"the judge is unreachable or refuses us ({err}); "
            f"{kept_note(keys, sqa.kept_replies(raw_path), raw_path)}"
        ) from None
    finally:
        chat.close()


def teacher_id(teacher: Any, kind: str, client: ClientConfig | None, max_tokens: int) -> str:
    """The journal's name for a benchmark teacher (the rules ignore the sampling flags;
    a local model is greedy, so no temperature)."""
    if kind == "openai":
        assert client is not None
        return requester_id(teacher.name, temperature=client.temperature,
                            max_tokens=client.max_tokens)  # fmt: skip
    if kind == "local":
        return requester_id(teacher.name, max_tokens=max_tokens)
    return teacher.name


def build(
    contexts: list,
    teacher: Any,
    identity: str,
    out: Path,
    *,
    seed: int,
    retries: int,
    resume: bool,
    settings: dict,
    split: str,
    bars: Bars,
    say: Say,
) -> str:
    """A LLaVA-Bench-style folder (vistune.eval.build) asked of `teacher`, whose journal
    name is `identity`; the line the command prints."""
    from vistune.data.formats import RESPONSE_TYPES
    from vistune.eval.build import build_bench, kept_replies, request_keys

    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / "build_requests.jsonl"
    done = kept_replies(kept_path) if resume else {}
    if not resume:
        kept_path.unlink(missing_ok=True)
    else:
        keys = request_keys(contexts, seed, identity)  # contexts x RESPONSE_TYPES
        types = [t for _ in contexts for t in RESPONSE_TYPES]
        expected = {(image, t): k for (image, k), t in zip(keys, types, strict=True)}
        _noted(say, rekeyed_note(kept_path, expected,
                                 lambda r: (str(r["image"]), str(r["category"])),
                                 lambda r: isinstance(r.get("content"), str)))  # fmt: skip
    bar = bars(len(contexts) * 3, "building")
    try:
        with appender(kept_path) as log:
            bench = build_bench(contexts, teacher, seed, retries, bar.update, log, done, identity)
    except EndpointDownError as err:
        keys = request_keys(contexts, seed, identity)
        raise VistuneError(
            f"the teacher is unreachable or refuses us ({err}); no benchmark file was written; "
            f"{kept_note(keys, kept_replies(kept_path), kept_path)}"
        ) from None
    finally:
        bar.close()
    write_jsonl(out / "questions.jsonl", bench.questions)
    write_jsonl(out / "context.jsonl", bench.contexts)
    write_jsonl(out / "answers_reference.jsonl", bench.references)
    summary = {"teacher": teacher.name, "split": split, "seed": seed,
               "images": len(bench.contexts), "questions": len(bench.questions),
               "failures": bench.failures}  # fmt: skip
    write_json(out / "build.json", summary)
    write_json(out / "config.json", settings)
    return (f"{len(bench.questions)} questions on {len(bench.contexts)} images in {out}"
            f" ({len(bench.failures)} could not be made)")  # fmt: skip


def scenes(
    coco: Path,
    split: str,
    images: int | None,
    out: Path,
    *,
    seed: int,
    control: str,
    answers: Path | None,
    answerer: Answerer | None,
    settings: dict,
    bars: Bars,
) -> str:
    """Exact-answer questions on held-out scenes (vistune.eval.scenes), written to
    out/questions.jsonl and, with `answers` or `answerer`, scored; the line or table the
    command prints."""
    from vistune.data.formats import load_coco
    from vistune.data.records import read_jsonl
    from vistune.data.scenes import load_scene_objects
    from vistune.eval import scenes as sc
    from vistune.eval.report import check_same_ids, index_by

    contexts, _ = load_coco(coco, split)
    pictures = {c.image_id: c.image for c in contexts[:images]}
    questions = sc.make_questions(load_scene_objects(coco, split), pictures, seed)
    if control == "shuffled":
        try:
            questions = sc.shuffled_control(questions, seed)
        except ValueError as err:
            raise VistuneError(f"--control shuffled: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    q_path = out / "questions.jsonl"
    write_jsonl(q_path, questions)
    if answerer is not None:
        from vistune.eval.answer import require_engine

        require_engine()
        texts = answer(answerer, questions, coco, out / "answers.jsonl", bars)
        by_id = {k: {"text": v} for k, v in texts.items()}
    elif answers is None:
        return f"{len(questions)} questions written to {q_path}; score with --answers"
    else:
        rows = read_jsonl(answers, "answers", ("question_id", "text"))
        by_id = index_by(rows, "question_id", "answers", answers)
        check_same_ids([str(q["question_id"]) for q in questions], by_id, "answers", answers)
    result = sc.score(questions, {k: str(v["text"]) for k, v in by_id.items()})
    cols = [*sc.SKILLS, "all"]
    label = "accuracy, swapped images (%)" if control == "shuffled" else "accuracy (%)"
    table = markdown_table(cols, [(label, [result["accuracy"][c] for c in cols]),
                                  ("chance (%)", [result["chance"].get(c) for c in cols]),
                                  ("questions", [result["counts"][c] for c in cols])])  # fmt: skip
    write_run(out, result, settings, table, result["accuracy"], "Scene questions")
    return table

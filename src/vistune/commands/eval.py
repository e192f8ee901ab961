"""`vistune eval`: LLaVA-Bench judging and ScienceQA scoring (paper §5.1-5.2).

    vistune eval judge --questions Q.jsonl --context CTX.jsonl --reference REF.jsonl \\
        --answers A.jsonl --base-url URL --model NAME --out DIR [--repeats K]
    vistune eval scienceqa --problems problems.json --splits pid_splits.json --split test \\
        --predictions P.jsonl --out DIR [--ensemble judge --other P2.jsonl ...]

Each run writes DIR/report.json, report.md, report.png and config.json (every flag);
the judge (and `--ensemble judge`) also keeps every request's reply in
DIR/raw_judgements.jsonl as it arrives, and `eval build` every accepted teacher reply in
DIR/build_requests.jsonl: a rerun resumes from them (`--no-resume` starts afresh).
File formats: docs/EVAL.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from vistune.commands.eval_flags import add_arguments
from vistune.errors import VistuneError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "evaluate: LLaVA-Bench judge and build, ScienceQA accuracy, scene questions"


def _config(args: argparse.Namespace) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in sorted(vars(args).items())
        if k != "func"
    }


def _client(args: argparse.Namespace, base_url: str | None, model: str | None, flag: str):
    from vistune.chat_client import ChatClient

    if not base_url or not model:
        raise VistuneError(f"the judge needs --{flag}base-url and --{flag}model")
    return ChatClient(
        base_url,
        model,
        timeout=args.timeout,
        max_retries=args.http_retries,
        backoff=args.backoff,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )


def _endpoint_id(model: str, args: argparse.Namespace) -> str:
    """The journal's name for an endpoint model with the settings `_client` sends it."""
    from vistune.eval.journal import requester_id

    return requester_id(model, temperature=args.temperature, max_tokens=args.max_tokens)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=total == 0)


def run_judge(args: argparse.Namespace) -> int:
    from vistune.chat_client import EndpointDownError
    from vistune.eval import judge
    from vistune.eval.journal import appender, prompt_key, requester_id
    from vistune.eval.report import markdown_table, write_run

    items = judge.load_bench(args.questions, args.context, args.reference, args.answers)
    if args.local_judge is not None:
        complete = judge.LocalJudge(args.local_judge, args.max_tokens).complete
        # the full path: two models may share a folder name; greedy, so no temperature
        judge_id = requester_id(str(Path(args.local_judge).resolve()), max_tokens=args.max_tokens)
    else:
        complete = _client(args, args.base_url, args.model, "").complete
        judge_id = _endpoint_id(args.model, args)
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "raw_judgements.jsonl"
    done = judge.reusable(raw_path, items, judge_id) if args.resume else {}
    if not args.resume:
        raw_path.unlink(missing_ok=True)
    else:
        keys = {i.question_id: prompt_key(judge.judge_messages(i, judge.load_rubric(i.category)),
                                          judge_id) for i in items}  # fmt: skip
        expected = {(r, q): k for r in range(args.repeats) for q, k in keys.items()}
        _say_rekeyed(raw_path, expected, lambda r: (int(r["repeat"]), str(r["question_id"])),
                     lambda r: bool(r.get("scores")))  # fmt: skip
    bar = _progress(len(items) * args.repeats, "judging")
    with appender(raw_path) as log:
        workers = args.workers if args.local_judge is None else 1
        try:
            judgements = judge.run_judge(
                items, complete, args.repeats, args.retries, log, bar.update, done, judge_id,
                workers,
            )  # fmt: skip
        except EndpointDownError as err:
            bar.close()
            keys = [(r, i.question_id) for r in range(args.repeats) for i in items]
            raise VistuneError(
                f"the judge is unreachable or refuses us ({err}); "
                f"{_kept(keys, judge.reusable(raw_path, items, judge_id), raw_path)}"
            ) from None
    bar.close()
    report = judge.summarize(items, judgements, args.repeats)
    report["raw_judgements"] = raw_path.name
    cols = [*judge.CATEGORIES, "all"]
    rows = [("relative (%)", [report["relative"][c] for c in cols])]
    if args.repeats > 1:
        rows.append(("std (runs)", [report["std"][c] for c in cols]))
    rows.append(("judged", [report["runs"][0][c]["judged"] for c in cols]))
    table = markdown_table(cols, rows)
    table += f"\nFailures (excluded from the means): {report['failures']['count']}"
    if report["failures"]["question_ids"]:
        table += f" (question ids: {', '.join(report['failures']['question_ids'])})"
    write_run(
        args.out,
        report,
        _config(args),
        table + "\n",
        report["relative"],
        "LLaVA-Bench relative score",
        report["std"] if args.repeats > 1 else None,
    )
    print(table)
    failed = [j for j in judgements if j.scores is None]
    if failed:
        reasons = collections.Counter((j.reason or "?").split(":")[0] for j in failed)
        print(
            f"vistune: {len(failed)} of {len(judgements)} judgements failed and are excluded "
            f"(most often: {reasons.most_common(1)[0][0]}; details in {raw_path})",
            file=sys.stderr,
        )
    if len(failed) == len(judgements):
        return 1
    return 0


def _answer(args: argparse.Namespace, questions: list[dict], images: Path, out: Path) -> dict:
    """Generate answers with --model (resumable); question id -> answer text."""
    from vistune.config import GenerationConfig
    from vistune.eval.answer import answer_questions, check_images, load_engine

    try:
        config = GenerationConfig(max_new_tokens=args.max_new_tokens,
                                  temperature=args.answer_temperature,
                                  seed=getattr(args, "seed", 0))  # fmt: skip
    except ValueError as err:  # a bad flag value
        names = {"max_new_tokens": "--max-new-tokens", "temperature": "--answer-temperature"}
        message = str(err)
        for field, flag in names.items():
            message = message.replace(field, flag, 1)
        raise VistuneError(message) from None
    check_images(questions, images)
    engine = load_engine(args.model, args.batch_size, getattr(args, "template", None))
    # resuming tells models by their full path: two may share a folder name (checkpoint-1000)
    model_key = args.model if args.model == "default" else str(Path(args.model).resolve())
    bar = _progress(len(questions), "answering")
    try:
        rows = answer_questions(engine, questions, images, out, config, Path(args.model).name,
                                args.batch_size, bar.update, model_key)  # fmt: skip
    finally:
        bar.close()
    return {str(r["question_id"]): r["text"] for r in rows}


def run_answer(args: argparse.Namespace) -> int:
    from vistune.data.records import read_jsonl
    from vistune.eval.report import index_by

    rows = read_jsonl(args.questions, "questions", ("question_id", "text"))
    index_by(rows, "question_id", "questions", args.questions)
    images = args.images if args.images is not None else args.questions.parent
    answers = _answer(args, rows, images, args.out)
    print(f"{len(answers)} answers written to {args.out}")
    return 0


def _generate(args: argparse.Namespace, problems: list) -> dict[str, str]:
    from vistune.data.scienceqa import build_question
    from vistune.eval.answer import require_engine

    require_engine()
    if any(p.has_image for p in problems) and args.image_root is None:
        raise VistuneError("--model on a split with images needs --image-root")
    questions = [{"question_id": p.pid, "image": p.image_rel, "text": build_question(p)}
                 for p in problems]  # fmt: skip
    root = args.image_root if args.image_root is not None else Path(".")
    return _answer(args, questions, root, args.out / "predictions.jsonl")


def _judge_ensemble(args: argparse.Namespace, problems: list, ours_text: dict, other_text: dict):
    """`--ensemble judge`, each reply appended to raw_judgements.jsonl as it arrives."""
    from vistune.chat_client import EndpointDownError
    from vistune.eval import scienceqa as sqa
    from vistune.eval.journal import appender, prompt_key

    client = _client(args, args.judge_base_url, args.judge_model, "judge-")
    judge_id = _endpoint_id(args.judge_model, args)
    raw_path = args.out / "raw_judgements.jsonl"
    done = sqa.kept_replies(raw_path) if args.resume else {}
    if not args.resume:
        raw_path.unlink(missing_ok=True)
    else:
        requests = sqa.judge_requests(problems, ours_text, other_text)
        _say_rekeyed(raw_path, {pid: prompt_key(m, judge_id) for pid, m in requests.items()},
                     lambda r: str(r["question_id"]),
                     lambda r: bool(r.get("letter")) and isinstance(r.get("content"), str))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with appender(raw_path) as log:
            return sqa.judge_ensemble(problems, ours_text, other_text, client.complete,
                                      args.retries, log, done, judge_id)  # fmt: skip
    except EndpointDownError as err:
        keys = [(pid, prompt_key(m, judge_id))
                for pid, m in sqa.judge_requests(problems, ours_text, other_text).items()]  # fmt: skip
        raise VistuneError(
            f"the judge is unreachable or refuses us ({err}); "
            f"{_kept(keys, sqa.kept_replies(raw_path), raw_path)}"
        ) from None
    finally:
        client.close()


def run_scienceqa(args: argparse.Namespace) -> int:
    from vistune.data.scienceqa import load_scienceqa
    from vistune.eval import scienceqa as sqa
    from vistune.eval.report import markdown_table, write_run

    problems = load_scienceqa(args.problems, args.splits, args.split, args.image_root)
    if args.ensemble and args.other is None:
        raise VistuneError(f"--ensemble {args.ensemble} needs --other PREDICTIONS.jsonl")
    if args.ensemble == "judge" and not (args.judge_base_url and args.judge_model):
        raise VistuneError("--ensemble judge needs --judge-base-url and --judge-model")
    # checked before --model generates: a rerun answers every question again
    other_text = sqa.read_predictions(args.other, problems) if args.ensemble else {}
    ours_text = (
        sqa.read_predictions(args.predictions, problems)
        if args.predictions
        else _generate(args, problems)
    )
    ours = sqa.score(problems, sqa.parse_all(problems, ours_text))
    report: dict = {"split": args.split, "ours": ours.to_dict()}
    rows = [("ours", [ours.accuracy[c] for c in sqa.COLUMNS])]
    final = ours
    if args.ensemble:
        other_letters = sqa.parse_all(problems, other_text)
        other = sqa.score(problems, other_letters)
        report["other"] = other.to_dict()
        rows.append(("other", [other.accuracy[c] for c in sqa.COLUMNS]))
        if args.ensemble == "complement":
            final = sqa.score(problems, sqa.complement(problems, ours.parsed, other_letters))
        else:
            result = _judge_ensemble(args, problems, ours_text, other_text)
            final = sqa.score(problems, result.letters)
            report["judge"] = {
                "asked": result.asked,
                "failures": {"count": len(result.failures), "question_ids": result.failures},
            }
        report["ensemble"] = {"method": args.ensemble, **final.to_dict()}
        rows.append((f"ensemble ({args.ensemble})", [final.accuracy[c] for c in sqa.COLUMNS]))
    report["accuracy"] = final.accuracy
    report["average"] = final.accuracy["average"]
    table = markdown_table(sqa.COLUMNS, rows)
    table += f"\nUnparsed predictions (counted wrong): {len(ours.unparsed)}"
    if ours.unparsed:
        table += f" ({', '.join(ours.unparsed)})"
    if "judge" in report and report["judge"]["failures"]["count"]:
        failed = report["judge"]["failures"]
        table += (
            f"\nJudge failures (our answer kept in the ensemble): {failed['count']}"
            f" ({', '.join(failed['question_ids'])})"
        )
    write_run(args.out, report, _config(args), table + "\n", final.accuracy, "ScienceQA accuracy")
    print(table)
    return 0


def run_build(args: argparse.Namespace) -> int:
    from vistune.chat_client import EndpointDownError
    from vistune.datagen.parse import RESPONSE_TYPES
    from vistune.datagen.teachers import make_teacher
    from vistune.eval.build import build_bench, kept_replies, request_keys, sample_contexts
    from vistune.eval.journal import appender, requester_id
    from vistune.files import write_json as atomic_write_json

    if args.images < 1:
        raise VistuneError("--images must be at least 1")
    options: dict = {}
    if args.teacher == "openai":
        if not args.base_url or not args.model:
            raise VistuneError("--teacher openai needs --base-url and --model")
        options = {"base_url": args.base_url, "model": args.model, "timeout": args.timeout,
                   "max_retries": args.http_retries, "backoff": args.backoff,
                   "temperature": args.temperature, "max_tokens": args.max_tokens}  # fmt: skip
    elif args.teacher == "local":
        options = {"model_dir": args.local_model, "max_new_tokens": args.max_tokens}
    contexts = sample_contexts(args.coco, args.split, args.images, args.seed)
    teacher = make_teacher(args.teacher, **options)
    teacher_id = teacher.name  # the rules ignore the sampling flags
    if args.teacher == "openai":
        teacher_id = _endpoint_id(teacher.name, args)
    elif args.teacher == "local":  # greedy, so no temperature
        teacher_id = requester_id(teacher.name, max_tokens=args.max_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    kept_path = args.out / "build_requests.jsonl"
    done = kept_replies(kept_path) if args.resume else {}
    if not args.resume:
        kept_path.unlink(missing_ok=True)
    else:
        keys = request_keys(contexts, args.seed, teacher_id)  # contexts x RESPONSE_TYPES
        types = [t for _ in contexts for t in RESPONSE_TYPES]
        expected = {(image, t): k for (image, k), t in zip(keys, types, strict=True)}
        _say_rekeyed(kept_path, expected, lambda r: (str(r["image"]), str(r["category"])),
                     lambda r: isinstance(r.get("content"), str))  # fmt: skip
    bar = _progress(len(contexts) * 3, "building")
    try:
        with appender(kept_path) as log:
            bench = build_bench(contexts, teacher, args.seed, args.retries, bar.update, log,
                                done, teacher_id)  # fmt: skip
    except EndpointDownError as err:
        keys = request_keys(contexts, args.seed, teacher_id)
        raise VistuneError(
            f"the teacher is unreachable or refuses us ({err}); no benchmark file was written; "
            f"{_kept(keys, kept_replies(kept_path), kept_path)}"
        ) from None
    finally:
        bar.close()
        teacher.close()
    _write_jsonl(args.out / "questions.jsonl", bench.questions)
    _write_jsonl(args.out / "context.jsonl", bench.contexts)
    _write_jsonl(args.out / "answers_reference.jsonl", bench.references)
    summary = {"teacher": teacher.name, "split": args.split, "seed": args.seed,
               "images": len(bench.contexts), "questions": len(bench.questions),
               "failures": bench.failures}  # fmt: skip
    atomic_write_json(args.out / "build.json", summary)
    atomic_write_json(args.out / "config.json", _config(args))
    print(f"{len(bench.questions)} questions on {len(bench.contexts)} images in {args.out}"
          f" ({len(bench.failures)} could not be made)")  # fmt: skip
    return 0


def run_scenes(args: argparse.Namespace) -> int:
    from vistune.data.formats import load_coco
    from vistune.data.records import read_jsonl
    from vistune.data.scenes import load_scene_objects
    from vistune.eval import scenes
    from vistune.eval.report import check_same_ids, index_by, markdown_table, write_run

    contexts, _ = load_coco(args.coco, args.split)
    images = {c.image_id: c.image for c in contexts[: args.images]}
    truth = load_scene_objects(args.coco, args.split)
    questions = scenes.make_questions(truth, images, args.seed)
    if args.control == "shuffled":
        try:
            questions = scenes.shuffled_control(questions, args.seed)
        except ValueError as err:
            raise VistuneError(f"--control shuffled: {err}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    q_path = args.out / "questions.jsonl"
    _write_jsonl(q_path, questions)
    if args.model is not None:
        from vistune.eval.answer import require_engine

        require_engine()
        texts = _answer(args, questions, args.coco, args.out / "answers.jsonl")
        by_id = {k: {"text": v} for k, v in texts.items()}
    elif args.answers is None:
        print(f"{len(questions)} questions written to {q_path}; score with --answers")
        return 0
    else:
        rows = read_jsonl(args.answers, "answers", ("question_id", "text"))
        by_id = index_by(rows, "question_id", "answers", args.answers)
        ids = [str(q["question_id"]) for q in questions]
        check_same_ids(ids, by_id, "answers", args.answers)
    result = scenes.score(questions, {k: str(v["text"]) for k, v in by_id.items()})
    cols = [*scenes.SKILLS, "all"]
    label = "accuracy, swapped images (%)" if args.control == "shuffled" else "accuracy (%)"
    table = markdown_table(cols, [(label, [result["accuracy"][c] for c in cols]),
                                  ("chance (%)", [result["chance"].get(c) for c in cols]),
                                  ("questions", [result["counts"][c] for c in cols])])  # fmt: skip
    write_run(args.out, result, _config(args), table, result["accuracy"], "Scene questions")
    print(table)
    return 0


def _say_rekeyed(path: Path, expected: dict, identify, kept) -> None:
    """One line on stderr, before anything is asked, when kept replies are not reused
    because their key differs (an older vistune's journal, or other settings): with a
    paid endpoint the user may rather stop than pay for them again."""
    from vistune.data.records import read_journal as read_records
    from vistune.eval.journal import rekeyed

    n = rekeyed((r for r in read_records(path) if kept(r)), expected, identify)
    if n:
        print(
            f"vistune: {n} replies kept in {path} are not reused: their key differs from "
            "this run's (written by an older vistune, whose keys lack --max-tokens, or under "
            f"another model, --temperature, --max-tokens or inputs); those {n} requests are "
            "asked again",
            file=sys.stderr,
        )


def _kept(keys: list, kept: dict, path: Path) -> str:
    """What a stopped run leaves for the next: how many of its requests (`keys`) have a
    reusable answer in `kept`, for its error message."""
    n = sum(k in kept for k in set(keys))
    return (
        f"{n} of {len(set(keys))} answers are kept in {path}: "
        "rerun with --resume (the default) to ask only the rest"
    )


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from vistune.files import write_text as atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


COMMANDS = {
    "answer": run_answer,
    "judge": run_judge,
    "scienceqa": run_scienceqa,
    "build": run_build,
    "scenes": run_scenes,
}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.eval_command](args)

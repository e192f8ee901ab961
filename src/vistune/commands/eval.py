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
import sys
from pathlib import Path

from vistune.commands.eval_flags import ANSWER_DEFAULTS, ANSWER_FLAGS, add_arguments
from vistune.commands.flags import client_config, flag_values
from vistune.config import GenerationConfig
from vistune.errors import VistuneError

__all__ = ["HELP", "add_arguments", "run"]

HELP = "evaluate: LLaVA-Bench judge and build, ScienceQA accuracy, scene questions"


def _settings(args: argparse.Namespace) -> dict:
    """Every flag, for the run's config.json (the answering model's as generated with)."""
    values = vars(args) | _generation_settings(args)
    return {
        k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(values.items()) if k != "func"
    }


def _generation(args: argparse.Namespace) -> GenerationConfig:
    """The answering model's settings: the flags given, eval's defaults for the others."""
    given = flag_values(args, GenerationConfig, only=ANSWER_FLAGS)
    return GenerationConfig(**(ANSWER_DEFAULTS | given), seed=getattr(args, "seed", 0))


def _generation_settings(args: argparse.Namespace) -> dict:
    if not hasattr(args, "max_new_tokens") or args.model is None:
        return {}  # no answering model: its flags are recorded as given
    generation = _generation(args)
    return {name: getattr(generation, name) for name in ANSWER_FLAGS}


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=total == 0)


def _say(message: str) -> None:
    print(f"vistune: {message}", file=sys.stderr)


def _client(args: argparse.Namespace, base_url: str | None, model: str | None, flag: str):
    """The endpoint the flags name (`flag`: their prefix), or an error naming them."""
    if not base_url or not model:
        raise VistuneError(f"the judge needs --{flag}base-url and --{flag}model")
    return client_config(args, base_url, model)


def _answerer(args: argparse.Namespace):
    """The model answering questions (--model and the generation flags)."""
    from vistune.eval.runs import Answerer

    return Answerer(args.model, _generation(args), args.batch_size, getattr(args, "template", None))


def run_judge(args: argparse.Namespace) -> int:
    from vistune.eval import runs

    files = {"questions": args.questions, "context": args.context,
             "reference": args.reference, "answers": args.answers}  # fmt: skip
    client = None if args.local_judge is not None else _client(args, args.base_url, args.model, "")
    table, code = runs.judge_bench(
        files, args.out, client, args.local_judge, max_tokens=args.max_tokens,
        repeats=args.repeats, retries=args.retries, workers=args.workers, resume=args.resume,
        settings=_settings(args), bars=_bar, say=_say,
    )  # fmt: skip
    print(table)
    return code


def run_answer(args: argparse.Namespace) -> int:
    from vistune.data.records import read_jsonl
    from vistune.eval.report import index_by
    from vistune.eval.runs import answer

    rows = read_jsonl(args.questions, "questions", ("question_id", "text"))
    index_by(rows, "question_id", "questions", args.questions)
    images = args.images if args.images is not None else args.questions.parent
    answers = answer(_answerer(args), rows, images, args.out, _bar)
    print(f"{len(answers)} answers written to {args.out}")
    return 0


def run_scienceqa(args: argparse.Namespace) -> int:
    from vistune.eval import runs

    _check_nothing_to_generate(args)
    client = None
    if args.ensemble == "judge" and args.judge_base_url and args.judge_model:
        client = client_config(args, args.judge_base_url, args.judge_model, prefix="judge-")
    table = runs.scienceqa(
        args.problems, args.splits, args.split, args.predictions,
        _answerer(args) if args.model is not None else None, args.image_root, args.out,
        ensemble=args.ensemble, other=args.other, client=client, retries=args.judge_retries,
        resume=args.resume, settings=_settings(args), bars=_bar, say=_say,
    )  # fmt: skip
    print(table)
    return 0


def _check_nothing_to_generate(args: argparse.Namespace) -> None:
    """A generation flag with --predictions (no model answers) would do nothing; before the
    judge's flags took `judge-`, `--temperature` here was the judge's, so say where it went."""
    given = [name for name in ANSWER_FLAGS if getattr(args, name) is not None]
    if args.model is None and given:
        flag = "--" + given[0].replace("_", "-")
        judge = "; the judge's is --judge-temperature" if given[0] == "temperature" else ""
        raise VistuneError(f"{flag} sets the answering model's generation, and there is none "
                           f"without --model{judge}")  # fmt: skip


def run_build(args: argparse.Namespace) -> int:
    from vistune.datagen.teachers import make_teacher
    from vistune.eval import runs
    from vistune.eval.build import sample_contexts

    client = None
    options: dict = {}
    if args.teacher == "openai":
        if not args.base_url or not args.model:
            raise VistuneError("--teacher openai needs --base-url and --model")
        client = client_config(args, args.base_url, args.model)
        options = {"config": client}
    elif args.teacher == "local":
        options = {"model_dir": args.local_model, "max_new_tokens": args.max_tokens}
    contexts = sample_contexts(args.coco, args.split, args.images, args.seed)
    teacher = make_teacher(args.teacher, **options)
    try:
        line = runs.build(
            contexts, teacher, runs.teacher_id(teacher, args.teacher, client, args.max_tokens),
            args.out, seed=args.seed, retries=args.retries, resume=args.resume,
            settings=_settings(args), split=args.split, bars=_bar, say=_say,
        )  # fmt: skip
    finally:
        teacher.close()
    print(line)
    return 0


def run_scenes(args: argparse.Namespace) -> int:
    from vistune.eval import runs

    answerer = _answerer(args) if args.model is not None else None
    print(runs.scenes(
        args.coco, args.split, args.images, args.out, seed=args.seed, control=args.control,
        answers=args.answers, answerer=answerer, settings=_settings(args), bars=_bar,
    ))  # fmt: skip
    return 0


COMMANDS = {
    "answer": run_answer,
    "judge": run_judge,
    "scienceqa": run_scienceqa,
    "build": run_build,
    "scenes": run_scenes,
}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.eval_command](args)

"""The flags of `vistune eval` and its subcommands (the runs are in commands/eval.py).

The answering model's settings are `GenerationConfig`'s fields and the judge's or teacher's
`ClientConfig`'s, made by commands/flags.py. `eval scienceqa` holds both, so its judge's
flags all carry `judge-` (`--judge-temperature` beside the answering `--temperature`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vistune.commands.flag_types import count, positive_int, probability, temperature, url
from vistune.commands.flags import CLIENT_FLAGS, add_client_flags, add_dataclass_flags
from vistune.config import GenerationConfig
from vistune.data.conversation import TEMPLATES

ANSWER_FLAGS = {"max_new_tokens": positive_int, "temperature": temperature, "top_p": probability}
"""The GenerationConfig fields the answering model (--model) takes as flags, with the check
of each value. Its seed is the subcommand's --seed where it has one, else 0."""
ANSWER_DEFAULTS = {"max_new_tokens": 512}
"""Where eval's default differs from GenerationConfig's (an evaluation answer runs longer
than a chat reply)."""
OLD_NAMES = {"temperature": ("--answer-temperature",)}
"""The answering model's flags' names before they came from GenerationConfig."""
OLD_JUDGE_NAMES = {name: ("--" + name.replace("_", "-"),) for name in CLIENT_FLAGS
                   if name != "temperature"}  # fmt: skip
"""`eval scienceqa`'s judge flags before they carried `judge-`; `--temperature` is the
answering model's now (given without --model it is refused, naming --judge-temperature)."""


def _client_flags(p: argparse.ArgumentParser, prefix: str, role: str = "judge") -> None:
    """The endpoint flags of the `role` model (the judge, or the teacher of `eval build`),
    every one named with `prefix`."""
    reply = "a judgement" if role == "judge" else "a teacher reply"
    p.add_argument(
        f"--{prefix}base-url",
        type=url,
        help="OpenAI-compatible endpoint, e.g. "
        "https://api.openai.com/v1 (key from $OPENAI_API_KEY)",
    )
    p.add_argument(f"--{prefix}model", help=f"{role} model name at that endpoint")
    add_client_flags(p, prefix, OLD_JUDGE_NAMES if prefix else None)
    p.add_argument(
        f"--{prefix}retries",
        *(["--retries"] if prefix else []),
        type=count,
        default=2,
        help=f"new requests for {reply} that failed or could not be parsed",
    )


def _resume_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"reuse {what} from an earlier run with the same settings "
        "(--no-resume deletes that file and asks everything again)",
    )


def _answer_flags(p: argparse.ArgumentParser) -> None:
    """Generation settings for --model (seeded by --seed where the subcommand has one).
    Left out, a flag is None (its default applies; `eval scienceqa` tells them apart)."""
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per generate call")
    add_dataclass_flags(p, GenerationConfig, only=ANSWER_FLAGS, checks=ANSWER_FLAGS,
                        given_only=True, default_text=ANSWER_DEFAULTS, aliases=OLD_NAMES)  # fmt: skip
    p.add_argument("--template", choices=sorted(TEMPLATES), help="conversation template "
                   "instead of the model's (a stage-1 model's plain never shows the question)")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)
    _add_answer(sub)
    _add_judge(sub)
    _add_scienceqa(sub)
    _add_build(sub)
    _add_scenes(sub)


def _add_judge(sub: argparse._SubParsersAction) -> None:
    j = sub.add_parser("judge", help="LLaVA-Bench relative scores from a judge model")
    j.add_argument("--questions", type=Path, required=True, help="questions JSONL")
    j.add_argument("--context", type=Path, required=True, help="context JSONL (captions/boxes)")
    j.add_argument("--reference", type=Path, required=True, help="reference answers JSONL")
    j.add_argument("--answers", type=Path, required=True, help="candidate answers JSONL")
    j.add_argument("--out", type=Path, required=True, help="report folder")
    j.add_argument(
        "--repeats", type=positive_int, default=1, help="judge runs (mean ± std, Table 5)"
    )
    j.add_argument(
        "--workers", type=positive_int, default=1, help="judge requests in flight at once"
    )
    j.add_argument(
        "--local-judge",
        type=Path,
        help="a local Hugging Face causal LM folder to judge with instead of an endpoint",
    )
    _resume_flag(j, "successful judgements in DIR/raw_judgements.jsonl")
    _client_flags(j, "")


def _add_scienceqa(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("scienceqa", help="ScienceQA accuracy (Table 7), optionally ensembled")
    s.add_argument("--problems", type=Path, required=True, help="problems.json")
    s.add_argument("--splits", type=Path, required=True, help="pid_splits.json")
    s.add_argument("--split", default="test")
    s.add_argument("--image-root", type=Path, help="folder holding <pid>/<image> (checked)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", type=Path, help="JSONL of {question_id, text}")
    src.add_argument("--model", help="model folder to generate predictions with")
    s.add_argument("--out", type=Path, required=True, help="report folder")
    s.add_argument(
        "--ensemble",
        choices=("complement", "judge"),
        help="combine with --other's predictions (paper §5.2)",
    )
    s.add_argument("--other", type=Path, help="the second model's predictions JSONL")
    _resume_flag(s, "--ensemble judge's replies in DIR/raw_judgements.jsonl")
    _client_flags(s, "judge-")
    _answer_flags(s)


def _add_answer(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("answer", help="answer a LLaVA-Bench question file with a model")
    a.add_argument("--model", required=True, help="model folder (or `default`)")
    a.add_argument("--questions", type=Path, required=True, help="questions JSONL")
    a.add_argument("--images", type=Path, help="image folder (default: the questions' folder)")
    a.add_argument("--out", type=Path, required=True, help="answers JSONL to write")
    _answer_flags(a)


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="build a LLaVA-Bench (COCO)-style benchmark with a teacher")
    b.add_argument("--coco", type=Path, required=True, help="COCO-layout folder")
    b.add_argument("--split", default="val")
    b.add_argument(
        "--images", type=positive_int, default=30, help="images to sample (3 questions each)"
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--teacher",
        default="rules",
        choices=("rules", "openai", "local"),
        help="who writes the reference answers (as in vistune datagen)",
    )
    b.add_argument("--local-model", type=Path, help="HF causal LM folder for --teacher local")
    b.add_argument("--out", type=Path, required=True, help="benchmark folder")
    _resume_flag(b, "the teacher replies in DIR/build_requests.jsonl")
    _client_flags(b, "", role="teacher")


def _add_scenes(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("scenes", help="exact-answer questions on held-out built-in scenes")
    c.add_argument("--coco", type=Path, required=True, help="a `vistune scenes` folder")
    c.add_argument("--split", default="val")
    c.add_argument("--images", type=positive_int, help="use only the first N images")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--control", choices=("none", "shuffled"), default="none",
                   help="shuffled: ask every question about another held-out scene, to show "
                   "what the model answers without the right picture")  # fmt: skip
    c.add_argument("--out", type=Path, required=True, help="writes questions.jsonl, and a "
                   "report when answers are given")  # fmt: skip
    how = c.add_mutually_exclusive_group()
    how.add_argument("--answers", type=Path, help="answers JSONL {question_id, text}")
    how.add_argument("--model", help="model folder to answer with")
    _answer_flags(c)

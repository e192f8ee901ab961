"""vistune.commands.eval_flags: eval's generation and judge flags come from GenerationConfig
and ClientConfig, with one name per setting and the old names kept."""

from __future__ import annotations

import argparse

import pytest

from vistune import cli
from vistune.commands import eval as eval_command
from vistune.commands.eval_flags import add_arguments
from vistune.commands.flags import client_config
from vistune.config import ClientConfig, GenerationConfig

URL = "http://127.0.0.1:9/v1"
SQA = ["scienceqa", "--problems", "p.json", "--splits", "s.json", "--out", "o"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vistune eval")
    add_arguments(parser)
    return parser


def _answer(*flags: str) -> argparse.Namespace:
    return _parser().parse_args(["answer", "--model", "m", "--questions", "q", "--out", "a",
                                 *flags])  # fmt: skip


def test_answer_flags_parse_into_the_generation_config():
    args = _answer("--max-new-tokens", "7", "--temperature", "0.5", "--top-p", "0.9")
    assert eval_command._generation(args) == GenerationConfig(7, 0.5, 0.9, seed=0)
    # left out: eval's own length default, GenerationConfig's for the rest
    assert eval_command._generation(_answer()) == GenerationConfig(512, 0.0, 1.0, seed=0)
    scenes = _parser().parse_args(["scenes", "--coco", "c", "--out", "o", "--model", "m",
                                   "--seed", "4", "--temperature", "0.2"])  # fmt: skip
    assert eval_command._generation(scenes) == GenerationConfig(512, 0.2, seed=4)


def test_the_old_answer_temperature_still_sets_the_temperature():
    args = _answer("--answer-temperature", "0.3")
    assert eval_command._generation(args).temperature == 0.3
    sqa = _parser().parse_args([*SQA, "--model", "m", "--answer-temperature", "0.3"])
    assert eval_command._generation(sqa).temperature == 0.3


def test_the_resolved_generation_settings_go_into_the_run_config():
    settings = eval_command._settings(_answer("--answer-temperature", "0.3"))
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (
        512, 0.3, 1.0)  # fmt: skip
    assert "answer_temperature" not in settings


def test_scienceqa_judge_flags_carry_judge_and_answer_flags_do_not():
    args = _parser().parse_args([
        *SQA, "--model", "m", "--temperature", "0.5", "--max-new-tokens", "9",
        "--judge-base-url", URL, "--judge-model", "j", "--judge-temperature", "0.7",
        "--judge-max-tokens", "11", "--judge-timeout", "5", "--judge-http-retries", "0",
        "--judge-backoff", "0", "--judge-retries", "3",
    ])  # fmt: skip
    assert eval_command._generation(args) == GenerationConfig(9, 0.5, seed=0)
    judge = client_config(args, args.judge_base_url, args.judge_model, prefix="judge-")
    assert judge == ClientConfig(URL, "j", temperature=0.7, max_tokens=11, timeout=5.0,
                                 http_retries=0, backoff=0.0)  # fmt: skip
    assert args.judge_retries == 3


def test_scienceqa_judge_flags_keep_their_old_names():
    """Scripts written before the judge's flags took `judge-` (all but --temperature)."""
    args = _parser().parse_args([
        *SQA, "--predictions", "p.jsonl", "--judge-base-url", URL, "--judge-model", "j",
        "--max-tokens", "11", "--timeout", "5", "--http-retries", "0", "--backoff", "0",
        "--retries", "3",
    ])  # fmt: skip
    judge = client_config(args, args.judge_base_url, args.judge_model, prefix="judge-")
    assert judge == ClientConfig(URL, "j", max_tokens=11, timeout=5.0, http_retries=0,
                                 backoff=0.0)  # fmt: skip
    assert args.judge_retries == 3


def test_scienceqa_refuses_generation_flags_without_a_model(capsys):
    """--temperature was the judge's here: given with --predictions it now does nothing, so
    it is refused, naming where the judge's went, before any file is read."""
    assert cli.main(["eval", *SQA, "--predictions", "p.jsonl", "--temperature", "0"]) == 2
    err = capsys.readouterr().err
    assert "--temperature sets the answering model's generation" in err
    assert "the judge's is --judge-temperature" in err
    assert cli.main(["eval", *SQA, "--predictions", "p.jsonl", "--top-p", "0.5"]) == 2
    assert "--top-p sets the answering model's" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sub", "flags"),
    [
        ("answer", ["--max-new-tokens MAX_NEW_TOKENS", "--top-p TOP_P",
                    "--temperature TEMPERATURE, --answer-temperature TEMPERATURE"]),
        ("scenes", ["--max-new-tokens MAX_NEW_TOKENS", "--top-p TOP_P",
                    "--temperature TEMPERATURE, --answer-temperature TEMPERATURE"]),
        ("scienceqa", ["--max-new-tokens MAX_NEW_TOKENS", "--top-p TOP_P",
                       "--temperature TEMPERATURE, --answer-temperature TEMPERATURE",
                       "--judge-temperature TEMPERATURE",
                       "--judge-max-tokens MAX_TOKENS, --max-tokens MAX_TOKENS",
                       "--judge-http-retries HTTP_RETRIES, --http-retries HTTP_RETRIES",
                       "--judge-retries JUDGE_RETRIES, --retries JUDGE_RETRIES"]),
        ("judge", ["--temperature TEMPERATURE", "--max-tokens MAX_TOKENS", "--retries RETRIES"]),
        ("build", ["--temperature TEMPERATURE", "--max-tokens MAX_TOKENS", "--retries RETRIES"]),
    ],
)  # fmt: skip
def test_help_lists_the_flags_and_their_old_names(capsys, sub, flags):
    with pytest.raises(SystemExit):
        _parser().parse_args([sub, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        assert flag in text, flag
    if sub in ("answer", "scienceqa"):
        assert "Longest answer in tokens. (default: 512)" in text
        assert "0 is greedy" in text

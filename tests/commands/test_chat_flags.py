"""vistune.commands.chat: its generation flags come from GenerationConfig (one owner per
setting, issue 17), with the old spellings, defaults and error lines it had by hand."""

from __future__ import annotations

import argparse
import re

import pytest

from vistune import cli
from vistune.commands import chat
from vistune.commands.flags import field_help
from vistune.config import GenerationConfig
from vistune.errors import VistuneError


def _config(*flags: str) -> GenerationConfig:
    parser = argparse.ArgumentParser(prog="vistune chat")
    chat.add_arguments(parser)
    return chat._generation_config(parser.parse_args(list(flags)))


def test_no_flags_give_the_defaults_chat_always_had():
    assert _config() == GenerationConfig(max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None)
    assert _config() == GenerationConfig()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-new-tokens", "7"], GenerationConfig(max_new_tokens=7)),
        (["--max-tokens", "5"], GenerationConfig(max_new_tokens=5)),  # the old name
        (["--temperature", "0.7"], GenerationConfig(temperature=0.7)),
        (["--top-p", "0.9"], GenerationConfig(top_p=0.9)),
        (["--seed", "3"], GenerationConfig(seed=3)),
        (["--temperature", "0.5", "--top-p", "0.8", "--max-tokens", "9", "--seed", "11"],
         GenerationConfig(max_new_tokens=9, temperature=0.5, top_p=0.8, seed=11)),
    ],
)  # fmt: skip
def test_each_flag_sets_its_field(flags, expected):
    assert _config(*flags) == expected


def test_help_is_the_dataclass_docstring(capsys):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_help(GenerationConfig)
    for field in chat.GENERATION_FLAGS:
        default = getattr(GenerationConfig(), field)
        assert f"{docs[field]} (default: {default})" in text
    assert "--max-new-tokens MAX_NEW_TOKENS, --max-tokens MAX_NEW_TOKENS" in text
    assert "--stop" not in text  # only the fields chat had flags for


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "--temperature must be at least 0 and finite, got -1.0"),
        (["--temperature", "nan"], "--temperature must be at least 0 and finite, got nan"),
        (["--top-p", "0"], "--top-p must be above 0 and at most 1, got 0.0"),
        (["--top-p", "1.5"], "--top-p must be above 0 and at most 1, got 1.5"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--max-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag(flags, message, tmp_path, capsys):
    with pytest.raises(VistuneError, match="^" + re.escape(message) + "$"):
        _config(*flags)
    # refused before the model loads: a missing model folder is not what is reported
    assert cli.main(["chat", "--model", str(tmp_path / "none"), "--prompt", "hi", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"vistune: error: {message}"]

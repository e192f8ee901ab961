"""vistune.commands.flags: flags, types and help come from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from vistune.commands.flags import (
    add_client_flags,
    add_dataclass_flags,
    client_config,
    config_from_flags,
    field_help,
    flag_values,
)
from vistune.config import ClientConfig
from vistune.errors import VistuneError


@dataclasses.dataclass(frozen=True)
class Toy:
    rate: float = 0.5
    """How fast, per step."""
    steps: int | None = None
    """How many; None: as many as needed."""
    name: str = "toy"
    fast: bool = True
    """Go fast."""


def test_flags_follow_the_fields_types_and_docstrings():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Toy)
    args = parser.parse_args(["--rate", "2", "--steps", "3", "--no-fast"])
    assert (args.rate, args.steps, args.name, args.fast) == (2.0, 3, "toy", False)
    text = parser.format_help()
    assert "How fast, per step. (default: 0.5)" in text
    assert field_help(Toy) == {"rate": "How fast, per step.",
                               "steps": "How many; None: as many as needed.", "fast": "Go fast."}  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "many"])


def test_given_only_tells_flags_given_from_those_left_out():
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Toy, only={"rate", "fast"}, given_only=True)
    args = parser.parse_args(["--fast"])
    assert vars(args) == {"rate": None, "fast": True}


def test_client_flags_make_a_client_config():
    parser = argparse.ArgumentParser()
    add_client_flags(parser)
    args = parser.parse_args(["--http-retries", "0", "--max-tokens", "9"])
    config = client_config(args, "http://127.0.0.1:9/v1", "m")
    assert config == ClientConfig("http://127.0.0.1:9/v1", "m", max_tokens=9, http_retries=0)


@dataclasses.dataclass(frozen=True)
class Listed:
    hosts: tuple[str, ...] = ()
    """Hosts to allow (repeat the flag)."""
    kinds: tuple[str, ...] = ("a", "b")
    limit: int | None = None


def test_a_tuple_field_is_a_repeated_flag_and_flag_values_build_the_config():
    """serve's --allow-image-host and datagen's --types came from hand-written flags."""
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Listed, checks={"kinds": lambda text: tuple(text.split(","))})
    args = parser.parse_args(["--hosts", "a.org", "--hosts", "b.org", "--kinds", "x,y"])
    assert Listed(**flag_values(args, Listed)) == Listed(("a.org", "b.org"), ("x", "y"))
    assert Listed(**flag_values(parser.parse_args([]), Listed)) == Listed()
    assert "Hosts to allow (repeat the flag). (default: ())" in " ".join(
        parser.format_help().split()
    )


def test_a_prefix_names_a_second_models_flags_and_aliases_keep_old_spellings():
    """eval scienceqa's judge: `--judge-temperature` beside the answering model's
    `--temperature`, with `--max-tokens` kept as the judge's old name."""
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Toy, only={"rate"})
    add_client_flags(parser, prefix="judge-", aliases={"max_tokens": ("--max-tokens",)})
    args = parser.parse_args(["--rate", "1", "--judge-temperature", "0.7", "--max-tokens", "9"])
    assert (args.rate, args.judge_temperature, args.judge_max_tokens) == (1.0, 0.7, 9)
    assert not hasattr(args, "temperature")
    config = client_config(args, "http://127.0.0.1:9/v1", "j", prefix="judge-")
    assert config == ClientConfig("http://127.0.0.1:9/v1", "j", temperature=0.7, max_tokens=9)
    again = parser.parse_args(["--judge-max-tokens", "9"])
    assert flag_values(again, ClientConfig, {"max_tokens"}, "judge-") == {"max_tokens": 9}
    assert "--judge-max-tokens MAX_TOKENS, --max-tokens MAX_TOKENS" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--temperature", "0.7"])  # no such flag: the judge's is prefixed


@dataclasses.dataclass(frozen=True)
class Checked:
    max_steps: int = 1
    """Steps to run."""
    rate: float = 0.5

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.rate > 1:
            raise ValueError("too fast")


def test_config_from_flags_names_the_flag_a_refused_value_came_from():
    """The check stays the dataclass's; chat's error line names the flag, not the field."""
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Checked, prefix="judge-")
    assert config_from_flags(parser.parse_args([]), Checked, prefix="judge-") == Checked()
    args = parser.parse_args(["--judge-max-steps", "0"])
    with pytest.raises(VistuneError, match=r"^--judge-max-steps must be at least 1, got 0$"):
        config_from_flags(args, Checked, prefix="judge-")
    with pytest.raises(VistuneError, match="^too fast$"):  # no field named: left as it is
        config_from_flags(parser.parse_args(["--judge-rate", "2"]), Checked, prefix="judge-")

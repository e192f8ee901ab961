"""vistune.commands.flag_types: a flag refuses a value in its setting's words (one rule each)."""

from __future__ import annotations

import argparse

import pytest

from vistune.commands.flag_types import (
    count,
    delay,
    positive_int,
    probability,
    seconds,
    temperature,
)
from vistune.config import ClientConfig, GenerationConfig

INTS = (positive_int, count)


@pytest.mark.parametrize(
    ("convert", "cls", "field", "text"),
    [
        (positive_int, GenerationConfig, "max_new_tokens", "0"),
        (temperature, GenerationConfig, "temperature", "-1"),
        (temperature, GenerationConfig, "temperature", "nan"),
        (probability, GenerationConfig, "top_p", "0"),
        (probability, GenerationConfig, "top_p", "1.5"),
        (probability, GenerationConfig, "top_p", "nan"),
        (positive_int, ClientConfig, "max_tokens", "0"),
        (seconds, ClientConfig, "timeout", "0"),
        (seconds, ClientConfig, "timeout", "inf"),
        (count, ClientConfig, "http_retries", "-1"),
        (delay, ClientConfig, "backoff", "nan"),
        (delay, ClientConfig, "max_backoff", "-0.5"),
        (temperature, ClientConfig, "temperature", "1e999"),
    ],
)
def test_a_flag_and_its_setting_refuse_a_value_in_the_same_words(convert, cls, field, text):
    """`vistune eval --temperature -1` (the flag's type) and `vistune chat --temperature -1`
    (GenerationConfig's check, the field renamed to the flag) say the same thing."""
    with pytest.raises(argparse.ArgumentTypeError) as flag:
        convert(text)
    value = (int if convert in INTS else float)(text)
    with pytest.raises(ValueError) as setting:
        cls(**{field: value})
    assert str(setting.value) == f"{field} {flag.value}"


@pytest.mark.parametrize(
    ("convert", "text", "value"),
    [
        (positive_int, "1", 1),
        (count, "0", 0),
        (seconds, "0.001", 0.001),
        (delay, "0", 0.0),
        (temperature, "0", 0.0),
        (probability, "1", 1.0),
    ],
)
def test_the_edge_of_each_range_is_taken(convert, text, value):
    assert convert(text) == value


def test_a_value_that_is_no_number_is_argparse_s_invalid_type():
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--temperature", type=temperature)
    with pytest.raises(argparse.ArgumentError, match="invalid temperature value: 'warm'"):
        parser.parse_args(["--temperature", "warm"])

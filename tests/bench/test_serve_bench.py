"""benchmarks/serve.py's demo-configuration row: the model it builds is the demo's."""

from __future__ import annotations

import argparse

import pytest

from vistune.commands import demo

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serve")


def test_demo_config_is_what_the_demo_trains(bench):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    defaults = parser.parse_args([])
    config = bench.demo_config()
    assert config.image_size == defaults.image_size == 126
    assert config.projector == "mlp2x_gelu_pos"
    assert config.template == "chat_template"  # stage 2's, the model the demo chats with

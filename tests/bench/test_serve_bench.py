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


def test_table_has_a_row_per_quantized_format(bench):
    r = {"eight_clients_tps": 100.0, "one_client_tps": 20.0, "follow_warm_s": 0.1,
         "follow_cold_s": 0.4, "decode_tps": 20.0, "direct_tps": 20.0, "llama_cpp_tps": 120.0,
         "int8_decode_tps": 42.0, "int8_same": 3, "int8_first_diff": [5, 0],
         "int4_decode_tps": 66.0, "int4_same": 8, "int4_first_diff": [],
         "ttft_image_s": 0.3, "ttft_image_size": 224, "ttft_image_tokens": 256,
         "demo_ttft_s": 0.15, "demo_image_size": 126, "demo_image_tokens": 81,
         "ttft_floor_s": 0.28, "ttft_inprocess_s": 0.32}  # fmt: skip
    lines = bench.table(r).splitlines()
    int8 = next(line for line in lines if "decode, `--quantize int8`" in line)
    int4 = next(line for line in lines if "decode, `--quantize int4`" in line)
    assert "| 42.0 tok/s | llama.cpp 120.0 tok/s | 0.35x | >= 0.5x: not met |" in int8
    assert "| 66.0 tok/s | llama.cpp 120.0 tok/s | 0.55x | >= 0.5x: met |" in int4
    assert any("`--quantize int8`: greedy answers equal to bf16's | 3 of 8 | first differing "
               "character: 5, 0 |" in line for line in lines)  # fmt: skip
    assert any("`--quantize int4`: greedy answers equal to bf16's | 8 of 8 | first differing "
               "character: - |" in line for line in lines)  # fmt: skip
    assert any("its products and attention alone | 0.280 s | the whole, in-process 0.320 s | "
               "0.88x | <= 0.2 s: not met |" in line for line in lines)  # fmt: skip
    assert any("demo configuration (126 px, 81 image tokens) | 0.150 s" in line and
               line.endswith("<= 0.2 s: met |") for line in lines)  # fmt: skip


def test_product_floor_replays_the_products_of_the_run(bench):
    """Every linear and attention call is replayed on its own tensors, and nothing else:
    a run that only adds records nothing."""
    import torch
    import torch.nn.functional as F

    seen = []
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def run():
        seen.append(1)
        y = linear(x)
        F.scaled_dot_product_attention(y[None, None], y[None, None], y[None, None])

    floor, calls = bench.product_floor(run, repeats=3)
    assert seen == [1]  # recorded once, replayed without calling run again
    assert calls == 2  # the linear and the attention; the slicing is not replayed
    assert 0 < floor < 1
    with pytest.raises(RuntimeError, match="no product"):
        bench.product_floor(lambda: x + 1)

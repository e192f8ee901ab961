"""benchmarks/train_profile.py's per-product accounting (`--breakdown --shapes`) and its
products-alone ceiling (`--ceiling`)."""

from __future__ import annotations

import types

import pytest
import torch

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def profile():
    return load_benchmark("train_profile")


def test_product_keys_tell_a_transposed_view_from_a_stored_transpose(profile):
    x = torch.randn(40, 8)
    dy = torch.randn(40, 6)
    view, flops = profile._product("mm", (x.t(), dy))
    stored, _ = profile._product("mm", (x.t().contiguous(), dy))
    assert view != stored
    assert view == ("mm", (8, 40), (1, 8), (40, 6), (6, 1), torch.float32)
    assert flops == 2 * 8 * 40 * 6


def test_product_flops_for_addmm_and_bmm(profile):
    bias = torch.zeros(5, 7)
    _, flops = profile._product("addmm", (bias, torch.randn(5, 3), torch.randn(3, 7)))
    assert flops == 2 * 5 * 3 * 7
    key, flops = profile._product("bmm", (torch.randn(4, 5, 3), torch.randn(4, 3, 7)))
    assert flops == 2 * 4 * 5 * 3 * 7 and key[1] == (4, 5, 3)
    assert profile._product("add", (bias, bias)) is None


def test_operands_rebuilt_with_the_step_s_strides(profile):
    t = profile._operand((8, 40), (1, 8), torch.bfloat16)
    assert t.shape == (8, 40) and t.stride() == (1, 8) and t.dtype == torch.bfloat16
    key, _ = profile._product("bmm", (torch.randn(4, 5, 3), torch.randn(4, 7, 3).transpose(1, 2)))
    assert profile._operand(*key[3:]).stride() == (21, 1, 3)
    assert profile.alone_seconds(key, seconds=0.001) > 0


def test_ceiling_is_model_flops_over_the_products_alone_against_the_peak(profile, monkeypatch):
    bench = types.SimpleNamespace(
        SQUARES=((2, 2, 2),),
        product_shapes=lambda cfg: [(4, 4, 4)],
        bf16_peak=lambda shapes: {"flops": 1e12, "shape": list(shapes[0])},
    )
    monkeypatch.setattr(profile, "_train_benchmark", lambda: bench)
    a = ("mm", (2, 3), (3, 1), (3, 4), (4, 1), torch.bfloat16)
    b = ("bmm", (2, 2, 3), (6, 3, 1), (2, 3, 4), (12, 4, 1), torch.bfloat16)
    alone = {a: 0.002, b: 0.010}
    monkeypatch.setattr(profile, "alone_seconds", lambda key: alone[key])
    products = {a: [10, 0.05, 4e10], b: [3, 0.04, 6e10]}
    result = profile.ceiling(products, useful_flops=9e10, cfg=None)
    assert result["products_alone_s"] == pytest.approx(10 * 0.002 + 3 * 0.010)
    assert result["products_in_step_s"] == pytest.approx(0.09)
    assert result["product_flops"] == pytest.approx(1e11)
    assert result["ceiling_share"] == pytest.approx(9e10 / 0.05 / 1e12)


def test_cold_products_benchmark_reports_both_rates():
    cold = load_benchmark("products_cold")
    r = cold.rates((64, 32), (32, 48), calls=2, rounds=3, pool=3, flush_mb=1)
    assert set(r) == {"warm", "cold", "cold_over_warm"} and r["warm"] > 0 and r["cold"] > 0
    assert cold.SHAPES["gate/up forward"](128) == ((128, 576), (576, 3072))

"""benchmarks/train_profile.py's per-product accounting (`--breakdown --shapes`)."""

from __future__ import annotations

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
    assert view == ("mm", (8, 40), (1, 8), (40, 6), (6, 1))
    assert flops == 2 * 8 * 40 * 6


def test_product_flops_for_addmm_and_bmm(profile):
    bias = torch.zeros(5, 7)
    _, flops = profile._product("addmm", (bias, torch.randn(5, 3), torch.randn(3, 7)))
    assert flops == 2 * 5 * 3 * 7
    key, flops = profile._product("bmm", (torch.randn(4, 5, 3), torch.randn(4, 3, 7)))
    assert flops == 2 * 4 * 5 * 3 * 7 and key[1] == (4, 5, 3)
    assert profile._product("add", (bias, bias)) is None

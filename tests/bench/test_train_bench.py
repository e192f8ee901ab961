"""benchmarks/train.py's arithmetic: the FLOPs it credits and the peak's shapes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train")


def test_attention_flops_match_a_count_of_the_causal_products(bench):
    """12·n_layer·d·C per token = QKᵀ and AV over each token's visible keys, 2 FLOPs a
    multiply-add, backward twice the forward: counted here position by position."""
    layers, width, lengths = 3, 8, [5, 12, 40]
    sizes = {"n_dec": 0, "n_proj": 0, "head": 0, "attn": layers * width, "image_tokens": 0}
    tokens = sum(lengths)
    context = sum(n * n for n in lengths) / tokens / 2
    macs = sum(2 * width * (i + 1) for n in lengths for i in range(n)) * layers
    counted = 3 * 2 * macs / tokens
    for stage in ("pretrain", "finetune"):
        credited = bench.flops_per_token(sizes, stage, tokens / len(lengths), 0.0, context)
        # the formula takes L^2/2 keys a sample where the count is L(L+1)/2
        assert credited == pytest.approx(counted, rel=0.05)
        assert credited < counted


def test_weight_flops_per_stage(bench):
    sizes = {"n_dec": 100, "n_proj": 10, "head": 50, "attn": 0, "image_tokens": 4}
    assert bench.flops_per_token(sizes, "finetune", 8.0, 0.5, 0.0) == 600 + 30 + 150
    assert bench.flops_per_token(sizes, "pretrain", 8.0, 0.5, 0.0) == 400 + 30 + 100


def test_peak_shapes_are_the_decoders_products(bench):
    cfg = SimpleNamespace(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    shapes = bench.product_shapes(cfg, rows=4096)
    for k, n in ((576, 576), (576, 192), (576, 3072), (576, 1536), (1536, 576), (3072, 576)):
        assert (4096, k, n) in shapes
    assert len(shapes) == len(set(shapes)) == 7


def test_peak_reports_the_fastest_shape(bench):
    out = bench.bf16_peak([(64, 64, 64), (128, 128, 128)], seconds=0.05)
    assert out["shape"] in ([64, 64, 64], [128, 128, 128])
    assert out["flops"] > 0
    assert out["squares_flops"] == 0.0  # neither is one of the large squares

"""build_projector: the paper's linear W, LLaVA-1.5's mlp2x_gelu, and it with a position table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vistune.model.projector import PROJECTORS, build_projector


def test_linear_is_one_matrix_and_bias():
    proj = build_projector("linear", 32, 48)
    assert isinstance(proj, nn.Linear)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(proj(x), x @ proj.weight.T + proj.bias)


def test_mlp2x_gelu_is_linear_gelu_linear():
    proj = build_projector("mlp2x_gelu", 32, 48)
    assert [type(m) for m in proj] == [nn.Linear, nn.GELU, nn.Linear]
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    x = torch.randn(2, 5, 32)
    expected = proj[2](torch.nn.functional.gelu(proj[0](x)))
    out = proj(x)
    assert out.shape == (2, 5, 48)
    torch.testing.assert_close(out, expected)


def test_unknown_projector_lists_valid_names():
    with pytest.raises(ValueError, match="unknown projector 'qformer'; valid: linear, mlp2x_gelu"):
        build_projector("qformer", 32, 48)
    assert set(PROJECTORS) == {"linear", "mlp2x_gelu", "mlp2x_gelu_pos"}
    with pytest.raises(ValueError, match="positive"):
        build_projector("linear", 0, 48)


def test_mlp2x_gelu_pos_adds_one_learned_row_per_token():
    proj = build_projector("mlp2x_gelu_pos", 32, 48, tokens=5)
    assert sorted(proj.state_dict()) == [
        "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "position"
    ]  # fmt: skip
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(proj(x), proj.mlp(x))  # zeros when fresh: mlp2x_gelu
    with torch.no_grad():
        proj.position.copy_(torch.arange(5.0)[:, None].expand(5, 48))
    torch.testing.assert_close(proj(x) - proj.mlp(x), proj.position.expand(2, 5, 48))
    with pytest.raises(
        ValueError, match="4 image tokens, but the projector's position table has 5"
    ):
        proj(x[:, :4])
    with pytest.raises(ValueError, match="needs the number of image tokens"):
        build_projector("mlp2x_gelu_pos", 32, 48)

"""build_projector: the paper's linear W and LLaVA-1.5's mlp2x_gelu."""

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
    assert set(PROJECTORS) == {"linear", "mlp2x_gelu"}
    with pytest.raises(ValueError, match="positive"):
        build_projector("linear", 0, 48)

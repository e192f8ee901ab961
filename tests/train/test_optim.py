"""vistune.train.optim.clip_and_step: the clip folded into fused AdamW's grad_scale."""

from __future__ import annotations

import pytest
import torch

from vistune.train.optim import NonFiniteGradientError, build_optimizer, clip_and_step


def _params_and_grads(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 3 for s in shapes]
    return params, grads


@pytest.mark.parametrize("max_norm", [0.5, 1e6, 0.0])  # clipping, no clipping needed, off
def test_fused_clip_and_step_equals_clip_grad_norm_then_step(max_norm):
    results = []
    for fused in (True, False):
        params, grads = _params_and_grads()
        optimizer = build_optimizer(params, lr=0.1, weight_decay=0.01, fused=fused)
        norms = []
        # gradients of different sizes per step: Adam is blind to one constant factor
        for step in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g * 10.0**step
            norms.append(clip_and_step(optimizer, params, max_norm))
            optimizer.zero_grad(set_to_none=True)
        results.append(([p.detach().clone() for p in params], torch.stack(norms)))
    (fused_params, fused_norms), (plain_params, plain_norms) = results
    torch.testing.assert_close(fused_norms, plain_norms)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _params_and_grads()[1]]))
    torch.testing.assert_close(fused_norms[0], expected)  # the norm before clipping
    for a, b in zip(fused_params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_clipping_changes_the_update():
    """The factor reaches the update: with gradients 10x larger on the second step, clipping
    both to the same norm moves the weights differently from not clipping."""
    updates = []
    for max_norm in (1e-3, 0.0):
        params, grads = _params_and_grads()
        optimizer = build_optimizer(params, lr=0.1, weight_decay=0.0, fused=True)
        for step in range(2):
            for p, g in zip(params, grads, strict=True):
                p.grad = g * 10.0**step
            clip_and_step(optimizer, params, max_norm)
        updates.append(params[0].detach().clone())
    assert not torch.allclose(updates[0], updates[1])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_raises_before_the_step(fused, bad):
    params, grads = _params_and_grads()
    before = [p.detach().clone() for p in params]
    optimizer = build_optimizer(params, lr=0.1, weight_decay=0.01, fused=fused)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    params[1].grad[2] = bad
    with pytest.raises(NonFiniteGradientError, match=f"gradient norm is {bad}"):
        clip_and_step(optimizer, params, 1.0)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)

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


def _decay_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))


@pytest.mark.parametrize("fused", [True, False])
def test_biases_and_norm_weights_are_not_decayed(fused):
    """As HF Trainer (which LLaVA trains with): weight decay on matrices only."""
    model = _decay_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(list(model.parameters()), lr=0.1, weight_decay=0.5, fused=fused)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own update is then 0: only the decay moves
    clip_and_step(optimizer, list(model.parameters()), 1.0)
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["0.weight"].detach(), before["0.weight"] * (1 - 0.1 * 0.5))
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name].detach(), before[name]), name


def test_a_resumed_optimizer_takes_the_runs_weight_decay(tmp_path):
    """A resume may change weight_decay (it is named as a changed setting): the new value
    applies, not the checkpoint's, and the moments are the checkpoint's."""
    from vistune.train.optim import load_optimizer, optimizer_state, save_optimizer

    model = _decay_model()
    params = list(model.parameters())
    optimizer = build_optimizer(params, lr=0.1, weight_decay=0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    clip_and_step(optimizer, params, 1.0)
    save_optimizer(optimizer_state(model, optimizer), tmp_path)
    for p in params:
        p.grad = None
    resumed = build_optimizer(params, lr=0.1, weight_decay=0.25)
    load_optimizer(model, resumed, tmp_path)
    decays = {id(p): g["weight_decay"] for g in resumed.param_groups for p in g["params"]}
    assert [decays[id(p)] for p in params] == [0.25, 0.0, 0.0, 0.0]
    for p in params:
        torch.testing.assert_close(resumed.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def test_a_one_group_checkpoint_from_before_the_decay_groups_resumes(tmp_path):
    """Checkpoints written before biases and norms left weight decay hold one parameter
    group: a resume regroups them by the saved moments' dimensions and takes each
    parameter's moments, instead of refusing the checkpoint."""
    from vistune.train.optim import load_optimizer, optimizer_state, save_optimizer

    model = _decay_model()
    params = list(model.parameters())
    old = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)  # one group, as before
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, float(i + 1))
    old.step()
    save_optimizer(optimizer_state(model, old), tmp_path)
    for p in params:
        p.grad = None  # as in a new process
    resumed = build_optimizer(params, lr=0.1, weight_decay=0.5)
    assert len(resumed.param_groups) == 2
    load_optimizer(model, resumed, tmp_path)
    for p in params:
        torch.testing.assert_close(resumed.state[p]["exp_avg"], old.state[p]["exp_avg"])
        torch.testing.assert_close(resumed.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    decays = {id(p): g["weight_decay"] for g in resumed.param_groups for p in g["params"]}
    assert [decays[id(p)] for p in params] == [0.5, 0.0, 0.0, 0.0]

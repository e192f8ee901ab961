"""AdamW, the warmup + cosine learning-rate schedule, and optimizer state as safetensors.

LLaVA trains with HF Trainer's defaults: AdamW (no weight decay), linear warmup over 3% of
the steps, then cosine decay to 0. The schedule is a pure function of the step, so resuming
needs only the step; the optimizer's moments go to safetensors + JSON (no pickles).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from vistune.errors import VistuneError


def lr_at(step: int, total_steps: int, peak: float, warmup_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to 0.

    transformers' get_cosine_schedule_with_warmup with num_warmup_steps =
    ceil(warmup_ratio * total_steps), but for the warmup: step k gets (k + 1) / warmup of
    the peak, where transformers gives k / warmup, so that its first step (lr 0) is not a
    step that changes nothing. From the end of the warmup on the curves are the same.
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup if warmup else peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    params: list[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    fused: bool = True,
    scales: list[float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (fp32 master weights).

    Weight decay applies to matrices only, not to biases and norm weights (the 1-D tensors),
    as HF Trainer's get_decay_parameter_names. `fused` runs one kernel over all parameters
    (CPU and CUDA): the update is memory-bound, and the fused kernel reads each tensor once
    instead of once per elementwise op.

    `scales` (one per parameter) multiply the learning rate of their parameters: each group
    carries its `lr_scale`, which the training loop applies to the scheduled rate. Groups
    go by scale, in order of first appearance, matrices before 1-D tensors within each.
    """
    if not params:
        raise VistuneError("nothing to train: every parameter is frozen")
    scales = scales or [1.0] * len(params)
    groups = []
    for scale in dict.fromkeys(scales):
        mine = [p for p, s in zip(params, scales, strict=True) if s == scale]
        groups += [
            {"params": [p for p in mine if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0},
        ]
        for group in groups[-2:]:
            group["lr_scale"] = scale
    groups = [g for g in groups if g["params"]]
    if fused:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


class NonFiniteGradientError(VistuneError):
    """The gradients' norm is inf or NaN: the step was not taken."""


def _checked(norm: torch.Tensor) -> torch.Tensor:
    value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not math.isfinite(value):
        raise NonFiniteGradientError(f"the gradient norm is {value}")
    return norm


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float
) -> torch.Tensor:
    """clip_grad_norm_(params, max_norm) (0: no clipping), then optimizer.step(); returns
    the gradients' norm before clipping. A non-finite norm raises NonFiniteGradientError
    before the step, so the weights stay as they were.

    A fused AdamW divides the gradients by its `grad_scale` as it reads them (the hook
    GradScaler uses), so the clip factor goes there instead of into a pass that multiplies
    every gradient first: one read and write of all gradients less per step (~28 ms of a
    3.8 s stage-2 step on the CPU here)."""
    if not optimizer.defaults.get("fused"):
        norm = _checked(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    _checked(norm)
    # as clip_grad_norm_: gradients times min(1, max_norm / (norm + 1e-6))
    scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0) if max_norm else None
    optimizer.grad_scale = scale  # read by Adam(W).step
    optimizer.step()
    return norm


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full (unsharded) optimizer state keyed by parameter name; collective under FSDP."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def save_optimizer(state: dict, folder: Path) -> None:
    """Write optimizer.safetensors (moments, step) and optimizer.json (param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{name}::{key}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in state["param_groups"]
    ]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))


def load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, from_rank0: bool = False
) -> None:
    """Restore what save_optimizer wrote into `optimizer` (every rank calls this).

    The moments and step counts come from the checkpoint, the hyperparameters from
    `optimizer` as this run built it: a resume may change weight_decay (lr is set per step).
    `from_rank0` (FSDP): only rank 0 reads the file and sends each tensor, every rank keeping
    its shard, so host memory holds one full copy of the moments, not one per process.
    """
    if from_rank0 and torch.distributed.get_rank() != 0:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, {}, options=options)
        return
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        param, key = name.rsplit("::", 1)
        state.setdefault(param, {})[key] = value
    if len(groups) != len(optimizer.param_groups):
        groups = _regrouped(groups, state, len(optimizer.param_groups))
    if len(groups) != len(optimizer.param_groups):
        raise VistuneError(
            f"{folder}: {len(groups)} optimizer parameter groups, this run has "
            f"{len(optimizer.param_groups)}"
        )
    for group, now in zip(groups, optimizer.param_groups, strict=True):
        group.update({k: v for k, v in now.items() if k != "params"})
    full = {"state": state, "param_groups": groups}
    options = _FULL
    if from_rank0:
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, full, options=options)


def _regrouped(groups: list[dict], state: dict[str, dict[str, torch.Tensor]], want: int) -> list:
    """A checkpoint's parameter names regrouped as build_optimizer groups them now
    (matrices, then 1-D tensors), for checkpoints written before weight decay skipped the
    1-D tensors (one group). A parameter's dimensions come from its saved moment, which is
    unsharded. Unchanged when some parameter has no moment or the count still differs."""
    names = [name for group in groups for name in group["params"]]
    if any("exp_avg" not in state.get(name, {}) for name in names):
        return groups
    matrices = [n for n in names if state[n]["exp_avg"].ndim >= 2]
    vectors = [n for n in names if state[n]["exp_avg"].ndim < 2]
    regrouped = [{**groups[0], "params": part} for part in (matrices, vectors) if part]
    return regrouped if len(regrouped) == want else groups

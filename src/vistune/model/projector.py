"""The projector W joining the vision features to the LLM's word embeddings (paper §4.1).

`linear` is the paper's eq. (1), H_v = W · Z_v. `mlp2x_gelu` (Linear, GELU, Linear) is
LLaVA-1.5's ("Improved Baselines with Visual Instruction Tuning", Liu et al. 2023): better,
and the layout the Hugging Face Llava classes hold (linear_1, act, linear_2). Built from
a name through the explicit dict `PROJECTORS`, as LLaVA's `build_vision_projector`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    # Keys "0.*" and "2.*": the HF Llava export maps them to linear_1 / linear_2.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


PROJECTORS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": _linear,
    "mlp2x_gelu": _mlp2x_gelu,
}


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """A projector (N, T, in_dim) -> (N, T, out_dim) by name; unknown name -> ValueError."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid: {', '.join(PROJECTORS)}")
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"projector dims must be positive, got {in_dim} -> {out_dim}")
    return PROJECTORS[name](in_dim, out_dim)

"""The projector W joining the vision features to the LLM's word embeddings (paper §4.1).

`linear` is the paper's eq. (1), H_v = W · Z_v. `mlp2x_gelu` (Linear, GELU, Linear) is
LLaVA-1.5's ("Improved Baselines with Visual Instruction Tuning", Liu et al. 2023): better,
and the layout the Hugging Face Llava classes hold (linear_1, act, linear_2). Built from
a name through the explicit dict `PROJECTORS`, as LLaVA's `build_vision_projector`.

`mlp2x_gelu_pos` adds a learned table of one vector per image token to the MLP's output:
an absolute 2-D position code, as the position embeddings of Qwen-VL's adapter or
Honeybee's C-Abstractor. A per-token MLP sees one patch's features, which carry where the
patch is only faintly, so "where is the red star?" had to be learned by the LLM from the
token's index (docs/LEARNING.md); with the table, a token says where it is in its own
content. The grounded alignment (vistune.train.ground) starts the table at the LLM's word
embeddings of each cell's third of the picture ("top left"). Zeros when fresh: the same
function as `mlp2x_gelu` until trained. Not the Hugging Face Llava layout (no export there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PositionedMLP(nn.Module):
    """mlp2x_gelu(x) + position[t] for token t. # (N, T, in) -> (N, T, out)"""

    def __init__(self, in_dim: int, out_dim: int, tokens: int) -> None:
        super().__init__()
        self.mlp = _mlp2x_gelu(in_dim, out_dim)
        self.position = nn.Parameter(torch.zeros(tokens, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-2] != self.position.shape[0]:
            raise ValueError(
                f"{features.shape[-2]} image tokens, but the projector's position table has "
                f"{self.position.shape[0]} (built for another image size or token selection)"
            )
        return self.mlp(features) + self.position.to(features.dtype)


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    # Keys "0.*" and "2.*": the HF Llava export maps them to linear_1 / linear_2.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


PROJECTORS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "linear": lambda i, o, _: _linear(i, o),
    "mlp2x_gelu": lambda i, o, _: _mlp2x_gelu(i, o),
    "mlp2x_gelu_pos": PositionedMLP,
}


def build_projector(name: str, in_dim: int, out_dim: int, tokens: int = 0) -> nn.Module:
    """A projector (N, T, in_dim) -> (N, T, out_dim) by name; unknown name -> ValueError.
    `tokens` (T) sizes the position table of `mlp2x_gelu_pos`."""
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; valid: {', '.join(PROJECTORS)}")
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"projector dims must be positive, got {in_dim} -> {out_dim}")
    if name == "mlp2x_gelu_pos" and tokens <= 0:
        raise ValueError(f"{name} needs the number of image tokens, got {tokens}")
    return PROJECTORS[name](in_dim, out_dim, tokens)

"""The maths of a Llama decoder that vistune runs itself, and which LLMs it fits.

vistune has two forward passes of its own over a Hugging Face Llama-family LLM: training on
the CPU with a hand-written backward (vistune.train.llama_cpu) and generation with a KV
cache allocated once (vistune.serve.decoder). Both are transformers' LlamaDecoderLayer
(transformers/models/llama/modeling_llama.py) read from the LLM's own modules, which are
neither subclassed nor patched. What the two share lives here:

- which LLMs: `supports(llm)` (this maths reproduces its forward), `trains(llm, device)`
  (a micro-batch of it can train through llama_cpu), `fuses(device)` (q/k/v and gate/up
  are multiplied as one matrix each, a concatenated copy of the weights);
- a layer's weights (`block_weights`) and their fused layout (`fuse`): q, k, v rows stacked
  into one (H hd + 2 Hkv hd, D) matrix, gate and up into one (2 I, D);
- RMSNorm (`rms`, `rms_backward`, `rms_norm`);
- rotary embeddings with rotate_half's minus sign moved into the sine (`rope_tables`,
  `rope`, `rope_backward`): x * cos + swap(x) * cat(-sin1, sin2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("llama",)
"""Tested against transformers' forward; other architectures use transformers' modules."""
ROPE_TYPES = ("default", None, "linear", "llama3", "yarn", "dynamic")
"""Rotary embeddings tested equal to transformers' through these passes (cos and sin come
from the model's own rotary module, which does the scaling)."""


def supports(llm: nn.Module) -> bool:
    """Whether this maths reproduces `llm`'s forward: plain Llama blocks of plain nn.Linear
    projections without biases, every layer module run, a rotary embedding of ROPE_TYPES."""
    cfg = getattr(llm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    plain = (
        getattr(cfg, "hidden_act", "silu") == "silu"
        and not getattr(cfg, "attention_bias", False)
        and not getattr(cfg, "mlp_bias", False)
        and getattr(cfg, "sliding_window", None) is None
        and getattr(cfg, "pretraining_tp", 1) == 1
    )
    if not (plain and hasattr(llm, "model") and hasattr(llm, "lm_head")):
        return False
    layers = getattr(llm.model, "layers", None)
    if not layers:  # e.g. a peft wrapper around the LLM
        return False
    # transformers runs layers[:num_hidden_layers]; these passes run every layer module
    if len(layers) != getattr(cfg, "num_hidden_layers", None):
        return False
    # transformers 5 keeps `rope_scaling` only as a deprecated alias of `rope_parameters`
    rope_cfg = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if any(isinstance(v, dict) for v in rope_cfg.values()):  # per layer type: not a Llama's
        return False
    if rope_cfg.get("rope_type", rope_cfg.get("type", "default")) not in ROPE_TYPES:
        return False
    # Plain nn.Linear without a bias only: a LoRA-wrapped projection's .weight lacks its
    # adapter's delta, and a bias the config does not announce would be left out.
    linears = [llm.lm_head]
    for block in layers:
        att, mlp = block.self_attn, block.mlp
        linears += [att.q_proj, att.k_proj, att.v_proj, att.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return all(type(m) is nn.Linear and m.bias is None for m in linears)


def trains(llm: nn.Module, device: torch.device) -> bool:
    """Whether a micro-batch of `llm` can train through vistune.train.llama_cpu: `supports`,
    on the CPU, transformers' gradient checkpointing off (that path keeps its own
    activations), no attention dropout (it has none)."""
    if device.type != "cpu" or not supports(llm):
        return False
    checkpointing = (
        llm.is_activation_checkpointing  # transformers >= 5.x
        if hasattr(type(llm), "is_activation_checkpointing")
        else getattr(llm, "is_gradient_checkpointing", False)
    )
    return not checkpointing and not getattr(llm.config, "attention_dropout", 0.0)


def fuses(device: torch.device) -> bool:
    """Whether a pass multiplies q/k/v and gate/up as one matrix each on `device`, from a
    concatenated copy of the weights (`fuse`).

    On the CPU: one matrix-vector product over the fused rows is faster than three (a bf16
    decode step about 20% faster here), and training casts the weights once a step anyway.
    Elsewhere (GPUs) the LLM's own weights are multiplied one by one: a copy would hold
    about two thirds of the model's weights twice, and no faster path is measured there."""
    return device.type == "cpu"


@dataclass(frozen=True)
class Dims:
    """Attention sizes of a Llama config."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def dims(cfg: object) -> Dims:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Dims(heads, cfg.num_key_value_heads, head_dim)


class Block(NamedTuple):
    """The weights of one LlamaDecoderLayer, the LLM's own parameters."""

    norm_in: torch.Tensor  # (D,)
    q: torch.Tensor  # (H*hd, D)
    k: torch.Tensor  # (Hkv*hd, D)
    v: torch.Tensor  # (Hkv*hd, D)
    o: torch.Tensor  # (D, H*hd)
    norm_post: torch.Tensor  # (D,)
    gate: torch.Tensor  # (I, D)
    up: torch.Tensor  # (I, D)
    down: torch.Tensor  # (D, I)


def block_weights(block: nn.Module) -> Block:
    att, mlp = block.self_attn, block.mlp
    return Block(
        block.input_layernorm.weight,
        att.q_proj.weight,
        att.k_proj.weight,
        att.v_proj.weight,
        att.o_proj.weight,
        block.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
    )


def fuse(
    parts: tuple[torch.Tensor, ...],
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights stacked row-wise in `dtype`, a new tensor (or written into `out`): (q, k, v)
    -> (H hd + 2 Hkv hd, D), (gate, up) -> (2 I, D), the layout both passes multiply."""
    with torch.no_grad():
        if out is None:
            return torch.cat(parts).to(dtype or parts[0].dtype)
        return torch.cat(parts, out=out) if len(parts) > 1 else out.copy_(parts[0])


def rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm in fp32: rms_apply(h, r, w) and r = 1/sqrt(mean(h^2) + eps), the scale
    a backward needs. # (N, D), (N, 1)"""
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return rms_apply(h, r, w), r


def rms_apply(h: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(h * r) * w; called with h.T, r.T, w[:, None] it gives the transpose of the same
    values, bit for bit."""
    return (h * r) * w


def rms_backward(
    dy: torch.Tensor, h: torch.Tensor, r: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `rms` for h (fp32) and, summed over rows, w. dy any float dtype."""
    xhat = h * r  # (N, D) fp32
    dxhat = dy.float() * w
    c = (dxhat * xhat).mean(-1, keepdim=True)
    return (dxhat - xhat * c) * r, (dy.float() * xhat).sum(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x in its dtype (no scale kept for a backward), `weight` in x's dtype.
    # (..., D)

    fp32: F.rms_norm, `rms`'s maths in one kernel. Lower precision: one fp32-accumulated
    vector_norm and a scale in x's dtype, 3-4x faster here than F.rms_norm on (T, D) bf16
    rows and within two bf16 roundings of transformers' result."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    scale = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps)).to(x.dtype)
    return x * scale * weight


@torch.no_grad()
def rope_tables(
    rotary: nn.Module, like: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and the signed sine cat(-sin1, sin2) at `positions` (B, L), from the model's own
    rotary module (`like` gives it the dtype and device), cast to `dtype`. # (B, L, hd) x2"""
    cos, sin = rotary(like, positions)
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return (cos, signed) if dtype is None else (cos.to(dtype), signed.to(dtype))


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: transformers' apply_rotary_pos_emb, x * cos + rotate_half(x) * sin,
    with rotate_half's minus sign in `signed_sin`. x (..., hd)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).addcmul_(swapped, signed_sin)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Transpose of `rope`: dx = dy * cos + swap(dy * signed_sin), the half swap being its
    own inverse."""
    half = dy.shape[-1] // 2
    t = dy * signed_sin
    return dy * cos + torch.cat((t[..., half:], t[..., :half]), dim=-1)

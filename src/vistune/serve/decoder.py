"""The LLM forward for generation on Llama-architecture LLMs (SmolLM2, Llama, Vicuna).

Why: on the CPU a decode step is a chain of matrix-*vector* products, bound by memory
bandwidth and kernel choice. Measured here (docs/PERFORMANCE.md) PyTorch's `mm` for one
row in bf16 is slower than fp32, while `torch.mv` in bf16 is ~2x faster than fp32's `mm`;
and transformers' `DynamicCache` re-concatenates the whole KV cache every step (12% of a
fp32 step). So generation runs here: the same maths as transformers' Llama, read from the
LLM's own modules (weights shared; q/k/v and gate/up fused once), a KV cache allocated once
for prompt + new tokens, `torch.mv` for a single row, and the model's own rotary module.
The prompt goes through in one pass (prefill) with a causal + left-padding mask; decode
steps keep the residual stream in fp32.

The LLM's classes are neither subclassed nor patched; `supports(llm)` says which models
this reproduces (tests compare its logits with transformers' forward, fp32 and bf16);
other LLMs generate through transformers' forward (vistune.serve.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama",)
"""Tested against transformers' forward; other architectures use the generic path."""


def supports(llm: torch.nn.Module) -> bool:
    """Whether `LlamaDecoder` reproduces this LLM's forward (plain Llama-style blocks)."""
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
    if not getattr(llm.model, "layers", None):  # e.g. a peft wrapper around the LLM
        return False
    # Plain nn.Linear without a bias only: a LoRA-wrapped projection's .weight lacks its
    # adapter's delta, and a bias the config does not announce would be left out.
    linears = [llm.lm_head]
    for block in getattr(llm.model, "layers", []):
        att, mlp = block.self_attn, block.mlp
        linears += [att.q_proj, att.k_proj, att.v_proj, att.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return all(type(m) is torch.nn.Linear and m.bias is None for m in linears)


def _rms(x: torch.Tensor, weights: dict[torch.dtype, torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm (LlamaRMSNorm's maths) with the weight copy in x's dtype. # (..., D)

    fp32 (decode steps): F.rms_norm. bf16 (prefill): one fp32-accumulated vector_norm and a
    scale in bf16, 3-4x faster here than F.rms_norm on (T, D) and within two bf16
    roundings of transformers' result."""
    weight = weights[x.dtype]
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (..., 1)
    scale = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps)).to(x.dtype)
    return x * scale * weight


def _norm_weights(weight: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
    """The norm weight in fp32 (decode steps) and in the model's dtype (prefill)."""
    return {torch.float32: weight.float(), weight.dtype: weight}


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., Din) @ w.T (Dout, Din) in w's dtype, returned in x's dtype; mv for one row."""
    xw = x.to(w.dtype)
    if x.numel() == x.shape[-1]:
        return torch.mv(w, xw.reshape(-1)).to(x.dtype).view(*x.shape[:-1], -1)
    return F.linear(xw, w).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' apply_rotary_pos_emb with rotate_half's minus sign
    moved into `signed_sin` (cat(-sin1, sin2)). x (B, H, T, hd)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).addcmul_(swapped, signed_sin)


@dataclass
class _Layer:
    qkv: torch.Tensor  # (H*hd + 2*Hkv*hd, D)
    o: torch.Tensor  # (D, H*hd)
    gate_up: torch.Tensor  # (2*I, D)
    down: torch.Tensor  # (D, I)
    norm_in: dict[torch.dtype, torch.Tensor]  # (D,) per dtype
    norm_post: dict[torch.dtype, torch.Tensor]  # (D,) per dtype
    eps: float


@dataclass
class DecodeState:
    """Pre-allocated KV cache + attention mask for a batch being decoded."""

    keys: list[torch.Tensor]  # per layer (B, Hkv, S_max, hd)
    values: list[torch.Tensor]  # per layer (B, Hkv, S_max, hd)
    mask: torch.Tensor  # (B, S_max) bool, True = attend
    length: int  # filled positions


class LlamaDecoder:
    """Decode steps over a Llama-family HF causal LM (see module docstring)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        if not supports(llm):
            raise ValueError(f"LlamaDecoder supports plain {', '.join(SUPPORTED_TYPES)} models")
        cfg, model = llm.config, llm.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.rotary = model.rotary_emb
        self.embed = llm.get_input_embeddings()
        self.lm_head = llm.lm_head.weight  # (V, D)
        self.dtype = self.lm_head.dtype
        with torch.no_grad():
            self.layers = [self._layer(block) for block in model.layers]
            self.norm = _norm_weights(model.norm.weight)
        self.norm_eps = model.norm.variance_epsilon

    @staticmethod
    def _layer(block: torch.nn.Module) -> _Layer:
        att, mlp = block.self_attn, block.mlp
        return _Layer(
            qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
            o=att.o_proj.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
            norm_in=_norm_weights(block.input_layernorm.weight),
            norm_post=_norm_weights(block.post_attention_layernorm.weight),
            eps=block.input_layernorm.variance_epsilon,
        )

    def allocate(self, attention_mask: torch.Tensor, extra: int) -> DecodeState:
        """Empty KV buffers for a (B, L) prompt plus `extra` generated tokens."""
        batch, length = attention_mask.shape
        shape = (batch, self.kv_heads, length + extra, self.head_dim)
        device = attention_mask.device
        # Zeroed: never-written slots are masked, but uninitialised memory could hold NaNs.
        buffers = torch.zeros((2, len(self.layers), *shape), dtype=self.dtype, device=device)
        keys, values = list(buffers[0]), list(buffers[1])
        mask = torch.zeros(batch, length + extra, dtype=torch.bool, device=device)
        return DecodeState(keys, values, mask, 0)

    @staticmethod
    def select(state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Keep only the batch rows in `index` (finished rows leave)."""
        return DecodeState(
            [k[index] for k in state.keys],
            [v[index] for v in state.values],
            state.mask[index],
            state.length,
        )

    def _attention_mask(self, state: DecodeState, new: torch.Tensor) -> torch.Tensor | None:
        """Additive float (B, 1, T, S) mask for T new positions over S = filled + T keys, or
        None: plain causal for a prompt without padding, nothing for one step without.
        A padding query sees only itself, so its row is never all-masked (that would make
        NaNs that leak through the KV cache)."""
        t0, steps = state.length, new.shape[1]
        keys = state.mask[:, None, None, : t0 + steps]  # (B, 1, 1, S)
        if (steps == 1 or t0 == 0) and bool(keys.all()):
            return None
        allowed = keys
        if steps > 1:
            key_pos = torch.arange(t0 + steps, device=new.device)
            query_pos = torch.arange(t0, t0 + steps, device=new.device)[:, None]
            allowed = (keys & (key_pos[None] <= query_pos)) | (key_pos[None] == query_pos)
        zero = torch.zeros((), dtype=self.dtype, device=new.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)  # (B, 1, T, S)

    @torch.inference_mode()
    def forward(
        self,
        state: DecodeState,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        new_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run T new positions (B, T, D) at `positions` (B, T) through the LLM, appending
        their keys/values to `state`; float32 logits of the last position. # (B, V)"""
        batch, steps = embeds.shape[:2]
        t0, t1 = state.length, state.length + embeds.shape[1]
        if t1 > state.mask.shape[1]:
            raise ValueError("the decode buffers are full")
        new = (
            torch.ones(batch, steps, dtype=torch.bool, device=embeds.device)
            if new_mask is None
            else new_mask.bool()
        )
        state.mask[:, t0:t1] = new
        attn_mask = self._attention_mask(state, new)
        # One row per step: keep the residual stream in fp32 (the casts are tiny). A prefill
        # works in the weights' dtype, as transformers does: casting (T, D) activations
        # around every matrix product costs more than the bf16 products save.
        h = embeds.to(torch.float32 if steps == 1 else self.dtype, copy=True)  # (B, T, D)
        cos, sin = self.rotary(h, positions)  # (B, T, hd)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        hd, nq, nkv = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms(h, layer.norm_in, layer.eps)
            qkv = _mm(x, layer.qkv)  # (B, T, (H + 2 Hkv) hd)
            qk = qkv[..., : nq + nkv].view(batch, steps, -1, hd).transpose(1, 2)
            qk = rope(qk, cos, sin)  # (B, H + Hkv, T, hd)
            keys, values = state.keys[i], state.values[i]
            keys[:, :, t0:t1] = qk[:, self.heads :]
            values[:, :, t0:t1] = qkv[..., nq + nkv :].view(batch, steps, -1, hd).transpose(1, 2)
            att = F.scaled_dot_product_attention(
                qk[:, : self.heads].to(keys.dtype),
                keys[:, :, :t1],
                values[:, :, :t1],
                attn_mask=attn_mask,
                is_causal=attn_mask is None and steps > 1 and t0 == 0,
                enable_gqa=self.heads != self.kv_heads,
            )  # (B, H, T, hd)
            h += _mm(att.transpose(1, 2).reshape(batch, steps, nq).to(h.dtype), layer.o)
            x = _rms(h, layer.norm_post, layer.eps)
            gate, up = _mm(x, layer.gate_up).chunk(2, dim=-1)  # (B, T, I) each
            h += _mm(F.silu(gate).mul_(up), layer.down)
        state.length = t1
        return _mm(_rms(h[:, -1], self.norm, self.norm_eps), self.lm_head).float()  # (B, V)

    def step(
        self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Feed one token per row (B,) at `positions` (B,); float32 logits (B, V)."""
        with torch.inference_mode():
            embeds = self.embed(tokens[:, None])  # (B, 1, D)
        return self.forward(state, embeds, positions[:, None])

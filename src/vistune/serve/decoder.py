"""A fast single-token decode step for Llama-family LLMs (SmolLM2, Llama, Mistral-like).

Why: on the CPU a decode step is a chain of matrix-*vector* products, bound by memory
bandwidth and kernel choice. Measured here (docs/PERFORMANCE.md) PyTorch's `mm` for one
row in bf16 is slower than fp32, while `torch.mv` in bf16 is ~2x faster than fp32's `mm`;
and transformers' `DynamicCache` re-concatenates the whole KV cache every step (12% of a
step). So after the prefill (transformers' own forward, where bf16 matmuls are fast) the
decode steps run here: the same maths read from the LLM's own modules (weights shared,
q/k/v and gate/up fused once), `torch.mv` for a single row, a pre-allocated KV cache and
the model's own rotary embedding module. The residual stream stays in fp32.

The LLM's classes are neither subclassed nor patched; `supports(llm)` says which models the
step reproduces (tests compare its logits with the transformers forward), others decode
through transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral")


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
    return plain and hasattr(llm, "model") and hasattr(llm, "lm_head")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (LlamaRMSNorm's maths) on fp32 x, one fused op. # (B, D)"""
    return F.rms_norm(x, weight.shape, weight, eps)


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 (B, Din) @ w.T (Dout, Din) in w's dtype -> fp32 (B, Dout); mv for one row."""
    xw = x.to(w.dtype)
    if x.shape[0] == 1:
        return torch.mv(w, xw[0]).float()[None]
    return F.linear(xw, w).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (transformers' apply_rotary_pos_emb). x (B, H, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class _Layer:
    qkv: torch.Tensor  # (H*hd + 2*Hkv*hd, D)
    o: torch.Tensor  # (D, H*hd)
    gate_up: torch.Tensor  # (2*I, D)
    down: torch.Tensor  # (D, I)
    norm_in: torch.Tensor  # (D,) fp32
    norm_post: torch.Tensor  # (D,) fp32
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
            raise ValueError(f"LlamaDecoder supports {', '.join(SUPPORTED_TYPES)} models")
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
            self.norm = model.norm.weight.float()
        self.norm_eps = model.norm.variance_epsilon

    @staticmethod
    def _layer(block: torch.nn.Module) -> _Layer:
        att, mlp = block.self_attn, block.mlp
        return _Layer(
            qkv=torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]),
            o=att.o_proj.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
            norm_in=block.input_layernorm.weight.float(),
            norm_post=block.post_attention_layernorm.weight.float(),
            eps=block.input_layernorm.variance_epsilon,
        )

    def start(self, cache: object, attention_mask: torch.Tensor, extra: int) -> DecodeState:
        """Copy a transformers cache after the prefill into buffers with `extra` free slots."""
        batch, length = attention_mask.shape
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (B, Hkv, L, hd)
            buf_k = k.new_zeros(batch, self.kv_heads, length + extra, self.head_dim)
            buf_v = torch.zeros_like(buf_k)
            buf_k[:, :, :length], buf_v[:, :, :length] = k, v
            keys.append(buf_k)
            values.append(buf_v)
        mask = torch.zeros(batch, length + extra, dtype=torch.bool, device=attention_mask.device)
        mask[:, :length] = attention_mask.bool()
        return DecodeState(keys, values, mask, length)

    @staticmethod
    def select(state: DecodeState, index: torch.Tensor) -> DecodeState:
        """Keep only the batch rows in `index` (finished rows leave)."""
        return DecodeState(
            [k[index] for k in state.keys],
            [v[index] for v in state.values],
            state.mask[index],
            state.length,
        )

    @torch.inference_mode()
    def step(
        self, state: DecodeState, tokens: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Feed one token per row (B,) at `positions` (B,); return float32 logits (B, V)."""
        batch, t = tokens.shape[0], state.length
        if t >= state.mask.shape[1]:
            raise ValueError("the decode buffers are full")
        h = self.embed(tokens).float()  # (B, D)
        cos, sin = self.rotary(h[:, None], positions[:, None])  # (B, 1, hd)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, hd)
        state.mask[:, t] = True
        mask = state.mask[:, None, None, : t + 1]  # (B, 1, 1, t+1)
        hd, nq, nkv = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms(h, layer.norm_in, layer.eps)
            qkv = _mm(x, layer.qkv)  # (B, (H + 2 Hkv) hd)
            qk = _rope(qkv[:, : nq + nkv].view(batch, -1, 1, hd), cos, sin)  # (B, H+Hkv, 1, hd)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            keys, values = state.keys[i], state.values[i]
            keys[:, :, t : t + 1] = k
            values[:, :, t : t + 1] = qkv[:, nq + nkv :].view(batch, self.kv_heads, 1, hd)
            att = F.scaled_dot_product_attention(
                q.to(keys.dtype),
                keys[:, :, : t + 1],
                values[:, :, : t + 1],
                attn_mask=mask,
                enable_gqa=self.heads != self.kv_heads,
            )  # (B, H, 1, hd)
            h = h + _mm(att.reshape(batch, nq).float(), layer.o)
            x = _rms(h, layer.norm_post, layer.eps)
            gate, up = _mm(x, layer.gate_up).chunk(2, dim=-1)  # (B, I) each
            h = h + _mm(F.silu(gate) * up, layer.down)
        state.length = t + 1
        return _mm(_rms(h, self.norm, self.norm_eps), self.lm_head)  # (B, V)

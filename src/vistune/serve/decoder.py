"""The LLM forward for generation on Llama-architecture LLMs (SmolLM2, Llama, Vicuna).

Why: on the CPU a decode step is a chain of matrix-*vector* products, bound by memory
bandwidth and kernel choice. Measured here (docs/PERFORMANCE.md) PyTorch's `mm` for one
row in bf16 is slower than fp32, while `torch.mv` in bf16 is ~2x faster than fp32's `mm`;
and transformers' `DynamicCache` re-concatenates the whole KV cache every step (12% of a
fp32 step). So generation runs here: the same maths as transformers' Llama
(vistune.model.llama, shared with training), read from the LLM's own modules, a KV cache
allocated once for prompt + new tokens, `torch.mv` for a single row, and the model's own
rotary module. On the CPU q/k/v and gate/up are multiplied as one matrix each, fused once
(a copy of those weights); elsewhere the LLM's weights are used as they are
(vistune.model.llama.fuses). The prompt goes through in one pass (prefill) with a causal +
left-padding mask; decode steps keep the residual stream in fp32, and on the CPU attend with
two fp32 matrix products (`_step_attention`): SDPA's CPU kernel is 3-7x slower for one query.

The LLM's classes are neither subclassed nor patched; `vistune.model.llama.supports(llm)`
says which models this reproduces (tests compare its logits with transformers' forward,
fp32 and bf16); other LLMs generate through transformers' forward (vistune.serve.generate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vistune.model import llama


def _norm_weights(weight: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
    """The norm weight in fp32 (decode steps) and in the model's dtype (prefill)."""
    return {torch.float32: weight.float(), weight.dtype: weight}


def _rms(x: torch.Tensor, weights: dict[torch.dtype, torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm with the weight copy in x's dtype. # (..., D)"""
    return llama.rms_norm(x, weights[x.dtype], eps)


QUANTIZE = ("none", "int8", "int4")
"""Weight formats for decode steps: the model's own (`none`), weight-only int8, or
weight-only int4 in groups of `INT4_GROUP` inputs."""

INT8_ROWS = 16
"""Up to this many rows a product reads the int8 copy (decode steps, small batches); a
prefill's many rows multiply the model's own weights, where the int8 kernel is slower."""


INT8_BLOCK = 16
"""PyTorch's int8 kernel (`_weight_int8pack_mm`, CPU) reads the inner dimension in blocks of
16 and returns wrong sums for other widths (torch 2.13, tested): such a matrix stays dense."""


@dataclass(frozen=True)
class Int8Weight:
    """A (Dout, Din) weight kept twice: as it is, and as int8 with one bf16 scale per output
    row (absmax / 127), for decode steps. Decoding is bound by reading the weights (one
    pass over all of them per token, docs/PERFORMANCE.md): int8 halves what bf16 reads."""

    dense: torch.Tensor  # (Dout, Din) the model's dtype
    q: torch.Tensor  # (Dout, Din) int8
    scales: torch.Tensor  # (Dout,) bf16

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Weight:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (Dout,)
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(weight, q.contiguous(), scales.to(torch.bfloat16))

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype


INT4_GROUP = 32
"""Inputs sharing one int4 scale and offset: 32 divides every width of SmolLM2 and Llama
(576, 1536, 4096, 11008); PyTorch's CPU kernel takes 32, 64, 128 or 256."""

INT4_ROWS_BLOCK = 16
"""PyTorch's int4 packing (CPU) takes only a multiple of 16 output rows; others stay dense."""


@dataclass(frozen=True)
class Int4Weight:
    """A (Dout, Din) weight kept as it is and as 4-bit integers, one bf16 scale and offset per
    `INT4_GROUP` inputs of each output row (min-max: w ~ (q - 8) * scale + zero), packed for
    PyTorch's CPU kernel (`_weight_int4pack_mm_for_cpu`): a quarter of bf16's bytes."""

    dense: torch.Tensor  # (Dout, Din) the model's dtype
    packed: torch.Tensor  # (Dout, Din / 2) uint8, the kernel's layout
    scale_zero: torch.Tensor  # (Din / group, Dout, 2) bf16
    group: int

    @classmethod
    def of(cls, weight: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
        rows, cols = weight.shape
        w = weight.detach().float().reshape(rows, cols // group, group)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp_min(1e-12)  # (Dout, G, 1)
        q = torch.round((w - low) / scale).clamp_(0, 15).to(torch.int32).reshape(rows, cols)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        scale_zero = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        return cls(weight, packed, scale_zero.to(torch.bfloat16), group)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, in fp32 (tests). # (Dout, Din)"""
        eye = torch.eye(self.dense.shape[1], dtype=torch.bfloat16)
        return (
            torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_zero)
            .float()
            .T
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype


Weight = torch.Tensor | Int8Weight | Int4Weight


def _mm(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., Din) @ w.T (Dout, Din) in w's dtype, returned in x's dtype; mv for one row;
    an Int8Weight's or Int4Weight's packed copy for a few rows (bf16 activations, their
    kernels' fast path)."""
    if isinstance(w, Int8Weight | Int4Weight):
        rows = x.numel() // x.shape[-1]
        if rows <= INT8_ROWS:
            flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
            if isinstance(w, Int8Weight):
                out = torch._weight_int8pack_mm(flat, w.q, w.scales)  # (rows, Dout)
            else:
                out = torch._weight_int4pack_mm_for_cpu(flat, w.packed, w.group, w.scale_zero)
            return out.to(x.dtype).view(*x.shape[:-1], -1)
        w = w.dense
    xw = x.to(w.dtype)
    if x.numel() == x.shape[-1]:
        return torch.mv(w, xw.reshape(-1)).to(x.dtype).view(*x.shape[:-1], -1)
    return F.linear(xw, w).to(x.dtype)


def _project(x: torch.Tensor, ws: tuple[Weight, ...]) -> torch.Tensor:
    """x times fused weights (one) or the LLM's own (several), outputs side by side."""
    if len(ws) == 1:
        return _mm(x, ws[0])
    return torch.cat([_mm(x, w) for w in ws], dim=-1)


def _step_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, hd) over keys/values (B, Hkv, S, hd)
    with an additive mask (B, 1, 1, S) or None; fp32. # (B, H, 1, hd)

    The same maths as SDPA with grouped heads (query head j reads KV head j // (H / Hkv), as
    transformers' repeat_kv), as matmuls over the query heads of each KV head. On the CPU
    SDPA takes ~300 us for one bf16 query over 300 keys (30 a step, 30 layers), these two
    products ~100 us (measured here with 1 thread; 8 rows of 700 keys: 5.6 ms vs 0.8 ms)."""
    batch, heads, _, hd = q.shape
    kv_heads = keys.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, hd).float()  # (B, Hkv, G, hd)
    scores = torch.matmul(grouped, keys.float().transpose(-1, -2)).mul_(hd**-0.5)  # (B, Hkv, G, S)
    if mask is not None:
        scores.add_(mask.float())
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())  # (B, Hkv, G, hd)
    return out.view(batch, heads, 1, hd)


@dataclass
class _Layer:
    qkv: tuple[Weight, ...]  # fused (H*hd + 2*Hkv*hd, D), or q, k, v
    o: Weight  # (D, H*hd)
    gate_up: tuple[Weight, ...]  # fused (2*I, D), or gate, up
    down: Weight  # (D, I)
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
    """Decode steps over a Llama-family HF causal LM (see module docstring).

    `fused`: q/k/v and gate/up as one matrix each, a copy of those weights (None: where
    vistune.model.llama.fuses says, i.e. on the CPU). `quantize="int8"` / `"int4"`: decode
    steps read an int8 (`Int8Weight`) or int4 (`Int4Weight`) copy of every matrix of the
    decoder and of the LM head whose width the kernel takes (the CPU,
    bf16 weights); the prefill keeps the model's own."""

    def __init__(
        self, llm: torch.nn.Module, fused: bool | None = None, quantize: str = "none"
    ) -> None:
        if not llama.supports(llm):
            raise ValueError(
                f"LlamaDecoder supports plain {', '.join(llama.SUPPORTED_TYPES)} models"
            )
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        weight = llm.lm_head.weight
        if quantize != "none" and (weight.device.type != "cpu" or weight.dtype != torch.bfloat16):
            raise ValueError(
                f"{quantize} decoding runs on the CPU with bf16 weights, not "
                f"{weight.device.type} {str(weight.dtype).removeprefix('torch.')}"
            )
        self.quantize = quantize
        cfg, model = llm.config, llm.model
        dims = llama.dims(cfg)
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        self.rotary = model.rotary_emb
        self.embed = llm.get_input_embeddings()
        self.lm_head = self._weight(llm.lm_head.weight)  # (V, D)
        self.dtype = self.lm_head.dtype
        self.fused = llama.fuses(weight.device) if fused is None else fused
        with torch.no_grad():
            self.layers = [self._layer(block) for block in model.layers]
            self.norm = _norm_weights(model.norm.weight)
        self.norm_eps = model.norm.variance_epsilon

    def _layer(self, block: torch.nn.Module) -> _Layer:
        w = llama.block_weights(block)
        qkv, gate_up = (w.q, w.k, w.v), (w.gate, w.up)
        if self.fused:
            qkv, gate_up = (llama.fuse(qkv),), (llama.fuse(gate_up),)
        return _Layer(
            qkv=tuple(self._weight(m) for m in qkv),
            o=self._weight(w.o),
            gate_up=tuple(self._weight(m) for m in gate_up),
            down=self._weight(w.down),
            norm_in=_norm_weights(w.norm_in),
            norm_post=_norm_weights(w.norm_post),
            eps=block.input_layernorm.variance_epsilon,
        )

    def _weight(self, weight: torch.Tensor) -> Weight:
        if self.quantize == "int8" and weight.shape[1] % INT8_BLOCK == 0:
            return Int8Weight.of(weight)
        if (
            self.quantize == "int4"
            and weight.shape[1] % INT4_GROUP == 0
            and weight.shape[0] % INT4_ROWS_BLOCK == 0
        ):
            return Int4Weight.of(weight)
        return weight

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

    def prefilled(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> DecodeState:
        """A one-row state holding a cached prefix: `keys`/`values` (layers, Hkv, P, hd) at
        positions 0..P-1, room for `capacity` positions in all (vistune.serve.prefix_cache)."""
        state = self.allocate(torch.ones(1, 0, dtype=torch.bool, device=keys.device), capacity)
        filled = keys.shape[2]
        for layer in range(len(self.layers)):
            state.keys[layer][0, :, :filled] = keys[layer]
            state.values[layer][0, :, :filled] = values[layer]
        state.mask[0, :filled] = True
        state.length = filled
        return state

    @staticmethod
    def row_cache(state: DecodeState, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one row's filled keys and values, its padding left out.
        # (layers, Hkv, n, hd) x2"""
        start = int(state.mask[row, : state.length].long().argmax())  # first filled column
        keys = torch.stack([k[row, :, start : state.length] for k in state.keys])
        values = torch.stack([v[row, :, start : state.length] for v in state.values])
        return keys, values

    @staticmethod
    def join(states: list[DecodeState], extra: int) -> DecodeState:
        """One batch of the rows of `states`, each row's filled columns right-aligned so that
        all rows write their next token at the same column (positions are passed per row,
        so the left padding this makes does not shift them); room for `extra` more.

        Continuous batching (vistune.serve.scheduler): a request joins the running batch
        between decode steps. Columns no row uses any more are dropped here."""
        firsts = [int(s.mask[:, : s.length].any(0).long().argmax()) for s in states]
        width = max(s.length - first for s, first in zip(states, firsts, strict=True))
        ref = states[0].keys[0]
        rows = sum(s.mask.shape[0] for s in states)
        shape = (rows, ref.shape[1], width + extra, ref.shape[3])
        buffers = torch.zeros((2, len(states[0].keys), *shape), dtype=ref.dtype, device=ref.device)
        mask = torch.zeros(rows, width + extra, dtype=torch.bool, device=ref.device)
        at = 0
        for s, first in zip(states, firsts, strict=True):
            n, used = s.mask.shape[0], s.length - first
            for layer, (k, v) in enumerate(zip(s.keys, s.values, strict=True)):
                buffers[0, layer, at : at + n, :, width - used : width] = k[:, :, first : s.length]
                buffers[1, layer, at : at + n, :, width - used : width] = v[:, :, first : s.length]
            mask[at : at + n, width - used : width] = s.mask[:, first : s.length]
            at += n
        return DecodeState(list(buffers[0]), list(buffers[1]), mask, width)

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
        cos, sin = llama.rope_tables(self.rotary, h, positions)  # (B, T, hd)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
        hd, nq, nkv = self.head_dim, self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms(h, layer.norm_in, layer.eps)
            qkv = _project(x, layer.qkv)  # (B, T, (H + 2 Hkv) hd)
            qk = qkv[..., : nq + nkv].view(batch, steps, -1, hd).transpose(1, 2)
            qk = llama.rope(qk, cos, sin)  # (B, H + Hkv, T, hd)
            keys, values = state.keys[i], state.values[i]
            keys[:, :, t0:t1] = qk[:, self.heads :]
            values[:, :, t0:t1] = qkv[..., nq + nkv :].view(batch, steps, -1, hd).transpose(1, 2)
            if steps == 1 and keys.device.type == "cpu":  # measured on the CPU only
                att = _step_attention(
                    qk[:, : self.heads], keys[:, :, :t1], values[:, :, :t1], attn_mask
                )
            else:
                att = F.scaled_dot_product_attention(
                    qk[:, : self.heads].to(keys.dtype),
                    keys[:, :, :t1],
                    values[:, :, :t1],
                    attn_mask=attn_mask,
                    is_causal=attn_mask is None and t0 == 0,
                    enable_gqa=self.heads != self.kv_heads,
                )  # (B, H, T, hd)
            h += _mm(att.transpose(1, 2).reshape(batch, steps, nq).to(h.dtype), layer.o)
            x = _rms(h, layer.norm_post, layer.eps)
            gate, up = _project(x, layer.gate_up).chunk(2, dim=-1)  # (B, T, I) each
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

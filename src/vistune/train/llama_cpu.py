"""Hand-written forward and backward of a Llama decoder for training on the CPU.

Why: at LLaVA's lengths a small LLM's training step on the CPU is dominated by work around
its matmuls, not the matmuls (docs/PERFORMANCE.md, "Training"). Measured here on a
SmolLM2-135M stage-2 step through transformers' modules under bf16 autocast:
- eager attention: its batched matmuls run on transposed views in the backward (~150
  GFLOP/s instead of ~1000 for the same sizes laid out contiguously), beside fp32 casts and
  masks of every score tensor; CPU SDPA's flash backward is no faster at these lengths;
- RMSNorm, rotary and SiLU as chains of element-wise ops over fp32 casts of activations;
- the fp32 log-softmax over the 49K vocabulary, materialised for every supervised token;
- oneDNN JIT-compiling a kernel (~10 ms) for every new matrix shape, and every batch
  length is new.

So for plain Llama-family LLMs (`vistune.model.llama.trains`) a training micro-batch runs
here: one autograd Function per decoder layer with q/k/v and gate/up fused, grouped query
attention through PyTorch's CPU flash kernel forward and our backward (contiguous batched
matmuls, the query heads sharing a key/value head stacked so each product is G times
taller), weight gradients as products without a transposed operand (see _Layer), the
element-wise work between the matmuls compiled (vistune.train.llama_glue), and the final
norm, LM head and cross entropy in one Function over row chunks (bf16 logits, fp32
log-sum-exp, the softmax gradient written straight into the logits' buffer). Lengths are
padded to a multiple of 16 so shapes repeat. The maths is transformers' Llama forward
(RMSNorm, rotary embeddings and the fused weight layout from vistune.model.llama, shared
with generation; tests compare losses and every gradient with transformers, fp32 and bf16).

Precision: the parameters stay as they are (fp32 master weights when training in bf16);
with `dtype=torch.bfloat16` every matmul runs in bf16 on weights cast once per step,
the residual stream and the norms stay fp32, the softmaxes accumulate in fp32 and weight
gradients are returned in the parameters' dtype: the same roundings as bf16 autocast.

Batches are right-padded (vistune.model.splice), so the causal mask alone keeps
real tokens from seeing padding; padding positions compute something and get no gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from vistune.model import llama
from vistune.model.llama import rms_backward
from vistune.model.loss import supervised
from vistune.train.llama_glue import Glue, glue

LENGTH_MULTIPLE = 16
"""Batches padded to a multiple of this length. oneDNN builds (JIT-compiles) a kernel for
every new matrix shape, about 10 ms each here; with every batch's length new, that was
~10% of a step. Rounded lengths repeat, so their kernels come from its cache."""
ROW_MULTIPLE = 128
"""The LM head's rows (supervised tokens) are padded to a multiple of this, for the same
reason."""

_CAUSAL: dict[tuple, torch.Tensor] = {}


def _causal(groups: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (G*L, L) mask: row g*L + i may see keys 0..i."""
    key = (groups, length, dtype)
    mask = _CAUSAL.get(key)
    if mask is None:
        i = torch.arange(length)
        blocked = i[None, :] > i[:, None]  # (L, L)
        mask = torch.zeros(length, length, dtype=dtype).masked_fill_(blocked, float("-inf"))
        mask = mask.repeat(groups, 1).contiguous()
        if len(_CAUSAL) > 64:
            _CAUSAL.clear()
        _CAUSAL[key] = mask
    return mask


class WeightCache:
    """The weights cast (and q/k/v, gate/up fused: vistune.model.llama.fuse) for the matmuls,
    shared by the micro-batches of one optimizer step.

    Call `invalidate()` whenever the weights change (after each optimizer step): fused
    optimizers update parameters in place without bumping their version counters, so the
    cache cannot see it by itself. A refresh writes into the same buffers (no new pages)."""

    def __init__(self) -> None:
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._generation = 0

    def invalidate(self) -> None:
        self._generation += 1

    def get(self, dtype: torch.dtype, *params: torch.Tensor) -> torch.Tensor:
        """cat(params) in `dtype` (a lone parameter already in `dtype`: itself)."""
        if len(params) == 1 and params[0].dtype == dtype:
            return params[0]
        # version counters see in-place ops; the pointer and dtype see `.data =` and `.to()`
        stamp = (self._generation, tuple((p._version, p.data_ptr(), p.dtype) for p in params))
        found = self._copies.get(params[0])
        if found is not None and found[0] == stamp and found[1].dtype == dtype:
            return found[1]
        if found is not None and found[1].dtype == dtype:
            out = llama.fuse(params, out=found[1])
        else:
            out = llama.fuse(params, dtype)
        self._copies[params[0]] = (stamp, out)
        return out


def _transposed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.T as a new contiguous tensor in `dtype` (a weight gradient from its transpose)."""
    return torch.empty(t.shape[::-1], dtype=dtype).copy_(t.t())


@dataclass(frozen=True)
class Shapes(llama.Dims):
    """The attention sizes (model/llama.py's Dims) of one batch of `length` tokens."""

    batch: int
    length: int


_FLASH = {"usable": True}
"""Whether PyTorch's CPU flash attention kernel runs here (older torch builds lack it or
its grouped-query support); set False for good after its first failure."""


@dataclass(frozen=True)
class TurnMasks:
    """A batch's additive attention mask (0 or -inf) with turns apart, in the two layouts
    the kernels take: `heads` (B, 1, L, L) for the flash forward, `rows` (B*Hkv, G*L, L) for
    the backward's stacked query rows."""

    heads: torch.Tensor
    rows: torch.Tensor

    @staticmethod
    def of(allowed: torch.Tensor, s: Shapes, dtype: torch.dtype) -> TurnMasks:
        """From vistune.model.splice.turn_mask's (B, L, L)."""
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
        b, length = s.batch, s.length
        rows = add[:, None, None].expand(b, s.kv_heads, s.groups, length, length)
        return TurnMasks(add[:, None], rows.reshape(b * s.kv_heads, s.groups * length, length))


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shapes, masks: TurnMasks | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal GQA of scaled queries (with `masks`: turns apart). q (BK, G*L, hd), k/v (BK, L,
    hd) -> out (BK, G*L, hd), log-sum-exp of each query's scores (BK, G*L) fp32.

    PyTorch's flash attention kernel for the CPU: it skips the masked blocks and never
    writes the scores, 2.5x faster here than bmm + mask + softmax + bmm (the fallback,
    with one warning, where the kernel is missing). Its own backward is slower than
    _attention_backward, which recomputes the probabilities from `lse`."""
    b, hd = s.batch, s.head_dim
    if _FLASH["usable"]:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.view(b, s.heads, s.length, hd),
                k.view(b, s.kv_heads, s.length, hd),
                v.view(b, s.kv_heads, s.length, hd),
                0.0,
                masks is None,
                attn_mask=None if masks is None else masks.heads,
                scale=1.0,
            )  # (B, H, L, hd): head kv * G + g, as q's rows are stacked
            return out.view(q.shape), lse.reshape(q.shape[:2])  # lse is stored (B, L, H)
        except (AttributeError, RuntimeError) as err:  # a missing or unsupported kernel
            if "allocate" in str(err):  # out of memory: the fallback needs more, not less
                raise
            _FLASH["usable"] = False
            warnings.warn(
                f"vistune.train.llama_cpu: no CPU flash attention here ({type(err).__name__});"
                " using batched matmuls",
                RuntimeWarning,
                stacklevel=2,
            )
    scores = torch.bmm(q, k.transpose(1, 2)).float()  # (BK, G*L, L)
    scores += _causal(s.groups, s.length, torch.float32) if masks is None else masks.rows
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(q.dtype)
    return torch.bmm(probs, v), lse


def _attention_backward(  # noqa: PLR0913
    dout: torch.Tensor,
    rows: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    k_: Glue,
    s: Shapes,
    masks: TurnMasks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of _attention for the scaled q (the caller applies the scale), k, v;
    `rows` = sum(dout * out) of each query row (Glue.split_grad)."""
    mask = _causal(s.groups, s.length, q.dtype) if masks is None else masks.rows
    scores = torch.bmm(q, k.transpose(1, 2))  # (BK, G*L, L)
    dprobs = torch.bmm(dout, v.transpose(1, 2))  # (BK, G*L, L)
    probs, dscores = k_.attention_grad(scores, dprobs, mask, lse, rows)
    dv = torch.bmm(probs.transpose(1, 2), dout)  # (BK, L, hd)
    return torch.bmm(dscores, k), torch.bmm(dscores.transpose(1, 2), q), dv


_TRAINED = (8, 9, 10, 11, 13, 14, 15)
"""_Layer.forward's argument positions of the projection weights."""


class _Layer(torch.autograd.Function):
    """One LlamaDecoderLayer: h (N, D) residual stream -> h' (N, D).

    Weight gradients are products over the N rows, dy.T @ x. oneDNN runs that product with
    a transposed operand at ~1000 GFLOP/s here and an untransposed one (xt @ dy, xt = x.T
    contiguous) at ~2000, so when the weights train the forward also writes each matmul
    input transposed (one more output of the glue kernel that makes it) and keeps that
    instead of the input; the backward multiplies it and copies the (small) transposed
    result into the parameter's gradient. (down_proj's gradient takes dy transposed
    instead, o_proj's multiplies both operands transposed: measured fastest for those.)"""

    @staticmethod
    def forward(  # noqa: PLR0913 - the weights are the Function's inputs
        ctx,
        h: torch.Tensor,
        cos: torch.Tensor,
        ssin: torch.Tensor,
        shapes: Shapes,
        k_: Glue,
        cache: WeightCache,
        scale: float,
        n_in: torch.Tensor,
        wq: torch.Tensor,
        wk: torch.Tensor,
        wv: torch.Tensor,
        wo: torch.Tensor,
        n_post: torch.Tensor,
        wg: torch.Tensor,
        wu: torch.Tensor,
        wd: torch.Tensor,
        masks: TurnMasks | None = None,
    ) -> torch.Tensor:
        s = shapes
        dtype = k_.dtype
        train = any(w.requires_grad for w in (wq, wk, wv, wo, wg, wu, wd))
        wqkv = cache.get(dtype, wq, wk, wv)  # (H*hd + 2*Hkv*hd, D)
        wo_c, wd_c = cache.get(dtype, wo), cache.get(dtype, wd)
        wgu = cache.get(dtype, wg, wu)  # (2I, D)
        if train:
            x1, x1t, r1 = k_.norm_in_t(h, n_in)
        else:
            (x1, r1), x1t = k_.norm_in(h, n_in), None
        # q and k/v as two products: one (N, (H + 2Hkv) hd) product is ~1.6x slower here
        nq = wq.shape[0]
        q, kv = x1 @ wqkv[:nq].t(), x1 @ wqkv[nq:].t()
        scale_t = torch.tensor(scale, dtype=dtype)
        q, k, v = k_.split_heads(q, kv, cos, ssin, scale_t)
        o, lse = _attention(q, k, v, s, masks)
        if train:
            att, attt = k_.merge_heads_t(o, cos)  # (N, H*hd), (H*hd, N)
            h2, x2, x2t, r2 = k_.residual_norm_t(h, att @ wo_c.t(), n_post)
        else:
            att, attt = k_.merge_heads(o, cos), None
            (h2, x2, r2), x2t = k_.residual_norm(h, att @ wo_c.t(), n_post), None
        gu = x2 @ wgu.t()  # (N, 2I)
        m = k_.swiglu(gu)
        out = k_.add(h2, m @ wd_c.t())
        ctx.save_for_backward(h, r1, x1t, q, k, v, o, lse, attt, h2, r2, x2t, gu, m, cos, ssin)
        ctx.weights = (wqkv, wo_c, wgu, wd_c, n_in, n_post)
        ctx.scale, ctx.glue, ctx.shapes, ctx.masks = scale_t, k_, s, masks
        ctx.splits = (wq.shape[0], wk.shape[0])
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h, r1, x1t, q, k, v, o, lse, attt, h2, r2, x2t, gu, m, cos, ssin = ctx.saved_tensors
        wqkv, wo_c, wgu, wd_c, n_in, n_post = ctx.weights
        scale, k_ = ctx.scale, ctx.glue
        need_w = any(ctx.needs_input_grad[i] for i in _TRAINED)
        dtype = wqkv.dtype
        w: dict[str, torch.Tensor] = {}  # weight gradients, transposed except "d" and "o"
        # MLP
        if need_w:
            dy, dyt = k_.cast_t(dout)
            w["d"] = dyt @ m  # (D, I): down_proj's gradient, not transposed
        else:
            dy = dout.to(dtype)
        dgate, dup = k_.swiglu_backward(dy @ wd_c, gu)  # (N, I) each
        inter = dgate.shape[1]
        if need_w:
            w["g"], w["u"] = x2t @ dgate, x2t @ dup  # (D, I)
        dx2 = torch.addmm(dgate @ wgu[:inter], dup, wgu[inter:])
        dh2, dy, dn_post = k_.norm_backward(dx2, h2, r2, n_post, dout)
        # attention
        if need_w:
            # (D, H*hd) as a product of two transposed operands: for this square shape
            # it runs ~1.4x faster than attt @ dy (and needs no transposed copy)
            w["o"] = dy.t() @ attt.t()
        datt, rows = k_.split_grad(dy @ wo_c, cos, o)
        dq, dk, dv = _attention_backward(datt, rows, q, k, v, lse, k_, ctx.shapes, ctx.masks)
        dqkv = k_.merge_grads(dq, dk, dv, cos, ssin, scale)
        if need_w:
            w["qkv"] = x1t @ dqkv  # (D, (H + 2Hkv) hd)
        dh, dn_in = k_.first_norm_backward(dqkv @ wqkv, h, r1, n_in, dh2)
        nq, nkv = ctx.splits
        pdt = n_in.dtype
        out: list[torch.Tensor | None] = [dh, None, None, None, None, None, None]
        out.append(dn_in.to(pdt) if ctx.needs_input_grad[7] else None)
        if need_w:
            qkv = w["qkv"].split([nq, nkv, nkv], dim=1)
            out += [_transposed(x, pdt) for x in qkv] + [w["o"].to(pdt)]
        else:
            out += [None] * 4
        out.append(dn_post.to(pdt) if ctx.needs_input_grad[12] else None)
        if need_w:
            out += [_transposed(w["g"], pdt), _transposed(w["u"], pdt), w["d"].to(pdt)]
        else:
            out += [None] * 3
        return (*out, None)  # masks


def _head_grad(xct: torch.Tensor, dlogits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The LM head's gradient dlogits.T @ xc (V, D) in `dtype`, from xct = xc.T (D, R): as
    untransposed products over blocks of 1024 vocabulary columns (see _Layer), each block
    transposed into the result while it is in cache (145 ms -> 115 ms for 1920 rows)."""
    vocab, block = dlogits.shape[1], 1024
    out = torch.empty(vocab, xct.shape[0], dtype=dtype)
    for a in range(0, vocab, block):
        out[a : a + block].copy_((xct @ dlogits[:, a : a + block]).t())
    return out


class _HeadLoss(torch.autograd.Function):
    """Final RMSNorm + LM head + summed token cross entropy of rows h (N, D), in row chunks:
    bf16 logits (kept for the backward, which overwrites them with their gradient) and an
    fp32 log-sum-exp per row: vistune.model.loss.token_loss of those logits, fused."""

    @staticmethod
    def forward(ctx, h, targets, norm, head, k_: Glue, cache: WeightCache, chunk: int, sink):
        n = h.shape[0]
        rows = -(-n // ROW_MULTIPLE) * ROW_MULTIPLE
        hp = F.pad(h, (0, 0, 0, rows - n))  # zero rows: no loss, no gradient (below)
        if head.requires_grad:  # the head's gradient multiplies xc transposed (see _Layer)
            xc, xct, r = k_.norm_in_t(hp, norm)
        else:
            (xc, r), xct = k_.norm_in(hp, norm), None
        w = cache.get(k_.dtype, head)  # (V, D)
        logits = torch.empty(rows, w.shape[0], dtype=k_.dtype)  # (R, V)
        lse = torch.empty(rows, dtype=torch.float32)
        for a in range(0, rows, chunk):
            part = torch.mm(xc[a : a + chunk], w.t(), out=logits[a : a + chunk])
            lse[a : a + chunk] = k_.logsumexp(part)
        picked = logits[:n].gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(hp, r, xct, targets, lse, norm)
        ctx.logits, ctx.w, ctx.glue, ctx.chunk = logits, w, k_, chunk
        rows_ce = lse[:n] - picked
        if sink is not None:
            sink.append(rows_ce.detach())
        return rows_ce.sum()

    @staticmethod
    def backward(ctx, dtotal):
        hp, r, xct, targets, lse, norm = ctx.saved_tensors
        logits, w, k_, chunk = ctx.logits, ctx.w, ctx.glue, ctx.chunk
        if logits is None:
            raise RuntimeError(
                "vistune.train.llama_cpu: the LM head's backward ran twice; its first run wrote "
                "the gradient over the saved logits (no retain_graph here)"
            )
        ctx.logits = None
        n = targets.shape[0]
        scale = dtotal.float().reshape(())
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            k_.ce_grad(logits[a:b], lse[a:b], targets[a:b], scale)
        logits[n:] = 0
        dx = logits @ w  # (R, D)
        dhead = _head_grad(xct, logits, norm.dtype) if ctx.needs_input_grad[3] else None
        dh, dnorm = rms_backward(dx, hp, r, norm)
        pdt = norm.dtype
        dnorm = dnorm.to(pdt) if ctx.needs_input_grad[2] else None
        return dh[:n], None, dnorm, dhead, None, None, None, None


def decoder_loss(
    llm: nn.Module,
    inputs: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    dtype: torch.dtype,
    cache: WeightCache | None = None,
    chunk: int = 512,
    sink: list[torch.Tensor] | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token CE of right-padded `inputs` (B, L, D) against `targets` (B, L)
    (IGNORE_INDEX where unsupervised), through `llm`'s decoder, final norm and LM head,
    with every matmul in `dtype`. `cache` keeps the weights' copies across the micro-batches
    of a step (invalidate it after every optimizer step); None casts them on every call.
    `sink` receives the detached CE of each supervised token (N,), in `supervised`'s order.
    `allowed` (B, L, L): who may attend to whom with turns apart
    (vistune.model.splice.turn_mask); None: causal."""
    cfg, model = llm.config, llm.model
    b, length, _ = inputs.shape
    d = llama.dims(cfg)
    shapes = Shapes(d.heads, d.kv_heads, d.head_dim, batch=b, length=length)
    k_ = glue(d.heads, d.kv_heads, d.head_dim, model.norm.variance_epsilon, dtype)
    cache = cache or WeightCache()
    masks = None if allowed is None else TurnMasks.of(allowed, shapes, dtype)
    cos, ssin = llama.rope_tables(model.rotary_emb, inputs, positions, dtype)  # (B, L, hd)
    h = inputs.float().reshape(b * length, -1)
    with torch.autocast("cpu", enabled=False):
        for block in model.layers:
            weights = llama.block_weights(block)
            h = _Layer.apply(
                h, cos, ssin, shapes, k_, cache, block.self_attn.scaling, *weights, masks
            )
        keep, picked = supervised(targets)  # (B, L), (N,)
        rows = h.view(b, length, -1)[keep]  # (N, D)
        return _HeadLoss.apply(
            rows, picked, model.norm.weight, llm.lm_head.weight, k_, cache, chunk, sink
        )

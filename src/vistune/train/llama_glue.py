"""The element-wise work between the matmuls of vistune.train.llama_cpu, compiled.

RMSNorm, rotary embedding (their maths from vistune.model.llama, shared with generation),
SwiGLU, the head/token regrouping for attention and their gradients, as one `Glue` per
model size and dtype. torch.compile turns each function into one pass over its tensors
(eager PyTorch makes one pass per op: 2-4x the time here). If compiling fails (no C++
compiler, dynamo's limits), a function runs eagerly from then on, with one warning;
`set_compile(False)` runs them all eagerly.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F

from vistune.model.llama import rms, rms_apply, rms_backward, rope, rope_backward


class Glue:
    """The element-wise work between the matmuls of one model (heads, head size, norm eps
    and compute dtype fixed), each function one pass over its tensors once compiled.

    Compiled with the batch's sizes symbolic and the model's own sizes constants, which
    keeps the loops vectorised (all-symbolic kernels were ~7% slower per step here). b and
    L are read from `cos` (B, L, hd)."""

    def __init__(self, nh: int, nk: int, hd: int, eps: float, dtype: torch.dtype) -> None:
        self.nh, self.nk, self.hd, self.g, self.eps, self.dtype = nh, nk, hd, nh // nk, eps, dtype

    def norm_in(self, h, w):
        """-> x (N, D) in dtype, r (N, 1)."""
        x, r = rms(h, w, self.eps)
        return x.to(self.dtype), r

    def norm_in_t(self, h, w):
        """norm_in, with x's transpose (D, N) as well: the layout a weight gradient
        multiplies fastest (vistune.train.llama_cpu._Layer). One kernel, both outputs.

        The transpose is computed from h (the same values, bit for bit). `.contiguous()`
        is what makes it a transpose in memory: an element-wise result keeps its input's
        strides, so without it the output is x's own layout seen transposed, and the weight
        gradient that multiplies it runs ~1.9x slower (6.3 against 3.3 ms for 3584 rows).
        So for the other transposing variants."""
        x, r = Glue.norm_in(self, h, w)
        return x, rms_apply(h.t(), r.t(), w[:, None]).to(self.dtype).contiguous(), r

    def split_heads(self, q, kv, cos, ssin, scale: torch.Tensor):
        """q rows (N, H hd), k/v rows (N, 2 Hkv hd) -> rotated q (B*Hkv, G*L, hd) times the
        attention scale, k, v (B*Hkv, L, hd). A key/value head's G query heads are stacked
        along the rows (head h = kv * G + g, as transformers' repeat_kv pairs them)."""
        b, length = cos.shape[0], cos.shape[1]
        nk, g, hd = self.nk, self.g, self.hd
        q = q.view(b, length, nk, g, hd).permute(0, 2, 3, 1, 4)
        k = kv[:, : nk * hd].view(b, length, nk, hd).transpose(1, 2)
        v = kv[:, nk * hd :].view(b, length, nk, hd).transpose(1, 2)
        q = rope(q, cos[:, None, None], ssin[:, None, None]) * scale
        k = rope(k, cos[:, None], ssin[:, None])
        return (
            q.contiguous().view(b * nk, g * length, hd),
            k.contiguous().view(b * nk, length, hd),
            v.contiguous().view(b * nk, length, hd),
        )

    def attention_grad(self, scores, dprobs, mask, lse, rows):
        """Probabilities from the scores and their log-sum-exp, and the scores' gradient
        (softmax backward). # (BK, G*L, L) twice"""
        probs = torch.exp(scores.float() + mask - lse[..., None])  # masked: exp(-inf) = 0
        probs = probs.to(self.dtype)  # (used twice, inductor would store it; in fp32 2x slower)
        return probs, (probs.float() * (dprobs.float() - rows)).to(self.dtype)

    def merge_heads(self, att, cos):
        """(B*Hkv, G*L, hd) -> (N, H*hd) rows."""
        b, length = cos.shape[0], cos.shape[1]
        att = att.view(b, self.nk, self.g, length, self.hd).permute(0, 3, 1, 2, 4)
        return att.contiguous().view(b * length, self.nh * self.hd)

    def merge_heads_t(self, att, cos):
        """merge_heads, with the rows' transpose (H*hd, N) as well."""
        b, length = cos.shape[0], cos.shape[1]
        cols = att.view(b, self.nk, self.g, length, self.hd).permute(1, 2, 4, 0, 3)
        return Glue.merge_heads(self, att, cos), cols.contiguous().view(-1, b * length)

    def residual_norm(self, h, ao, w):
        """h2 = h + ao; -> h2 (fp32), x2 (dtype), r2."""
        h2 = h + ao
        x, r = rms(h2, w, self.eps)
        return h2, x.to(self.dtype), r

    def residual_norm_t(self, h, ao, w):
        """residual_norm, with x2's transpose (D, N) as well."""
        h2, x, r = Glue.residual_norm(self, h, ao, w)
        return h2, x, rms_apply(h.t() + ao.t(), r.t(), w[:, None]).to(self.dtype).contiguous(), r

    def swiglu(self, gu):
        """silu(gate) * up of fused (N, 2I) rows. # (N, I)"""
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter]) * gu[:, inter:]

    def add(self, h, d):
        return h + d

    def logsumexp(self, logits):
        """fp32 log-sum-exp of (C, V) logits rows. # (C,)"""
        return torch.logsumexp(logits.float(), dim=-1)

    def ce_grad(self, logits, lse, targets, scale):
        """logits <- (softmax(logits) - onehot(targets)) * scale, in place. # (C, V)

        Not compiled itself: the target column is read before the compiled pass and fixed
        after it (a compare per element was ~2x slower; a gather and index_put inside the
        compiled function made inductor write a temporary and copy it back: 19.5 ms instead
        of 16 for 512 rows)."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        hit = (torch.exp(logits[rows, targets].float() - lse) - 1) * scale  # (C,)
        self.softmax_(logits, lse, scale)
        logits[rows, targets] = hit.to(logits.dtype)

    def softmax_(self, logits, lse, scale):
        """logits <- exp(logits - lse) * scale, in place. # (C, V)"""
        logits.copy_(torch.exp(logits.float() - lse[:, None]) * scale)

    def swiglu_backward(self, dm, gu):
        """d gate, d up of swiglu, as two (N, I) tensors (one kernel; a concatenated
        output makes it ~1.6x slower)."""
        inter = gu.shape[1] // 2
        gate, up = gu[:, :inter].float(), gu[:, inter:].float()
        sig = torch.sigmoid(gate)
        dm = dm.float()
        dgate = dm * up * sig * (1 + gate * (1 - sig))
        return dgate.to(gu.dtype), (dm * gate * sig).to(gu.dtype)

    def norm_backward(self, dx, h, r, w, dres):
        """Gradient into the residual stream: dres + d_rms(h), also in dtype; d weight."""
        dh, dw = rms_backward(dx, h, r, w)
        dh = dh + dres
        return dh, dh.to(self.dtype), dw

    def cast_t(self, d):
        """(N, D) -> itself in dtype and that transposed (D, N)."""
        return d.to(self.dtype), d.t().to(self.dtype).contiguous()

    def first_norm_backward(self, dx, h, r, w, dres):
        """norm_backward for a layer's input norm: no dtype copy (nothing multiplies it)."""
        dh, dw = rms_backward(dx, h, r, w)
        return dh + dres, dw

    def split_grad(self, datt, cos, out):
        """Transpose of merge_heads: (N, H*hd) -> (B*Hkv, G*L, hd); with the attention
        backward's sum(dprobs * probs) of each query row, as datt . out (BK, G*L, 1) fp32.
        (The row sums are not taken inside attention_grad: there they made inductor write
        the fp32 probabilities out and read them back.)"""
        b, length = cos.shape[0], cos.shape[1]
        nk, g, hd = self.nk, self.g, self.hd
        datt = datt.view(b, length, nk, g, hd).permute(0, 2, 3, 1, 4)
        # the sums from the input, not the regrouped output (one read: 0.52 -> 0.44 ms)
        rows = (datt.float() * out.view(b, nk, g, length, hd).float()).sum(-1, keepdim=True)
        return datt.contiguous().view(b * nk, g * length, hd), rows.view(b * nk, g * length, 1)

    def merge_grads(self, dq, dk, dv, cos, ssin, scale: torch.Tensor):
        """Transpose of split_heads: rotary backward into fused (N, (H + 2Hkv) hd) rows."""
        b, length = cos.shape[0], cos.shape[1]
        nk, g, hd = self.nk, self.g, self.hd
        dq = dq.view(b, nk, g, length, hd) * scale
        dq = rope_backward(dq, cos[:, None, None], ssin[:, None, None])
        dk = rope_backward(dk.view(b, nk, length, hd), cos[:, None], ssin[:, None])
        dv = dv.view(b, nk, length, hd)
        rows = [
            dq.permute(0, 3, 1, 2, 4).reshape(b, length, nk * g * hd),
            dk.transpose(1, 2).reshape(b, length, nk * hd),
            dv.transpose(1, 2).reshape(b, length, nk * hd),
        ]
        return torch.cat(rows, dim=-1).view(b * length, -1)


_ROWS = (0,)
_BL = (0, 1)
_ALL = (0, 1, 2)
_STEPS: dict[str, dict[int, tuple[int, ...]]] = {
    "norm_in": {0: _ROWS},
    "norm_in_t": {0: _ROWS},
    "split_heads": {0: _ROWS, 1: _ROWS, 2: _BL, 3: _BL},
    "attention_grad": {0: _ALL, 1: _ALL, 2: _BL, 3: _BL, 4: _BL},
    "merge_heads": {0: _BL, 1: _BL},
    "merge_heads_t": {0: _BL, 1: _BL},
    "residual_norm": {0: _ROWS, 1: _ROWS},
    "residual_norm_t": {0: _ROWS, 1: _ROWS},
    "swiglu": {0: _ROWS},
    "add": {0: _ROWS, 1: _ROWS},
    "logsumexp": {0: _ROWS},
    "softmax_": {0: _ROWS, 1: _ROWS},
    "swiglu_backward": {0: _ROWS, 1: _ROWS},
    "norm_backward": {0: _ROWS, 1: _ROWS, 2: _ROWS, 4: _ROWS},
    "cast_t": {0: _ROWS},
    "first_norm_backward": {0: _ROWS, 1: _ROWS, 2: _ROWS, 4: _ROWS},
    "split_grad": {0: _ROWS, 1: _BL, 2: _BL},
    "merge_grads": {0: _BL, 1: _BL, 2: _BL, 3: _BL, 4: _BL},
}
"""Each glue function's batch-dependent sizes (argument -> dims: rows, batch, length), the
ones compiled as symbols; the model's sizes (width, heads, vocabulary) stay constants."""
_GLUE: dict[tuple, Glue] = {}
_COMPILE = True


def set_compile(enabled: bool) -> None:
    """Fuse the glue with torch.compile (the default) or run it as eager ops."""
    global _COMPILE
    _COMPILE = enabled


class _Compiled:
    """A glue function through torch.compile, falling back to the eager function for good
    (with one warning) if compiling fails: no C++ compiler, dynamo's recompile limit (the
    functions are shared by every model size and dtype in a process), an unsupported op."""

    def __init__(self, method, dynamic: dict[int, tuple[int, ...]]) -> None:
        self.eager, self.dynamic = method, dynamic
        # A copy of the code object gets its own compile cache: dynamo's recompile limit
        # counts per code object, and every Glue shares the class's methods.
        func = method.__func__
        own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__)
        self.fn = torch.compile(types.MethodType(own, method.__self__), fullgraph=True)

    def __call__(self, *args):
        if self.fn is self.eager:
            return self.eager(*args)
        # Symbolic from the first call: one kernel for every batch shape, so a run resumed
        # mid-way computes bit for bit what the uninterrupted run did.
        for index, dims in self.dynamic.items():
            for dim in dims:
                if args[index].shape[dim] > 1:
                    torch._dynamo.maybe_mark_dynamic(args[index], dim)
        try:
            return self.fn(*args)
        except Exception as err:  # noqa: BLE001 - any compile failure: run eagerly
            name = getattr(self.eager, "__name__", "glue")
            warnings.warn(
                f"vistune.train.llama_cpu: torch.compile failed for {name} ({type(err).__name__}:"
                f" {str(err).splitlines()[0] if str(err) else ''}); running it eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            self.fn = self.eager
            return self.eager(*args)


def glue(nh: int, nk: int, hd: int, eps: float, dtype: torch.dtype) -> Glue:
    """The (cached) Glue of these sizes, its functions compiled when compiling is on."""
    key = (nh, nk, hd, eps, dtype, _COMPILE)
    found = _GLUE.get(key)
    if found is None:
        found = Glue(nh, nk, hd, eps, dtype)
        if _COMPILE:
            for name, dynamic in _STEPS.items():
                setattr(found, name, _Compiled(getattr(found, name), dynamic))
        _GLUE[key] = found
    return found

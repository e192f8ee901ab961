"""vistune's hand-written Llama forward/backward equals transformers' (loss and every gradient).

The reference is transformers' LlamaModel (eager attention) + lm_head + the summed token loss
(vistune.model.loss) on the same right-padded batch, i.e. what TrainStep computes without
the CPU kernels.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.model import llama
from vistune.model.loss import supervised, token_loss
from vistune.model.splice import splice
from vistune.train import llama_cpu, llama_glue
from vistune.train.step import TrainStep

LENGTHS = [11, 7, 9]


def _llm(heads: int = 4, kv_heads: int = 2, tied: bool = True, **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **config,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_theta=10000.0,
        initializer_range=0.1,
    )
    llm = LlamaForCausalLM(cfg).float()
    llm.config._attn_implementation = "eager"
    with torch.no_grad():  # norms away from 1, so their gradients matter
        for name, p in llm.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return llm


def _batch(seed: int = 1):
    """Right-padded (inputs (B, L, D), positions, targets) with unsupervised prefixes."""
    gen = torch.Generator().manual_seed(seed)
    batch, length = len(LENGTHS), max(LENGTHS)
    inputs = torch.randn(batch, length, 64, generator=gen)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)
    targets = torch.randint(0, 300, (batch, length), generator=gen)
    targets[mask == 0] = IGNORE_INDEX
    targets[:, :3] = IGNORE_INDEX
    return inputs, mask, positions, targets


def _reference(llm, inputs, mask, positions, targets):
    hidden = llm.model(
        inputs_embeds=inputs, attention_mask=mask, position_ids=positions
    ).last_hidden_state
    keep, picked = supervised(targets)
    return token_loss(llm.lm_head(hidden[keep]), picked)


def _grads(llm, inputs, loss_fn):
    llm.zero_grad(set_to_none=True)
    inputs = inputs.detach().clone().requires_grad_(True)
    loss = loss_fn(inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
    return loss.detach(), grads, inputs.grad


@pytest.mark.parametrize("heads,kv_heads,tied", [(4, 2, True), (4, 4, False), (4, 1, True)])
def test_fp32_loss_and_gradients_equal_transformers(heads, kv_heads, tied):
    _assert_equal_to_transformers(_llm(heads, kv_heads, tied), tied)


SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("rope", sorted(SCALED_ROPE))
def test_scaled_rotary_embeddings_equal_transformers(rope):
    """Llama 3's and other scaled rotary embeddings: cos and sin come from the model."""
    # dynamic NTK scaling changes the frequencies once a batch is longer than the positions
    longest = 8 if rope == "dynamic" else 64
    llm = _llm(rope_scaling=SCALED_ROPE[rope], max_position_embeddings=longest)
    assert llama.trains(llm, torch.device("cpu"))
    _assert_equal_to_transformers(llm, tied=True)


def _assert_equal_to_transformers(llm, tied: bool) -> None:
    inputs, mask, positions, targets = _batch()
    ref = _grads(llm, inputs, lambda x: _reference(llm, x, mask, positions, targets))
    ours = _grads(
        llm, inputs, lambda x: llama_cpu.decoder_loss(llm, x, positions, targets, torch.float32)
    )
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-5)
    # every weight but an untied input embedding (the batch comes in as embeddings)
    assert ours[1].keys() == ref[1].keys()
    assert len(ref[1]) == len(list(llm.parameters())) - (0 if tied else 1)
    for name in ref[1]:
        torch.testing.assert_close(ours[1][name], ref[1][name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-4, atol=1e-7)


def test_bf16_is_as_close_to_fp32_as_transformers_autocast():
    llm = _llm()
    inputs, mask, positions, targets = _batch()
    exact = _grads(llm, inputs, lambda x: _reference(llm, x, mask, positions, targets))

    def autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _reference(llm, x, mask, positions, targets)

    amp = _grads(llm, inputs, autocast)
    ours = _grads(
        llm, inputs, lambda x: llama_cpu.decoder_loss(llm, x, positions, targets, torch.bfloat16)
    )

    def error(got):
        return max(float((got[n] - exact[1][n]).norm() / exact[1][n].norm()) for n in exact[1])

    assert all(g.dtype == torch.float32 for g in ours[1].values())
    assert abs(float(ours[0] - exact[0])) / float(exact[0]) < 1e-2
    assert error(ours[1]) < max(2 * error(amp[1]), 1e-3)


def test_frozen_llm_gives_input_gradients_only():
    llm = _llm()
    llm.requires_grad_(False)
    inputs, mask, positions, targets = _batch()
    ref = _grads(llm, inputs, lambda x: _reference(llm, x, mask, positions, targets))
    ours = _grads(
        llm, inputs, lambda x: llama_cpu.decoder_loss(llm, x, positions, targets, torch.float32)
    )
    assert ours[1] == {} == ref[1]
    torch.testing.assert_close(ours[2], ref[2], rtol=1e-4, atol=1e-7)


def test_eager_glue_equals_compiled_glue():
    llm = _llm()
    inputs, _, positions, targets = _batch()

    def run(x):  # fp32: in bf16 the two differ by where they round
        return llama_cpu.decoder_loss(llm, x, positions, targets, torch.float32)

    compiled = _grads(llm, inputs, run)
    llama_glue.set_compile(False)
    try:
        eager = _grads(llm, inputs, run)
    finally:
        llama_glue.set_compile(True)
    torch.testing.assert_close(eager[0], compiled[0], rtol=1e-6, atol=1e-5)
    for name in compiled[1]:
        torch.testing.assert_close(eager[1][name], compiled[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [True, False])
def test_transposing_glue_stores_the_transpose(compiled):
    """The *_t kernels exist to hand the weight-gradient products an operand stored (D, N)
    row-major: a transposed view of (N, D) has the same values but makes those products
    ~1.9x slower, and so would pass every value test."""
    torch.manual_seed(0)
    llama_glue.set_compile(compiled)
    try:
        k_ = llama_glue.glue(4, 2, 8, 1e-6, torch.bfloat16)
        h, w = torch.randn(40, 32), torch.randn(32)
        ao = torch.randn(40, 32).to(torch.bfloat16)
        outs = {
            "norm_in_t": k_.norm_in_t(h, w)[:2],
            "residual_norm_t": k_.residual_norm_t(h, ao, w)[1:3],
            "cast_t": k_.cast_t(h),
        }
    finally:
        llama_glue.set_compile(True)
    for name, (x, xt) in outs.items():
        assert xt.shape == (32, 40) and xt.stride() == (40, 1), name
        torch.testing.assert_close(xt, x.t(), rtol=0, atol=0, msg=name)


def test_attention_without_the_flash_kernel_gives_the_same_result(monkeypatch):
    """Where torch has no CPU flash kernel, batched matmuls give the same output and
    log-sum-exp (and so the same backward), with one warning."""
    torch.manual_seed(0)
    shapes = llama_cpu.Shapes(batch=2, length=13, heads=4, kv_heads=2, head_dim=8)
    q = torch.randn(2 * 2, 2 * 13, 8)
    k, v = torch.randn(4, 13, 8), torch.randn(4, 13, 8)
    flash = llama_cpu._attention(q, k, v, shapes)

    def missing(*_args, **_kwargs):
        raise NotImplementedError("no flash attention")

    monkeypatch.setattr(llama_cpu, "_FLASH", {"usable": True})
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", missing)
    with pytest.warns(RuntimeWarning, match="no CPU flash attention"):
        plain = llama_cpu._attention(q, k, v, shapes)
    assert llama_cpu._FLASH["usable"] is False
    for got, want in zip(plain, flash, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_head_gradient_in_vocabulary_blocks_equals_one_product():
    """_head_grad multiplies 1024-column blocks untransposed and transposes each into the
    result: the same numbers as dlogits.T @ xc, including a last, partial block."""
    torch.manual_seed(0)
    rows, vocab, width = 40, 2 * 1024 + 300, 16
    xc = torch.randn(rows, width).to(torch.bfloat16)
    dlogits = torch.randn(rows, vocab).to(torch.bfloat16)
    got = llama_cpu._head_grad(xc.t().contiguous(), dlogits, torch.float32)
    assert got.shape == (vocab, width) and got.dtype == torch.float32 and got.is_contiguous()
    want = dlogits.float().t() @ xc.float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # bf16 products


def test_weight_copies_last_until_invalidated():
    cache = llama_cpu.WeightCache()
    w, v = torch.randn(8, 4), torch.randn(2, 4)
    first = cache.get(torch.bfloat16, w, v)
    assert torch.equal(first, torch.cat([w, v]).to(torch.bfloat16))
    assert cache.get(torch.bfloat16, w, v) is first  # the next micro-batch: the same copy
    optimizer = torch.optim.AdamW([w.requires_grad_(), v.requires_grad_()], lr=0.5, fused=True)
    w.grad, v.grad = torch.ones_like(w), torch.ones_like(v)
    optimizer.step()  # in place, and the version counters do not move
    cache.invalidate()
    again = cache.get(torch.bfloat16, w, v)
    assert torch.equal(again, torch.cat([w, v]).to(torch.bfloat16).detach())
    assert again.data_ptr() == first.data_ptr()  # refreshed in its buffer
    with torch.no_grad():
        w.data = torch.zeros_like(w)  # no version bump, no invalidate(): the pointer moved
    assert torch.equal(cache.get(torch.bfloat16, w, v)[:8], torch.zeros(8, 4, dtype=torch.bfloat16))


IDS = [
    [5, 6, IMAGE_TOKEN_ID, 7, 8, 9],
    [10, 11, 12],
    [IMAGE_TOKEN_ID, 13, 14, 15, 16, 17, 18],
]
LABELS = [
    [IGNORE_INDEX] * 4 + [8, 9],
    [IGNORE_INDEX, 11, 12],
    [IGNORE_INDEX] * 3 + [15, 16, 17, 18],
]


def test_train_step_with_kernels_equals_without(tiny_model):
    """Through TrainStep: the spliced batch padded to LENGTH_MULTIPLE, the sparse gradient
    of the tied embedding and the projector all give transformers' numbers."""
    assert TrainStep(tiny_model).fast and TrainStep(tiny_model).sparse
    torch.manual_seed(2)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    results = []
    for fast in (True, False):
        step = TrainStep(tiny_model, fast=fast)
        step.zero_grad(set_to_none=True)
        loss = step(IDS, LABELS, feats)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (fast_loss, fast_grads), (loss, grads) = results
    torch.testing.assert_close(fast_loss, loss, rtol=1e-6, atol=1e-5)
    assert fast_grads.keys() == grads.keys()
    assert any("embed_tokens" in n for n in grads) and any("projector" in n for n in grads)
    for name in grads:
        assert fast_grads[name].layout == torch.strided, name
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_length_padding_changes_nothing(tiny_model):
    embed = tiny_model.llm.get_input_embeddings()
    torch.manual_seed(3)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    with torch.no_grad():
        embeds = tiny_model.project(feats)
        losses = []
        for multiple in (1, 16):
            batch = splice(IDS, embeds, embed, LABELS, multiple=multiple)
            inputs, positions, targets = batch.inputs_embeds, batch.position_ids, batch.labels
            assert inputs.shape[1] % multiple == 0
            losses.append(
                llama_cpu.decoder_loss(tiny_model.llm, inputs, positions, targets, torch.float32)
            )
    assert inputs.shape[1] == 16
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)

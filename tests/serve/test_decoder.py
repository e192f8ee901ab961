"""The Llama decode step reproduces transformers' forward (fp32 and bf16), with q/k/v and
gate/up fused (the CPU's layout) or as the LLM's own weights (no copy: other devices')."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from vistune.config import GenerationConfig
from vistune.model.llama import supports
from vistune.serve.decoder import (
    INT4_GROUP,
    INT8_BLOCK,
    INT8_ROWS,
    Int4Weight,
    Int8Weight,
    LlamaDecoder,
    _mm,
    _step_attention,
)
from vistune.serve.generate import Generator, positions_from_mask


def left_padded(llm, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, llm.config.vocab_size, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    return ids, mask


@torch.inference_mode()
def reference_logits(llm, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' forward over the whole sequence: last-position logits. # (B, V)"""
    out = llm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    return out.logits[:, -1].float()


@torch.inference_mode()
def decoder_logits(
    llm,
    ids: torch.Tensor,
    mask: torch.Tensor,
    prompt: int,
    fused: bool | None = None,
    quantize: str = "none",
) -> torch.Tensor:
    """Prefill `prompt` columns with the decoder in one pass, then the rest one by one."""
    pos = positions_from_mask(mask)
    dec = LlamaDecoder(llm, fused=fused, quantize=quantize)
    state = dec.allocate(mask[:, :prompt], extra=ids.shape[1] - prompt)
    embeds = llm.get_input_embeddings()(ids[:, :prompt])
    logits = dec.forward(state, embeds, pos[:, :prompt], mask[:, :prompt])
    for t in range(prompt, ids.shape[1]):
        logits = dec.step(state, ids[:, t], pos[:, t])
    return logits


def test_decoder_takes_llama_only(tiny_llm):
    assert supports(tiny_llm)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="llama"):
        LlamaDecoder(gpt2)


def test_layout_follows_the_device_and_only_the_fused_one_copies(tiny_llm):
    """On the CPU q/k/v and gate/up are fused (a copy, faster there). Anywhere else (the
    meta device stands in for a GPU here) every matrix the decoder multiplies is the LLM's
    own parameter: the weights are held once."""
    cpu = LlamaDecoder(tiny_llm)
    own = {p.data_ptr() for p in tiny_llm.parameters()}
    assert cpu.fused and len(cpu.layers[0].qkv) == len(cpu.layers[0].gate_up) == 1
    assert cpu.layers[0].qkv[0].data_ptr() not in own
    assert cpu.layers[0].gate_up[0].data_ptr() not in own
    for llm in (copy.deepcopy(tiny_llm).to("meta"), tiny_llm):
        plain = LlamaDecoder(llm) if llm.device.type == "meta" else LlamaDecoder(llm, fused=False)
        assert not plain.fused
        params = {id(p) for p in llm.parameters()}
        for layer in plain.layers:
            weights = [*layer.qkv, layer.o, *layer.gate_up, layer.down]
            assert len(weights) == 7 and all(id(w) in params for w in weights)
        assert id(plain.lm_head) in params


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lengths", [[9], [9, 5, 7]])
def test_prefill_and_steps_match_transformers_fp32(tiny_llm, lengths, fused):
    ids, mask = left_padded(tiny_llm, lengths)
    width = ids.shape[1]
    torch.testing.assert_close(
        decoder_logits(tiny_llm, ids, mask, prompt=width, fused=fused),
        reference_logits(tiny_llm, ids, mask),
        atol=1e-4,
        rtol=1e-4,
    )
    full = torch.cat([ids, ids[:, -4:]], dim=1)  # 4 decode steps after the prompt
    full_mask = torch.cat([mask, torch.ones(len(lengths), 4, dtype=torch.long)], dim=1)
    ref = reference_logits(tiny_llm, full, full_mask)
    ours = decoder_logits(tiny_llm, full, full_mask, prompt=width, fused=fused)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_attention_matches_sdpa_with_grouped_heads_and_padding(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g)  # 6 query heads over 2 KV heads
    keys, values = (torch.randn(3, 2, 11, 8, generator=g).to(dtype) for _ in range(2))
    allowed = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    allowed[1, ..., :4] = False  # a left-padded row
    mask = torch.where(allowed, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    for m in (mask, None):
        ref = F.scaled_dot_product_attention(q.to(dtype), keys, values, m, enable_gqa=True)
        ours = _step_attention(q, keys, values, m)
        assert ours.dtype == torch.float32 and ours.shape == (3, 6, 1, 8)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # SDPA rounds q and its output to bf16
        torch.testing.assert_close(ours, ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [True, False])
def test_decode_steps_match_transformers_bf16(tiny_llm, fused):
    llm = copy.deepcopy(tiny_llm).to(torch.bfloat16)
    ids, mask = left_padded(llm, [12])
    full = torch.cat([ids, ids[:, :5]], dim=1)
    full_mask = torch.ones_like(full)
    ref = reference_logits(llm, full, full_mask)
    ours = decoder_logits(llm, full, full_mask, prompt=12, fused=fused)
    # Ours keeps the residual stream in fp32 where transformers rounds it to bf16 each layer.
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()
    assert ours.argmax(-1).tolist() == ref.argmax(-1).tolist()


def test_fast_and_plain_loops_give_the_same_tokens(tiny_llm, tiny_tokenizer):
    ids, mask = left_padded(tiny_llm, [6, 10, 3], seed=1)
    with torch.no_grad():
        embeds = tiny_llm.get_input_embeddings()(ids)
    cfg = GenerationConfig(max_new_tokens=16)
    fast = Generator(tiny_llm, tiny_tokenizer).run(embeds, mask, cfg)
    plain = Generator(tiny_llm, tiny_tokenizer, fast=False).run(embeds, mask, cfg)
    assert Generator(tiny_llm, tiny_tokenizer).fast
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]


def test_decoder_follows_weight_updates(tiny_llm, tiny_tokenizer):
    llm = copy.deepcopy(tiny_llm)
    gen = Generator(llm, tiny_tokenizer)
    ids, mask = left_padded(llm, [8], seed=2)
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
    cfg = GenerationConfig(max_new_tokens=10)
    before = gen.run(embeds, mask, cfg)[0].token_ids
    with torch.no_grad():  # an optimizer step changes weights in place
        for block in llm.model.layers:
            block.mlp.up_proj.weight.mul_(-3.0)
    after = gen.run(embeds, mask, cfg)[0].token_ids
    plain = Generator(llm, tiny_tokenizer, fast=False).run(embeds, mask, cfg)[0].token_ids
    assert after == plain and after != before


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers API
def test_lora_wrapped_llm_falls_back_to_transformers(tiny_llm, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    llm = copy.deepcopy(tiny_llm)
    gen = Generator(llm, tiny_tokenizer)
    ids, mask = left_padded(llm, [7], seed=3)
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
    cfg = GenerationConfig(max_new_tokens=8)
    gen.run(embeds, mask, cfg)
    assert gen._decoder is not None
    peft = get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():  # a trained adapter: nonzero B
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    assert not supports(llm)
    out = gen.run(embeds, mask, cfg)[0].token_ids
    assert gen._decoder is None
    ref = Generator(llm, tiny_tokenizer, fast=False).run(embeds, mask, cfg)[0].token_ids
    assert out == ref


def test_int8_weight_is_the_weight_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 48, generator=g) * torch.linspace(0.1, 3.0, 24)[:, None]).bfloat16()
    q = Int8Weight.of(w)
    assert q.q.dtype == torch.int8 and q.scales.dtype == torch.bfloat16 and q.dense is w
    assert q.q.abs().max() == 127  # each row's largest weight takes the whole range
    back = q.q.float() * q.scales.float()[:, None]
    # rounding to a step of scale (plus the scale's own bf16 rounding, 2**-8 of the weight)
    bound = q.scales.float()[:, None] * 0.5 + w.float().abs() * 2**-8
    assert ((back - w.float()).abs() <= bound + 1e-6).all()
    x = torch.randn(3, 48, generator=g)
    out = _mm(x, q)
    assert out.dtype == torch.float32 and out.shape == (3, 24)
    torch.testing.assert_close(out, x.bfloat16().float() @ back.T, atol=5e-2, rtol=1e-2)
    many = torch.randn(INT8_ROWS + 1, 48, generator=g).bfloat16()  # a prefill: the dense weight
    torch.testing.assert_close(_mm(many, q), F.linear(many, w))


def test_int8_keeps_dense_the_widths_the_kernel_sums_wrong(tiny_llm):
    dec = LlamaDecoder(copy.deepcopy(tiny_llm).to(torch.bfloat16), quantize="int8")
    assert not isinstance(dec._weight(torch.zeros(8, 40, dtype=torch.bfloat16)), Int8Weight)
    assert isinstance(dec._weight(torch.zeros(8, 48, dtype=torch.bfloat16)), Int8Weight)
    assert INT8_BLOCK == 16


def test_int8_decode_steps_stay_near_bf16(tiny_llm, tiny_tokenizer):
    """The steps' logits move by the weights' rounding, no more. (Greedy answers are
    compared on the real model, benchmarks/serve.py: a random tiny model's near-ties flip.)"""
    llm = copy.deepcopy(tiny_llm).to(torch.bfloat16)
    ids, mask = left_padded(llm, [6, 10, 3], seed=2)
    int8 = Generator(llm, tiny_tokenizer, quantize="int8")
    layer = int8.fast_decoder().layers[0]
    assert all(isinstance(w, Int8Weight) for w in (*layer.qkv, layer.o, *layer.gate_up))
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids)
    answers = int8.run(embeds, mask, GenerationConfig(max_new_tokens=6))
    assert len(answers) == 3 and all(1 <= len(c.token_ids) <= 6 for c in answers)
    full = torch.cat([ids, ids[:, -4:]], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    ours = decoder_logits(llm, full, full_mask, prompt=ids.shape[1], quantize="int8")
    ref = decoder_logits(llm, full, full_mask, prompt=ids.shape[1])
    assert 0 < (ours - ref).abs().max() <= 0.05 * ref.abs().max()


def test_quantized_decoding_refuses_what_it_cannot_decode(tiny_llm):
    for quantize in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"{quantize} decoding runs on the CPU with bf16 "
                           "weights, not cpu float32"):  # fmt: skip
            LlamaDecoder(tiny_llm, quantize=quantize)
    with pytest.raises(ValueError, match="quantize must be one of none, int8, int4, got 'int2'"):
        LlamaDecoder(tiny_llm, quantize="int2")


def test_int4_weight_is_the_weight_within_half_a_step_per_group():
    g = torch.Generator().manual_seed(0)
    rows, cols = 32, 4 * INT4_GROUP
    spread = torch.linspace(0.1, 3.0, cols // INT4_GROUP).repeat_interleave(INT4_GROUP)
    w = (torch.randn(rows, cols, generator=g) * spread + 0.3).bfloat16()  # groups of all scales
    q = Int4Weight.of(w)
    assert q.dense is w and q.packed.dtype == torch.uint8 and q.group == INT4_GROUP
    assert q.scale_zero.shape == (cols // INT4_GROUP, rows, 2)
    back = q.dequantized()  # (rows, cols): what the kernel multiplies by
    step = q.scale_zero[..., 0].float().T.repeat_interleave(INT4_GROUP, dim=1)  # (rows, cols)
    # half a step of rounding, plus the bf16 rounding of the scale and offset (~2**-8 of
    # the group's range, times up to 8 steps)
    bound = step * 0.5 + (step * 8 + w.float().abs()) * 2**-7
    assert ((back - w.float()).abs() <= bound).all()
    assert ((back - w.float()).abs() > 0).any()  # it is rounded
    x = torch.randn(3, cols, generator=g)
    out = _mm(x, q)
    assert out.dtype == torch.float32 and out.shape == (3, rows)
    ref = x.bfloat16().float() @ back.T
    # the kernel returns bf16: a rounding of 2**-8 of the largest sums
    torch.testing.assert_close(out, ref, atol=2**-7 * ref.abs().max().item(), rtol=1e-2)
    many = torch.randn(INT8_ROWS + 1, cols, generator=g).bfloat16()  # a prefill: the dense weight
    torch.testing.assert_close(_mm(many, q), F.linear(many, w))


def test_int4_keeps_dense_the_widths_its_groups_do_not_divide(tiny_llm):
    dec = LlamaDecoder(copy.deepcopy(tiny_llm).to(torch.bfloat16), quantize="int4")
    assert not isinstance(dec._weight(torch.zeros(16, 48, dtype=torch.bfloat16)), Int4Weight)
    assert not isinstance(dec._weight(torch.zeros(8, 64, dtype=torch.bfloat16)), Int4Weight)
    assert isinstance(dec._weight(torch.zeros(16, 64, dtype=torch.bfloat16)), Int4Weight)
    layer = dec.layers[0]
    assert all(isinstance(w, Int4Weight) for w in (*layer.qkv, layer.o, *layer.gate_up, layer.down))
    assert isinstance(dec.lm_head, Int4Weight)


def test_int4_decode_steps_stay_near_bf16(tiny_llm, tiny_tokenizer):
    """The steps' logits move by the weights' rounding (16 levels a group: more than int8's
    255 a row), no more; greedy answers on the real model: benchmarks/serve.py."""
    llm = copy.deepcopy(tiny_llm).to(torch.bfloat16)
    ids, mask = left_padded(llm, [6, 10, 3], seed=2)
    full = torch.cat([ids, ids[:, -4:]], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    ref = decoder_logits(llm, full, full_mask, prompt=ids.shape[1])
    int8 = decoder_logits(llm, full, full_mask, prompt=ids.shape[1], quantize="int8")
    int4 = decoder_logits(llm, full, full_mask, prompt=ids.shape[1], quantize="int4")
    assert 0 < (int4 - ref).abs().max() <= 0.15 * ref.abs().max()
    # coarser than int8, and tracking the same logits (not noise of that size)
    assert (int4 - ref).abs().mean() > (int8 - ref).abs().mean()
    assert F.cosine_similarity(int4 - ref.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True),
                               dim=-1).min() > 0.98  # fmt: skip

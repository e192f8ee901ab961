"""The shared Llama maths equals transformers' modules, and the fast-path checks say which
LLMs (and devices) take vistune's own passes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from vistune.model import llama

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _llm(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **config,
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(cfg).float()


def test_supports_plain_llama_only():
    assert llama.supports(_llm())
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert not llama.supports(gpt2)
    assert not llama.supports(_llm(attention_bias=True))
    biased = _llm()
    biased.lm_head = torch.nn.Linear(64, 300, bias=True)  # a bias the config does not announce
    assert not llama.supports(biased)


def test_trains_only_plain_llama_on_the_cpu():
    from peft import LoraConfig, get_peft_model

    llm = _llm()
    assert llama.trains(llm, CPU)
    assert not llama.trains(llm, CUDA)
    checkpointed = _llm()
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)  # transformers 5.x
    (enable or checkpointed.gradient_checkpointing_enable)()
    assert not llama.trains(checkpointed, CPU)
    lora = get_peft_model(_llm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not llama.trains(lora.base_model.model, CPU)
    # what this path would silently leave out: attention dropout, a bias the config hides
    assert not llama.trains(_llm(attention_dropout=0.1), CPU)
    biased = _llm()
    biased.lm_head = torch.nn.Linear(64, 300, bias=True)
    assert not llama.trains(biased, CPU)
    longrope = _llm(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8})  # fmt: skip
    assert not llama.trains(longrope, CPU)  # not tested here
    # a depth cut in the config only: transformers runs layers[:num_hidden_layers]
    cut = _llm()
    cut.config.num_hidden_layers -= 1
    assert not llama.trains(cut, CPU)
    assert not llama.supports(cut)  # generation runs every layer module too


def test_weights_are_fused_on_the_cpu_only():
    """A fused copy of q/k/v and gate/up is made where it is faster (the CPU); on a GPU the
    LLM's own weights are multiplied, held once (tests/serve/test_decoder.py)."""
    assert llama.fuses(CPU)
    assert not llama.fuses(CUDA)
    assert not llama.fuses(torch.device("meta"))


def test_fused_layout_stacks_rows_in_order():
    w = llama.block_weights(_llm().model.layers[0])
    qkv = llama.fuse((w.q, w.k, w.v), torch.bfloat16)
    assert qkv.shape == (64 + 2 * 32, 64) and qkv.dtype == torch.bfloat16
    assert torch.equal(qkv, torch.cat([w.q, w.k, w.v]).to(torch.bfloat16))
    out = torch.empty(2 * 96, 64)
    assert llama.fuse((w.gate, w.up), out=out) is out
    assert torch.equal(out[:96], w.gate) and torch.equal(out[96:], w.up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_llama_rms_norm(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(64))
    norm = norm.to(dtype)
    x = torch.randn(3, 7, 64).to(dtype)
    want = norm(x)
    got = llama.rms_norm(x, norm.weight, 1e-5)
    assert got.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    normed, r = llama.rms(x.float(), norm.weight.float(), 1e-5)
    torch.testing.assert_close(normed, want.float(), **tol)
    assert r.shape == (3, 7, 1)


def test_rms_backward_is_the_gradient_of_rms():
    torch.manual_seed(0)
    h, w = torch.randn(5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    dy = torch.randn(5, 16)
    out, r = llama.rms(h, w, 1e-6)
    out.backward(dy)
    dh, dw = llama.rms_backward(dy, h.detach(), r.detach(), w.detach())
    torch.testing.assert_close(dh, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, w.grad, rtol=1e-5, atol=1e-6)


def test_rope_equals_transformers_and_its_backward_is_the_transpose():
    llm = _llm(rope_scaling={"rope_type": "linear", "factor": 2.0})
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    positions = torch.arange(5).repeat(2, 1) + torch.tensor([[0], [3]])
    cos, sin = llm.model.rotary_emb(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    cos_, ssin = llama.rope_tables(llm.model.rotary_emb, q, positions)  # (B, L, hd)
    torch.testing.assert_close(cos_, cos, rtol=0, atol=0)
    torch.testing.assert_close(llama.rope(q, cos_[:, None], ssin[:, None]), want_q)
    torch.testing.assert_close(llama.rope(k, cos_[:, None], ssin[:, None]), want_k)
    x = q.clone().requires_grad_(True)
    dy = torch.randn_like(q)
    llama.rope(x, cos_[:, None], ssin[:, None]).backward(dy)
    torch.testing.assert_close(llama.rope_backward(dy, cos_[:, None], ssin[:, None]), x.grad)
    half = ssin.shape[-1] // 2
    assert torch.equal(ssin[..., :half], -sin[..., :half])
    assert torch.equal(ssin[..., half:], sin[..., half:])

"""Tiny causal LM + byte-level BPE tokenizer for the generation tests (built from configs)."""

from __future__ import annotations

import pytest
import torch

from ..conftest import build_bpe_tokenizer

CORPUS = [
    "the cat sat on the mat. the dog ran in the park.",
    "a red square and a blue circle are in the picture.",
    "Human: what is in the image? Assistant: a cat. ###",
    "café naïve 東京 😀 — multi-byte text for the detokeniser.",
] * 4


def build_tokenizer():
    return build_bpe_tokenizer(
        CORPUS, 320, ["<|endoftext|>"], eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_llm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    llm = LlamaForCausalLM(config).eval()
    # Random init is nearly flat; sharpen the output so greedy picks are far from ties.
    with torch.no_grad():
        llm.lm_head.weight.mul_(20.0)
    return llm


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llm(tiny_tokenizer):
    return build_llm(len(tiny_tokenizer))

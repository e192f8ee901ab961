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


class LiveServer:
    """A real uvicorn server on a free loopback port, run in a thread (for tests)."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

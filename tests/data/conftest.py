"""Fixtures for the data tests: small deterministic byte-level BPE tokenizers (trained on an
in-test corpus, ChatML chat template as SmolLM2's) so the template tests need no weights."""

from __future__ import annotations

import pytest

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions.",
    "###Human: What is in the photo?###Assistant: A red square and a blue circle.###",
    "Human: Describe the image briefly.###Assistant: A cat sits on a mat.###",
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant the cat sat on the mat, the dog ran in the park.",
    "café naïve 東京 — multi-byte text.",
] * 3


def _build(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<s>" if bos else None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """ChatML byte-level BPE tokenizer that adds no BOS (like SmolLM2's)."""
    return _build(bos=False)


@pytest.fixture(scope="session")
def bos_tokenizer():
    """The same tokenizer, but it puts "<s>" before every encoded text (like Llama's)."""
    return _build(bos=True)


def _sentencepiece(legacy: bool):
    """A Llama-style SentencePiece BPE (byte fallback, "▁" for spaces, BOS "<s>") as
    transformers builds from a `tokenizer.model`: `legacy=True` as LLaMA-1 / Vicuna v0
    load (a `Prepend("▁")` normalizer: every encode call starts with a word marker), else
    Metaspace with `prepend_scheme="first"`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # learn pieces within words, as SP does
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]  # fmt: skip
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=["▁"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    if legacy:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.pre_tokenizer = None
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session", params=[True, False], ids=["legacy", "metaspace"])
def sentencepiece_tokenizer(request):
    return _sentencepiece(legacy=request.param)

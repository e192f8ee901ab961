"""Conversation templates (paper §4.2, Table 2): exact prompt strings, supervised spans, errors."""

from __future__ import annotations

import copy
import random

import pytest

from vistune.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    TEMPLATES,
    Tokenized,
    build_prompt,
    get_template,
    stop_strings,
    to_messages,
    tokenize_conversation,
    tokenize_prompt,
)
from vistune.errors import DataError, ModelDirError, TemplateMismatchError

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n"
)
CONV = [
    {"from": "human", "value": "<image>\nWhat is in the photo?"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "And?"},
    {"from": "gpt", "value": "A blue circle."},
]


def supervised_spans(tok, out: Tokenized) -> list[str]:
    """Decoded runs of supervised tokens, in order."""
    spans, run = [], []
    for i, lab in zip(out.input_ids, out.labels, strict=True):
        if lab == IGNORE_INDEX:
            if run:
                spans.append(tok.decode(run))
            run = []
        else:
            assert lab == i
            run.append(i)
    if run:
        spans.append(tok.decode(run))
    return spans


def full_text(tok, ids: list[int]) -> str:
    """Decoded ids with "<image>" back in place of IMAGE_TOKEN_ID."""
    parts, run = [], []
    for i in ids:
        if i == IMAGE_TOKEN_ID:
            parts += [tok.decode(run), "<image>"]
            run = []
        else:
            run.append(i)
    return "".join(parts + [tok.decode(run)])


def check_image_token(out: Tokenized) -> None:
    assert out.input_ids.count(IMAGE_TOKEN_ID) == 1
    assert out.labels[out.input_ids.index(IMAGE_TOKEN_ID)] == IGNORE_INDEX
    assert len(out.input_ids) == len(out.labels)


def test_vicuna_v0_exact_sequence_and_spans(tiny_tokenizer):
    out = tokenize_conversation(CONV, tiny_tokenizer, "vicuna_v0", "s1")
    assert full_text(tiny_tokenizer, out.input_ids) == (
        SYSTEM + "###Human: <image>\nWhat is in the photo?###Assistant: A red square.###"
        "Human: And?###Assistant: A blue circle.###"
    )
    assert supervised_spans(tiny_tokenizer, out) == [" A red square.###", " A blue circle.###"]
    check_image_token(out)
    prompt = [{"role": "user", "content": "<image>\nWhat is in the photo?"}]
    assert build_prompt(prompt, tiny_tokenizer, "vicuna_v0") == (
        SYSTEM + "###Human: <image>\nWhat is in the photo?###Assistant:"
    )
    assert stop_strings("vicuna_v0", tiny_tokenizer) == ("###",)


def test_plain_exact_sequence_and_spans(tiny_tokenizer):
    conv = [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "A cat sits on a mat."},
    ]
    out = tokenize_conversation(conv, tiny_tokenizer, "plain", "cap1")
    assert out.input_ids[0] == IMAGE_TOKEN_ID
    assert full_text(tiny_tokenizer, out.input_ids) == "<image>A cat sits on a mat.\n"
    assert supervised_spans(tiny_tokenizer, out) == ["A cat sits on a mat.\n"]
    check_image_token(out)
    prompt = [{"role": "user", "content": "<image>\nDescribe it."}]
    assert build_prompt(prompt, tiny_tokenizer, "plain") == "<image>"
    assert tokenize_prompt(prompt, tiny_tokenizer, "plain") == [IMAGE_TOKEN_ID]
    assert stop_strings("plain", tiny_tokenizer) == ("\n",)


def test_chat_template_exact_sequence_and_spans(tiny_tokenizer):
    out = tokenize_conversation(CONV, tiny_tokenizer, "chat_template", "s2")
    assert full_text(tiny_tokenizer, out.input_ids) == (
        SMOL_SYSTEM + "<|im_start|>user\n<image>\nWhat is in the photo?<|im_end|>\n"
        "<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\nA blue circle.<|im_end|>\n"
    )
    assert supervised_spans(tiny_tokenizer, out) == [
        "A red square.<|im_end|>",
        "A blue circle.<|im_end|>",
    ]
    check_image_token(out)
    prompt = [{"role": "user", "content": "<image>\nWhat is in the photo?"}]
    assert build_prompt(prompt, tiny_tokenizer, "chat_template") == (
        SMOL_SYSTEM
        + "<|im_start|>user\n<image>\nWhat is in the photo?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert stop_strings("chat_template", tiny_tokenizer) == ("<|im_end|>",)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_prompt_ids_are_a_training_prefix(tiny_tokenizer, template):
    """What generation sees after turn 1 (and after turn 2) is exactly what training saw, and
    the next token is the first supervised one."""
    out = tokenize_conversation(CONV, tiny_tokenizer, template, "s3")
    msgs = to_messages(CONV)
    # plain drops the human text, so its later turns have no context tokens
    for upto in (1,) if template == "plain" else (1, 3):
        ids = tokenize_prompt(msgs[:upto], tiny_tokenizer, template)
        assert out.input_ids[: len(ids)] == ids
        assert out.labels[len(ids) - 1] == IGNORE_INDEX
        assert out.labels[len(ids)] != IGNORE_INDEX


def test_answer_tokenised_as_its_own_piece(tiny_tokenizer):
    """The BPE boundary choice: the answer (with its leading space and stop) is tokenised on
    its own, never merged with "Assistant:"."""
    out = tokenize_conversation(CONV[:2], tiny_tokenizer, "vicuna_v0")
    answer_ids = tiny_tokenizer.encode(" A red square.###", add_special_tokens=False)
    sup = [i for i, lab in zip(out.input_ids, out.labels, strict=True) if lab != IGNORE_INDEX]
    assert sup == answer_ids
    assert out.input_ids[-len(answer_ids) :] == answer_ids


def test_bos_is_prepended_once_and_not_supervised(bos_tokenizer):
    bos = bos_tokenizer.convert_tokens_to_ids("<s>")
    out = tokenize_conversation(CONV, bos_tokenizer, "vicuna_v0")
    assert out.input_ids[0] == bos and out.input_ids.count(bos) == 1
    assert out.labels[0] == IGNORE_INDEX
    assert supervised_spans(bos_tokenizer, out) == [" A red square.###", " A blue circle.###"]
    chat = tokenize_conversation(CONV, bos_tokenizer, "chat_template")
    assert bos not in chat.input_ids  # the chat template writes its own markers


def test_seeded_random_image_placement(tiny_tokenizer):
    conv = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}]
    firsts = {to_messages(conv, rng=random.Random(s))[0]["content"] for s in range(20)}
    assert firsts == {"<image>\nWhat is it?", "What is it?\n<image>"}
    a = [to_messages(conv, rng=random.Random(7))[0]["content"] for _ in range(3)]
    assert len(set(a)) == 1
    assert to_messages(conv)[0]["content"] == "What is it?\n<image>"  # no rng: data's own
    out = tokenize_conversation(conv, tiny_tokenizer, "vicuna_v0", rng=random.Random(1))
    check_image_token(out)
    assert supervised_spans(tiny_tokenizer, out) == [" A cat.###"]


def test_text_only_sample_has_no_image_token(tiny_tokenizer):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    out = tokenize_conversation(conv, tiny_tokenizer, "chat_template", rng=random.Random(0))
    assert IMAGE_TOKEN_ID not in out.input_ids
    assert supervised_spans(tiny_tokenizer, out) == ["Hello.<|im_end|>"]


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        ([{"from": "bot", "value": "x"}], "unknown 'from' 'bot'"),
        ([{"from": "gpt", "value": "x"}], "expected 'human'"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "expected 'gpt'"),
        ([{"from": "human", "value": "a"}], "no answer"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "string 'value'"),
        ([], "non-empty"),
        (
            [{"from": "human", "value": "<image>a<image>"}, {"from": "gpt", "value": "b"}],
            "once",
        ),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], "once"),
    ],
)
def test_malformed_conversations_raise_data_error(tiny_tokenizer, conv, message):
    with pytest.raises(DataError, match=f"sample cc-9.*{message}"):
        tokenize_conversation(conv, tiny_tokenizer, "vicuna_v0", sample_id="cc-9")


def test_decode_mismatch_raises_naming_the_sample(tiny_tokenizer):
    from tokenizers import normalizers

    lossy = copy.deepcopy(tiny_tokenizer)
    lossy.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(TemplateMismatchError, match="sample q-42.*' A red square.###'"):
        tokenize_conversation(CONV, lossy, "vicuna_v0", sample_id="q-42")


def test_unknown_template_and_missing_chat_template(tiny_tokenizer):
    with pytest.raises(ValueError, match="valid: vicuna_v0, plain, chat_template"):
        get_template("vicuna")
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(ModelDirError, match="no chat_template"):
        tokenize_conversation(CONV, bare, "chat_template")


def test_bad_prompt_messages(tiny_tokenizer):
    with pytest.raises(DataError, match="last message must be from the user"):
        build_prompt(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            tiny_tokenizer,
            "vicuna_v0",
        )
    with pytest.raises(DataError, match="role 'user'"):
        build_prompt([{"role": "system", "content": "a"}], tiny_tokenizer, "vicuna_v0")


@pytest.mark.slow
@pytest.mark.parametrize("template", ["vicuna_v0", "chat_template"])
def test_smollm2_tokenizer_round_trip(default_weights, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_weights.llm_dir)
    out = tokenize_conversation(CONV, tok, template, "smol")
    check_image_token(out)
    stop = stop_strings(template, tok)[0]
    lead = " " if template == "vicuna_v0" else ""
    assert supervised_spans(tok, out) == [
        lead + "A red square." + stop,
        lead + "A blue circle." + stop,
    ]
    if template == "chat_template":
        assert stop == "<|im_end|>"
        assert full_text(tok, out.input_ids).startswith("<|im_start|>system\n")
    ids = tokenize_prompt(to_messages(CONV)[:1], tok, template)
    assert out.input_ids[: len(ids)] == ids


def test_chat_template_finds_short_answers_by_position(tiny_tokenizer):
    """A one-letter answer that also occurs earlier in the assistant header is located where
    the template puts the answer, not at its first occurrence."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + "
        "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
    )
    conv = [{"from": "human", "value": "Pick one"}, {"from": "gpt", "value": "s"}]
    out = tokenize_conversation(conv, tok, "chat_template", "sq-1")
    assert supervised_spans(tok, out) == ["s<|im_end|>"]
    assert full_text(tok, out.input_ids).endswith("<|im_start|>assistant: s<|im_end|>")


def test_plain_prompt_without_image_is_refused(tiny_tokenizer):
    with pytest.raises(DataError, match="plain template renders nothing"):
        tokenize_prompt([{"role": "user", "content": "hi"}], tiny_tokenizer, "plain")

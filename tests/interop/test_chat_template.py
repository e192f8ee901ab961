"""The exported processor chat template renders exactly vistune's prompt text."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vistune.data.conversation import build_prompt
from vistune.errors import ModelDirError
from vistune.interop.chat_template import processor_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat is it?"}],
    [{"role": "user", "content": "What is it?\n<image>"}],
    [{"role": "user", "content": "<image>\nDescribe it."},
     {"role": "assistant", "content": "A red \"square\" and a 'circle'."},
     {"role": "user", "content": "Where is the circle?"}],
    [{"role": "user", "content": "No image here {{ }} {% raw %}"}],
]  # fmt: skip


def as_parts(messages: list[dict]) -> list[dict]:
    """Processor messages: "<image>" and the text around it as typed parts, in order."""
    out = []
    for m in messages:
        parts = []
        for i, piece in enumerate(m["content"].split("<image>")):
            if i:
                parts.append({"type": "image"})
            if piece.strip("\n"):
                parts.append({"type": "text", "text": piece.strip("\n")})
        out.append({"role": m["role"], "content": parts})
    return out


def render(template: str, messages: list[dict]) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["vicuna_v0", "plain", "chat_template"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_renders_vistunes_prompt(name, messages, tiny_model):
    if name == "plain" and len(messages) > 1:
        pytest.skip("plain (stage 1) takes one exchange")
    tokenizer = tiny_model.tokenizer
    template = processor_chat_template(name, tokenizer.chat_template)
    expected = build_prompt(messages, tokenizer, name)
    assert render(template, messages) == expected  # string content, as vistune's own
    if all("<image>" not in m["content"] or m["content"].startswith("<image>\n")
           or m["content"].endswith("\n<image>") for m in messages):  # fmt: skip
        assert render(template, as_parts(messages)) == expected


def test_chat_template_needs_the_tokenizers_own():
    with pytest.raises(ModelDirError, match="no chat_template"):
        processor_chat_template("chat_template", None)
    with pytest.raises(ValueError, match="valid: vicuna_v0, plain, chat_template"):
        processor_chat_template("vicuna_v1", None)

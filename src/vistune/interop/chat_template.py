"""The processor chat template of an exported model: vistune's prompt, in Jinja.

`processor.apply_chat_template` hands the template messages whose content is a list of
parts (`{"type": "image"}`, `{"type": "text", "text": ...}`); vistune's templates
(vistune.data.conversation) read one string per message with "<image>" where the image
goes, and `vistune chat` puts it first: "<image>\\n" + the question. The exported template
first turns each message into that string (parts joined by "\\n", an image as "<image>"),
then renders it as the model was trained:

- `chat_template`: the LLM tokenizer's own template, unchanged, after that prologue;
- `vicuna_v0`: the paper's Table 2 (`_vicuna_v0_segments`), "###" between turns;
- `plain`: stage 1's "<image>" and the caption + "\\n" (`_plain_segments`).

A BOS is not written by these templates: the processor's tokenizer call adds the
tokenizer's own leading special tokens, as vistune does for `vicuna_v0` and `plain`.
`hf_export` checks the result token for token against `tokenize_prompt` before it writes.
"""

from __future__ import annotations

import json

from vistune.data.conversation import (
    IMAGE_PLACEHOLDER,
    VICUNA_V0_SEP,
    VICUNA_V0_SYSTEM,
    get_template,
)
from vistune.errors import ModelDirError


def _literal(text: str) -> str:
    """A Jinja string literal holding `text` (JSON's escapes are Jinja's for these)."""
    return json.dumps(text)


_IMAGE = _literal(IMAGE_PLACEHOLDER)
# Every tag strips the whitespace around it, so the prologue renders nothing itself; the
# last one keeps what follows (the LLM template's own first characters) as they are.
PROLOGUE = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(texts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- set parts.texts = parts.texts + [" + _IMAGE + "] -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set parts.texts = parts.texts + [part['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = parts.texts | join('\\n') -%}"
    "{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': content}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages %}"
)

_SEP = _literal(VICUNA_V0_SEP)
VICUNA_V0 = (
    "{{ " + _literal(VICUNA_V0_SYSTEM + VICUNA_V0_SEP) + " }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'Human: ' + message['content'] + " + _SEP + " }}"
    "{%- else -%}"
    "{{ 'Assistant: ' + message['content'] + " + _SEP + " }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if " + _IMAGE + " in message['content'] -%}{{ " + _IMAGE + " }}{%- endif -%}"
    "{%- else -%}"
    "{{ message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def processor_chat_template(template: str, tokenizer_template: str | None) -> str:
    """The Jinja chat template that renders vistune's `template` from processor messages."""
    get_template(template)  # ValueError listing the names on a typo
    if template == "vicuna_v0":
        return PROLOGUE + VICUNA_V0
    if template == "plain":
        return PROLOGUE + PLAIN
    if not tokenizer_template:
        raise ModelDirError("template chat_template, but the LLM tokenizer has no chat_template")
    return PROLOGUE + tokenizer_template

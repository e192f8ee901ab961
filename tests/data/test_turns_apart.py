"""Turns trained apart (vistune.data.conversation.tokenize_turns_apart): each turn's tokens,
read with the shared prefix, are exactly its own one-turn sample as evaluation asks it."""

from __future__ import annotations

import random

import pytest

from vistune.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    tokenize_conversation,
    tokenize_prompt,
    tokenize_turns_apart,
)
from vistune.errors import TemplateMismatchError

CONV = [
    {"from": "human", "value": "What is in the photo?\n<image>"},
    {"from": "gpt", "value": "A red square."},
    {"from": "human", "value": "How many circles?"},
    {"from": "gpt", "value": "There is one circle."},
    {"from": "human", "value": "Is there a cat?"},
    {"from": "gpt", "value": "No."},
]


@pytest.mark.parametrize("template", ["chat_template", "vicuna_v0"])
def test_each_turn_with_the_prefix_is_its_own_one_turn_sample(tiny_tokenizer, template):
    out = tokenize_turns_apart(CONV, tiny_tokenizer, template, "s1", random.Random(0))
    assert out.turns is not None and len(out.turns) == len(out.input_ids) == len(out.labels)
    assert out.turns == sorted(out.turns) and set(out.turns) == {0, 1, 2, 3}
    prefix = [i for i, t in zip(out.input_ids, out.turns, strict=True) if t == 0]
    assert prefix[-1] == IMAGE_TOKEN_ID and IMAGE_TOKEN_ID not in out.input_ids[len(prefix) :]
    for k in (1, 2, 3):
        own = [j for j, t in enumerate(out.turns) if t == k]
        one = tokenize_conversation(
            [{"from": "human", "value": "<image>\n" + CONV[2 * k - 2]["value"].replace(
                "<image>", "").strip()}, CONV[2 * k - 1]],
            tiny_tokenizer, template, "one",
        )  # fmt: skip
        assert prefix + [out.input_ids[j] for j in own] == one.input_ids
        assert [IGNORE_INDEX] * len(prefix) + [out.labels[j] for j in own] == one.labels
        # what the model is asked at evaluation is this turn up to its answer
        asked = tokenize_prompt(
            [{"role": "user", "content": "<image>\n" + CONV[2 * k - 2]["value"].replace(
                "<image>", "").strip()}], tiny_tokenizer, template,
        )  # fmt: skip
        assert one.input_ids[: len(asked)] == asked
    # a turn's first token is never supervised (the shift across a turn's edge has no label)
    starts = [j for j in range(1, len(out.turns)) if out.turns[j] != out.turns[j - 1]]
    assert all(out.labels[j] == IGNORE_INDEX for j in starts)


def test_one_turn_and_text_only_samples_are_tokenised_as_before(tiny_tokenizer):
    one = CONV[:2]
    text = [{"from": "human", "value": "Hi?"}, *CONV[1:4]]
    for conv in (one, text):
        got = tokenize_turns_apart(conv, tiny_tokenizer, "chat_template", "s", random.Random(3))
        ref = tokenize_conversation(conv, tiny_tokenizer, "chat_template", "s", random.Random(3))
        assert got.turns is None
        assert (got.input_ids, got.labels) == (ref.input_ids, ref.labels)


def test_a_turn_without_a_question_is_refused(tiny_tokenizer):
    conv = [{"from": "human", "value": "<image>"}, *CONV[1:4]]
    with pytest.raises(TemplateMismatchError, match="sample s9: turn 1 has no question"):
        tokenize_turns_apart(conv, tiny_tokenizer, "plain", "s9")

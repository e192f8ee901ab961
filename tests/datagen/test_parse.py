"""vistune.datagen.parse: teacher text -> validated LLaVA turns, or a counted rejection."""

from __future__ import annotations

import pytest

from vistune.datagen.parse import (
    REASONS,
    RejectedOutput,
    parse_description,
    parse_pairs,
    parse_response,
    split_blocks,
)


def reason(response_type: str, text: str, question: str | None = "Describe it.") -> str:
    with pytest.raises(RejectedOutput) as err:
        parse_response(response_type, text, question)
    assert err.value.reason in REASONS
    return err.value.reason


def test_conversation_becomes_alternating_turns_with_the_image_first():
    text = (
        "Question: What is on the table?\nAnswer: A red cup.\n"
        "Question: How many cups are there?\nAnswer: There is one cup,\nstanding on the left."
    )
    assert parse_response("conversation", text) == [
        {"from": "human", "value": "<image>\nWhat is on the table?"},
        {"from": "gpt", "value": "A red cup."},
        {"from": "human", "value": "How many cups are there?"},
        {"from": "gpt", "value": "There is one cup,\nstanding on the left."},
    ]


def test_markdown_markers_and_separators_are_tolerated():
    text = "**Question:** Where is the dog?\n===\n**Answer:** On the left.\n---\n"
    assert parse_pairs(text) == [("Where is the dog?", "On the left.")]


def test_split_blocks_keeps_the_preamble():
    head, blocks = split_blocks("Sure! Here you go.\nquestion: a?\nANSWER: b")
    assert head == "Sure! Here you go."
    assert blocks == [("question", "a?"), ("answer", "b")]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("Just some prose about the picture.", "no_pairs"),
        ("Here is a conversation:\nQuestion: a?\nAnswer: b.", "preamble"),
        ("Answer: b.\nQuestion: a?", "not_alternating"),
        ("Question: a?\nQuestion: b?\nAnswer: c.", "not_alternating"),
        ("Question: a?\nAnswer: b.\nQuestion: c?", "unanswered"),
        ("Question: a?\nAnswer:\nQuestion: c?\nAnswer: d.", "empty_turn"),
        ("Question: What is it?\nAnswer: As an AI, I cannot tell.", "meta_talk"),
        ("Question: What is it?\nAnswer: The caption says a dog.", "meta_talk"),
        ("Question: Where?\nAnswer: The dog is at [0.12, 0.40, 0.5, 0.9].", "box_leak"),
        ("Question: Where?\nAnswer: Its left edge is at 0.120.", "box_leak"),
        ("Question: Where?\nAnswer: Judging by the coordinates, on the left.", "box_leak"),
        ("Question: What is in the <image>?\nAnswer: A dog.", "image_token"),
    ],
)
def test_malformed_conversations_are_rejected_by_reason(text, expected):
    assert reason("conversation", text) == expected


def test_complex_needs_exactly_one_pair():
    text = "Question: Why?\nAnswer: Because it rains, step by step."
    assert len(parse_response("complex", text)) == 2
    assert reason("complex", text + "\nQuestion: And?\nAnswer: Yes.") == "multiple_pairs"


def test_detail_description_uses_the_question_as_the_human_turn():
    turns = parse_response(
        "detail", "  A quiet street at dusk.\n\nTwo cars are parked. ", "Describe."
    )
    assert turns == [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "A quiet street at dusk.\n\nTwo cars are parked."},
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty"),
        ("Question: what?\nAnswer: a street.", "format"),
        ("As an AI language model I cannot see images.", "meta_talk"),
        ("The bounding boxes show two cars.", "meta_talk"),
        ("A car: [0.1, 0.2, 0.3, 0.4] is parked.", "box_leak"),
    ],
)
def test_bad_descriptions_are_rejected(text, expected):
    assert reason("detail", text) == expected


def test_plain_numbers_are_not_box_leaks():
    assert parse_description("There are 3 apples; taking 1 leaves 4 - 2 = 2 and 0.5 litres.")


def test_detail_without_question_and_unknown_type_are_bugs():
    with pytest.raises(ValueError, match="question"):
        parse_response("detail", "A street.")
    with pytest.raises(ValueError, match="conversation, detail, complex"):
        parse_response("poem", "A street.")


def test_rejection_message_names_reason_and_detail():
    with pytest.raises(RejectedOutput, match=r"^preamble: text before .*'Sure'"):
        parse_pairs("Sure\nQuestion: a?\nAnswer: b.")

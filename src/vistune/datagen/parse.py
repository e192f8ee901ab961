"""Teacher output -> LLaVA conversation turns, validated (paper §3, Table 1).

Every teacher (an LLM behind an API, a local LLM, or the rules generator) answers in the
format its system prompt in `prompts/<type>/system.txt` asks for:

- conversation: blocks `Question: ...` / `Answer: ...`, alternating, starting with a
  question and ending with an answer, at least one pair;
- complex: exactly one `Question:` block and one `Answer:` block;
- detail: plain paragraphs (no `Question:`/`Answer:` markers).

A block starts at a line beginning with its marker (case-insensitive; markdown emphasis
such as `**Question:**` is tolerated) and runs to the next marker. Separator lines made of
`=`, `-` or `*` only are ignored. Output that breaks the format, or that talks about its
sources ("the caption says", box coordinates, "as an AI"), raises `RejectedOutput` with a
short machine-readable reason; the pipeline counts reasons and keeps the raw text.
"""

from __future__ import annotations

import re

from vistune.data.conversation import IMAGE_PLACEHOLDER
from vistune.data.formats import RESPONSE_TYPES

REASONS = {
    "empty": "the output is empty",
    "preamble": "text before the first Question: block",
    "no_pairs": "no Question:/Answer: blocks",
    "not_alternating": "Question: and Answer: blocks do not alternate",
    "unanswered": "the last question has no answer",
    "empty_turn": "a Question: or Answer: block is empty",
    "multiple_pairs": "more than one question and answer",
    "format": "Question:/Answer: markers in a description",
    "meta_talk": "talks about its sources or itself instead of the picture",
    "box_leak": "box coordinates leak into the text",
    "image_token": "an <image> placeholder in the text (a sample holds exactly one)",
    "truncated": "the answer was cut off by the token limit",
    "too_long": "the prompt does not fit the teacher's context",
}

_MARKER = re.compile(r"^[ \t>*_#-]*(question|answer)[*_ \t]*:[*_]*[ \t]*", re.I | re.M)
_SEPARATOR = re.compile(r"^[ \t]*[=\-*_]{3,}[ \t]*$", re.M)
_META = re.compile(
    r"\bas an ai\b|\b(ai|language) model\b|\bcaptions?\b|\bbounding box(es)?\b|"
    r"\bannotations?\b|\bobject list\b|\bI (cannot|can't|can not|am unable to) see\b",
    re.I,
)
_BOX = re.compile(r"\bcoordinates?\b|\[\s*-?\d*\.?\d+\s*,\s*-?\d*\.?\d+|\b[01]\.\d{3}\b", re.I)


class RejectedOutput(Exception):
    """Teacher output that fails validation; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = "", raw: str | None = None) -> None:
        self.reason = reason
        self.raw = raw
        """The teacher's text, when the teacher itself rejects it (e.g. truncated)."""
        super().__init__(f"{reason}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))


def split_blocks(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first marker, [(role, text)]) with role "question" or "answer"."""
    text = _SEPARATOR.sub("", text)
    marks = list(_MARKER.finditer(text))
    head = text[: marks[0].start()] if marks else text
    blocks = []
    ends = [m.start() for m in marks[1:]] + [len(text)] if marks else []
    for mark, end in zip(marks, ends, strict=True):
        blocks.append((mark.group(1).lower(), text[mark.end() : end].strip()))
    return head.strip(), blocks


def _check_text(text: str) -> None:
    if IMAGE_PLACEHOLDER in text:  # a sample takes one, which the pipeline adds
        raise RejectedOutput("image_token")
    meta = _META.search(text)
    if meta:
        raise RejectedOutput("meta_talk", repr(meta.group(0)))
    box = _BOX.search(text)
    if box:
        raise RejectedOutput("box_leak", repr(box.group(0)))


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """Alternating Question:/Answer: blocks -> [(question, answer)], at least one."""
    if not text.strip():
        raise RejectedOutput("empty")
    head, blocks = split_blocks(text)
    if not blocks:
        raise RejectedOutput("no_pairs")
    if head:
        raise RejectedOutput("preamble", repr(head[:60]))
    for i, (role, body) in enumerate(blocks):
        if role != ("question" if i % 2 == 0 else "answer"):
            raise RejectedOutput("not_alternating", f"block {i + 1} is {role!r}")
        if not body:
            raise RejectedOutput("empty_turn", f"block {i + 1}")
    if len(blocks) % 2:
        raise RejectedOutput("unanswered")
    pairs = [(blocks[i][1], blocks[i + 1][1]) for i in range(0, len(blocks), 2)]
    for question, answer in pairs:
        _check_text(question)
        _check_text(answer)
    return pairs


def parse_description(text: str) -> str:
    """A detailed description: non-empty plain paragraphs with no meta-talk."""
    text = text.strip()
    if not text:
        raise RejectedOutput("empty")
    if _MARKER.search(text):
        raise RejectedOutput("format")
    _check_text(text)
    return text


def to_conversations(pairs: list[tuple[str, str]]) -> list[dict]:
    """LLaVA JSON turns; the image placeholder goes first in the first human turn."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        value = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        turns.append({"from": "human", "value": value})
        turns.append({"from": "gpt", "value": answer})
    return turns


def parse_response(response_type: str, text: str, question: str | None = None) -> list[dict]:
    """Teacher text -> LLaVA `conversations`; `question` is the detail request shown to it."""
    if response_type == "conversation":
        return to_conversations(parse_pairs(text))
    if response_type == "complex":
        pairs = parse_pairs(text)
        if len(pairs) != 1:
            raise RejectedOutput("multiple_pairs", f"{len(pairs)} pairs")
        return to_conversations(pairs)
    if response_type == "detail":
        if not question:
            raise ValueError("a detail response needs the question it answers")
        return to_conversations([(question, parse_description(text))])
    raise ValueError(f"unknown response type {response_type!r}; valid: {', '.join(RESPONSE_TYPES)}")

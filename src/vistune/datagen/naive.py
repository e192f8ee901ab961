"""Naive expansion of image-caption pairs into instruction data (paper §3; stage-1 data, §4.2).

Each image becomes one single-turn sample `Human: X_q X_v <STOP> Assistant: X_c <STOP>`:
a question X_q asking for a brief description, drawn at random from a curated list, with
the image placeholder before or after it, and one of the image's captions X_c as the answer.
The phrasing lists are data files written for vistune in the spirit of LLaVA's own lists:
`prompts/brief/questions.txt` (brief captions) and `prompts/detail/questions.txt` (the
detailed-description requests, sampled one per image when asking a teacher, §3).
"""

from __future__ import annotations

import random
from importlib import resources
from typing import Any

from vistune.data.annotations import ImageContext
from vistune.data.conversation import IMAGE_PLACEHOLDER

QUESTION_KINDS = ("brief", "detail")


def load_questions(kind: str) -> tuple[str, ...]:
    """The question list `prompts/<kind>/questions.txt`: one a line, blank lines ignored."""
    if kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question list {kind!r}; valid: {', '.join(QUESTION_KINDS)}")
    text = resources.files("vistune.datagen").joinpath("prompts", kind, "questions.txt")
    lines = (line.strip() for line in text.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line)


BRIEF_QUESTIONS: tuple[str, ...] = load_questions("brief")
DETAIL_QUESTIONS: tuple[str, ...] = load_questions("detail")


def human_turn(question: str, image_first: bool) -> str:
    """The first human turn: the placeholder on its own line before or after the question."""
    if image_first:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    return f"{question}\n{IMAGE_PLACEHOLDER}"


def brief_sample(context: ImageContext, rng: random.Random) -> dict[str, Any]:
    """One LLaVA JSON sample for `context`: a brief-description question and a caption."""
    if not context.captions:
        raise ValueError(f"image {context.image_id}: no caption to answer with")
    question = rng.choice(BRIEF_QUESTIONS)
    image_first = rng.random() < 0.5
    caption = rng.choice(context.captions)
    return {
        "id": context.image_id,
        "image": context.image,
        "conversations": [
            {"from": "human", "value": human_turn(question, image_first)},
            {"from": "gpt", "value": caption},
        ],
    }


def brief_samples(
    contexts: list[ImageContext], rng: random.Random | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """One sample per image with a caption (images without captions are left out).

    With `rng`, draws from it in order. Without, each image gets its own generator seeded
    by (seed, image id), so an image's sample does not depend on which others are present.
    """
    samples = []
    for context in contexts:
        if not context.captions:
            continue
        image_rng = rng or random.Random(f"{seed}:{context.image_id}:brief")
        samples.append(brief_sample(context, image_rng))
    return samples

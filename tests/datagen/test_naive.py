"""Naive expansion into brief-description samples (vistune.datagen.naive, paper §3)."""

from __future__ import annotations

import random

import pytest

from vistune.data.annotations import ImageContext
from vistune.data.formats import validate_llava_sample
from vistune.datagen.naive import (
    BRIEF_QUESTIONS,
    DETAIL_QUESTIONS,
    brief_samples,
    load_questions,
)


def _contexts(n: int) -> list[ImageContext]:
    return [
        ImageContext(str(i), f"train/{i:012d}.png", (f"caption {i}a", f"caption {i}b"))
        for i in range(n)
    ]


def test_question_lists_are_long_distinct_and_packaged() -> None:
    for questions in (BRIEF_QUESTIONS, DETAIL_QUESTIONS):
        assert len(questions) >= 10 and len(set(questions)) == len(questions)
        assert all(q == q.strip() and q and "<image>" not in q for q in questions)
    assert not set(BRIEF_QUESTIONS) & set(DETAIL_QUESTIONS)
    assert load_questions("brief") == BRIEF_QUESTIONS
    with pytest.raises(ValueError, match="valid: brief, detail"):
        load_questions("complex")


def test_brief_samples_shape_and_validity() -> None:
    contexts = _contexts(40) + [ImageContext("empty", "x.png", ())]
    samples = brief_samples(contexts, random.Random(0))
    assert len(samples) == 40  # the caption-less image is left out
    firsts = set()
    for ctx, sample in zip(contexts, samples, strict=False):
        assert validate_llava_sample(sample) is None
        assert list(sample) == ["id", "image", "conversations"]
        assert (sample["id"], sample["image"]) == (ctx.image_id, ctx.image)
        human, gpt = (t["value"] for t in sample["conversations"])
        image_first = human.startswith("<image>\n")
        question = human.removeprefix("<image>\n") if image_first else human[: -len("\n<image>")]
        assert image_first or human.endswith("\n<image>")
        assert question in BRIEF_QUESTIONS and gpt in ctx.captions
        firsts.add(image_first)
    assert firsts == {True, False}  # both placements occur
    answers = {s["conversations"][1]["value"][-1] for s in samples}
    assert answers == {"a", "b"}  # captions chosen at random
    assert len({s["conversations"][0]["value"] for s in samples}) > 10


def test_brief_samples_deterministic_by_seed() -> None:
    contexts = _contexts(30)
    assert brief_samples(contexts, random.Random(3)) == brief_samples(contexts, random.Random(3))
    assert brief_samples(contexts, random.Random(3)) != brief_samples(contexts, random.Random(4))
    # Seeded per image: a sample does not depend on the other images present.
    full = brief_samples(contexts, seed=7)
    assert brief_samples(contexts[10:], seed=7) == full[10:]
    assert brief_samples(contexts, seed=8) != full

"""The rules generator: exact answers from the annotations, including about absent objects."""

from __future__ import annotations

import random

from vistune.data.annotations import Box, ImageContext
from vistune.data.formats import load_coco
from vistune.data.scenes import COLORS, KINDS, make_scenes
from vistune.datagen.messages import build_messages
from vistune.datagen.parse import parse_pairs
from vistune.datagen.rules import SceneFacts, plural, where
from vistune.datagen.teachers import Request, RulesTeacher
from vistune.eval.scenes import questions_for_image

CONTEXT = ImageContext(
    image_id="7",
    image="train/7.png",
    captions=("A red plate between two cups on a table.", "Two cups flank a plate."),
    boxes=(
        Box("cup", (0.05, 0.45, 0.20, 0.60)),
        Box("plate", (0.40, 0.40, 0.60, 0.60)),
        Box("cup", (0.80, 0.45, 0.95, 0.60)),
    ),
)
SCENE = ImageContext(
    image_id="8",
    image="train/8.png",
    captions=("A blue star, a red star and a green heart.",),
    boxes=(
        Box("star", (0.05, 0.05, 0.20, 0.20), "blue"),
        Box("star", (0.70, 0.70, 0.90, 0.90), "red"),
        Box("heart", (0.40, 0.40, 0.60, 0.60), "green"),
    ),
    categories=("star", "heart", "ring"),
)


def conversation(context: ImageContext, seed: str = "") -> list[tuple[str, str]]:
    messages = build_messages("conversation", context, None)
    if seed:
        messages = [*messages, {"role": "user", "content": seed}]
    text = RulesTeacher().respond(Request("conversation", context, messages, None))
    return parse_pairs(text)


def test_coco_context_without_colours_or_categories_keeps_to_what_is_certain():
    pairs = conversation(CONTEXT)
    assert pairs[0] == (
        "What objects can you see in the picture?",
        "I can see two cups and a red plate.",
    )
    answers = dict(pairs)
    for question, answer in answers.items():
        if question.startswith(("How many cups", "Count the cups", "What is the number of cups")):
            assert answer == "I count two cups."
        if "plate" in question and (
            "part" in question or "Where" in question or "Locate" in question
        ):
            assert answer == "The red plate is in the middle of the picture."
    # no category list: nothing is asked about absent objects
    assert not any(a.startswith(("No,", "I count no")) for a in answers.values())


def test_scene_conversations_ask_about_absent_objects_and_traps_with_exact_answers():
    answers: dict[str, str] = {}
    for i in range(40):
        answers.update(conversation(SCENE, seed=str(i)))
    assert answers["What objects can you see in the picture?"] == (
        "I can see a blue star in the top left, a red star in the bottom right and a green heart"
        " in the middle."
    )
    rings = [a for q, a in answers.items() if "rings" in q]
    assert rings and set(rings) == {"I count no rings."}
    stars = [a for q, a in answers.items() if q.startswith(("How many stars", "Count the stars"))]
    assert stars and set(stars) == {"I count two stars."}
    # a colour and a kind that are both there, but not together (paper §5.1's failure)
    # a yes or a no comes after the colours of the kind asked about are said
    trap = [a for q, a in answers.items() if "green star" in q]
    assert set(trap) == {
        "The stars in the picture are blue and red, so no, there is no green star."
    }
    heart = [a for q, a in answers.items() if "red heart" in q]
    assert set(heart) == {"The heart in the picture is green, so no, there is no red heart."}
    yes = [a for q, a in answers.items() if "a blue star" in q and not q.startswith("What")]
    assert set(yes) == {"The stars in the picture are blue and red, so yes, there is a blue star."}
    ring = [a for q, a in answers.items() if " ring" in q and q.startswith(("Is", "Can", "Does"))]
    assert all(a.startswith("There is no ring in the picture, so no, there is no ") for a in ring)
    kinds = [
        a
        for q, a in answers.items()
        if "green" in q and ("Which object" in q or "Name" in q or "thing" in q)
    ]
    assert set(kinds) == {"The green object is a heart."}
    assert answers.get("Which colour is the heart?", "The heart is green.") == "The heart is green."


def test_yes_and_no_are_balanced_and_every_skill_is_asked():
    rng = random.Random(0)
    yes = no = 0
    seen = set()
    for i in range(200):
        boxes = []
        for _ in range(rng.randint(1, 6)):
            x1, y1 = rng.uniform(0, 0.8), rng.uniform(0, 0.8)
            boxes.append(Box(rng.choice(list(KINDS)), (x1, y1, x1 + 0.15, y1 + 0.15),
                             rng.choice(list(COLORS))))  # fmt: skip
        ctx = ImageContext(str(i), f"{i}.png", ("shapes",), tuple(boxes), categories=tuple(KINDS))
        for question, answer in conversation(ctx):
            yes += ", so yes, " in answer
            no += ", so no, " in answer
            seen.add(question.split()[0])
    assert 0.7 < yes / no < 1.4
    assert {"How", "Where", "Locate", "Is", "Can", "Does"} & seen


def test_no_evaluation_question_appears_in_the_training_data(tmp_path):
    """`vistune eval scenes` asks in its own words: a model must not have seen them."""
    make_scenes(tmp_path, 60, seed=1, val_fraction=0.5, size=64)
    contexts, _ = load_coco(tmp_path, "train")
    asked = set()
    for ctx in contexts:
        for seed in range(3):
            asked |= {q for q, _ in conversation(ctx, seed=str(seed))}
    assert len(asked) > 200
    rng = random.Random(0)
    every_kind = [Box(k, (0.1, 0.1, 0.2, 0.2)) for k in KINDS]
    eval_questions = set()
    for colour in COLORS:
        objects = [
            type("O", (), {"kind": b.category, "color": colour, "position": "center"})()
            for b in every_kind
        ]
        for _ in range(20):
            eval_questions |= {q["text"] for q in questions_for_image("x", objects, rng)}
    assert eval_questions and not eval_questions & asked


def test_counts_ask_most_about_kinds_that_are_there_more_than_once():
    """Kinds are drawn alike, so most kinds in a scene are single; the teacher asks the
    count of a repeated kind where there is one, or "two" is nearly never an answer."""
    answers = []
    for i in range(40):
        answers += [a for q, a in conversation(SCENE, seed=str(i)) if "star" in q and "many" in q]
    answers += [
        a
        for i in range(40)
        for q, a in conversation(SCENE, seed=str(i))
        if q.startswith(("How many hearts", "Count the hearts", "What is the number of hearts"))
    ]
    stars = answers.count("I count two stars.")
    hearts = answers.count("I count one heart.")
    assert stars > 2 * hearts > 0


def test_colour_needs_a_single_unambiguous_object():
    ctx = ImageContext("1", "1.png", ("A red cup and a blue cup.", "A green bowl."),
                       (Box("cup", (0, 0, 0.2, 0.2)), Box("cup", (0.5, 0.5, 0.7, 0.7)),
                        Box("bowl", (0.3, 0.3, 0.4, 0.4))))  # fmt: skip
    assert SceneFacts.from_context(ctx).colours == {"bowl": "green"}


def test_a_box_colour_beats_the_captions():
    ctx = ImageContext("1", "1.png", ("A red bowl.",), (Box("bowl", (0, 0, 0.2, 0.2), "blue"),))
    assert SceneFacts.from_context(ctx).colours == {"bowl": "blue"}
    assert (
        Box("bowl", (0, 0, 0.5, 0.5), "blue").render() == "blue bowl: [0.000, 0.000, 0.500, 0.500]"
    )


def test_words_and_positions():
    assert [plural(w) for w in ("person", "bus", "baby", "traffic light", "sheep", "box")] == [
        "people", "buses", "babies", "traffic lights", "sheep", "boxes"
    ]  # fmt: skip
    assert plural("cup", 1) == "cup"
    assert where(Box("a", (0.0, 0.0, 0.2, 0.2))) == "in the top left of the picture"
    assert where(Box("a", (0.4, 0.8, 0.6, 1.0))) == "in the bottom middle of the picture"
    assert where(Box("a", (0.8, 0.4, 1.0, 0.6))) == "in the middle right of the picture"
    assert where(Box("a", (0.4, 0.4, 0.6, 0.6))) == "in the middle of the picture"

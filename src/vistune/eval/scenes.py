"""Exact-answer questions on held-out built-in scenes, scored by normalised matching.

The paper's judged scores (§5.1) need a strong judge; the built-in scenes (vistune.data
.scenes) know every object's kind, colour and position exactly, so a model trained on them
can be checked without one. Skills:

- `count`: "How many <kind>s are there in the image?" -> a number;
- `color`: "What color is the <kind>?" (a kind present once) -> its colour;
- `kind`: "What shape is the <color> object?" (a colour present once) -> its kind;
- `position`: "Where is the <color> <kind> in the image?" (a unique pair) -> one of the
  nine thirds ("top left" ... "center" ... "bottom right");
- `presence`: "Is there a <color> <kind> in the image?" ("an orange ...") for a present
  pair -> yes;
- `absence`: the same for a pair that is absent although its colour and its kind both
  appear on other objects (the paper's strawberry-yogurt failure, §5.1 Limitations), or,
  in a scene with one colour or one kind, a present kind in an absent colour -> no.

Answers are balanced within each skill: of the questions a scene allows, the one whose
answer the benchmark has asked least so far is asked (counts spread over 0-6 as the
scenes allow, every colour and kind, yes as often as no). `CHANCE` is the accuracy of a
uniform guess per skill; `shuffled_control` asks every question about another image.

Matching (after lower-casing, number words -> digits, "grey" -> "gray", "centre"/"middle"
-> "center", "upper"/"lower" -> "top"/"bottom"): count = the first number ("no"/"none"
count as 0); yes/no = the first yes or no; colour and kind = exactly the expected one
among the colours (kinds) named; position = the same row word (top/bottom/none) and
column word (left/right/none), and "center" named when both are none.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence

from vistune.data.scenes import COLORS, KINDS, SceneObject

SKILLS = ("count", "color", "kind", "position", "presence", "absence")
_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3",
          "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
          "ten": "10", "grey": "gray", "centre": "center", "middle": "center",
          "upper": "top", "lower": "bottom"}  # fmt: skip


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _plural(kind: str) -> str:
    return kind + ("es" if kind.endswith("s") else "s")


def normalise(text: str) -> list[str]:
    """Lower-case words with number words as digits and synonyms folded."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    out = []
    for w in words:
        w = _WORDS.get(w, w)
        if w.endswith("s") and w[:-1] in KINDS:
            w = w[:-1]
        elif w.endswith("es") and w[:-2] in KINDS:
            w = w[:-2]
        out.append(w)
    return out


CHANCE: dict[str, float] = {
    "count": 100.0 / 7,  # 0-6
    "color": 100.0 / len(COLORS),
    "kind": 100.0 / len(KINDS),
    "position": 100.0 / 9,  # the nine thirds
    "presence": 50.0,
    "absence": 50.0,
}
"""Accuracy of a uniform guess among each skill's possible answers (%)."""


def _least_used(options: list, used: Counter, rng: random.Random):
    """The option whose answer has been asked least so far (ties at random): `options`
    are (answer, payload) pairs; spreads answers evenly over the benchmark."""
    low = min(used[answer] for answer, _ in options)
    pick = rng.choice([o for o in options if used[o[0]] == low])
    used[pick[0]] += 1
    return pick


def questions_for_image(
    image: str,
    objects: Sequence[SceneObject],
    rng: random.Random,
    used: dict[str, Counter] | None = None,
) -> list[dict]:
    """One question per skill that this scene can ask, with its exact answer.

    `used` (skill -> answers asked so far, updated here) balances answers across images:
    of the questions this scene allows, the one whose answer is rarest so far is asked."""
    used = {} if used is None else used
    kinds = Counter(o.kind for o in objects)
    colors = Counter(o.color for o in objects)
    pairs = Counter((o.color, o.kind) for o in objects)
    out = []

    def add(skill: str, options: list[tuple[str, str]], text: str) -> None:
        answer, subject = _least_used(sorted(options), used.setdefault(skill, Counter()), rng)
        out.append(
            {"image": image, "category": skill, "text": text.format(subject), "answer": answer}
        )

    # count: any kind (absent ones answer 0), grouped by answer so that each count is as
    # likely as the scenes allow
    by_count: dict[str, list[str]] = {}
    for kind in sorted(KINDS):
        by_count.setdefault(str(kinds.get(kind, 0)), []).append(kind)
    add("count", [(n, _plural(rng.choice(ks))) for n, ks in by_count.items()],
        "How many {} are there in the image?")  # fmt: skip
    single_kinds = [k for k, n in kinds.items() if n == 1]
    if single_kinds:
        add("color", [(next(o.color for o in objects if o.kind == k), k) for k in single_kinds],
            "What color is the {}?")  # fmt: skip
    single_colors = [c for c, n in colors.items() if n == 1]
    if single_colors:
        add("kind", [(next(o.kind for o in objects if o.color == c), c) for c in single_colors],
            "What shape is the {} object?")  # fmt: skip
    unique = [p for p, n in pairs.items() if n == 1]
    if unique:
        where = {p: next(o.position for o in objects if (o.color, o.kind) == p) for p in unique}
        add("position", [(where[p], f"{p[0]} {p[1]}") for p in unique],
            "Where is the {} in the image?")  # fmt: skip
    if pairs:
        add("presence", [("yes", _a(f"{c} {k}")) for c, k in pairs], "Is there {} in the image?")
    traps = [(c, k) for c in colors for k in kinds if (c, k) not in pairs]
    if not traps:  # one colour or one kind only: a present kind in a colour that is absent
        traps = [(c, k) for c in COLORS for k in kinds if c not in colors]
    if traps:
        add("absence", [("no", _a(f"{c} {k}")) for c, k in traps], "Is there {} in the image?")
    return out


def make_questions(
    truth: dict[str, list[SceneObject]], images: dict[str, str], seed: int = 0
) -> list[dict]:
    """Questions for every image id in `images` (id -> image path), numbered in order,
    their answers balanced within each skill (see `questions_for_image`)."""
    rows = []
    used: dict[str, Counter] = {}
    for image_id, image in images.items():
        rng = random.Random(f"vistune-scene-eval:{seed}:{image_id}")
        rows += questions_for_image(image, truth.get(image_id, []), rng, used)
    return [{"question_id": i, **row} for i, row in enumerate(rows)]


def shuffled_control(questions: Sequence[dict], seed: int = 0) -> list[dict]:
    """The same questions, each asked about another image of the set (a derangement of
    the images): what a model answers without the right picture. Each row keeps its own
    image as `own_image`."""
    images = sorted({q["image"] for q in questions})
    if len(images) < 2:
        raise ValueError("the shuffled control needs questions on at least two images")
    order = images[:]
    random.Random(f"vistune-scene-control:{seed}").shuffle(order)
    other = {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}
    return [{**q, "image": other[q["image"]], "own_image": q["image"]} for q in questions]


def _position(words: list[str]) -> tuple[str | None, str | None]:
    row = next((w for w in words if w in ("top", "bottom")), None)
    col = next((w for w in words if w in ("left", "right")), None)
    return row, col


def matches(skill: str, expected: str, prediction: str) -> bool:
    """Whether `prediction` gives `expected` for a question of `skill` (rules above)."""
    words = normalise(prediction)
    if skill == "count":
        first = next((w for w in words if w.isdigit() or w in ("no", "none")), None)
        return (first if first is None or first.isdigit() else "0") == expected
    if skill in ("presence", "absence"):
        return next((w for w in words if w in ("yes", "no")), None) == expected
    if skill == "color":
        return {w for w in words if w in COLORS} == {expected}
    if skill == "kind":
        return {w for w in words if w in KINDS} == {expected}
    if skill == "position":
        exp = expected.split()
        want = (next((w for w in exp if w in ("top", "bottom")), None),
                next((w for w in exp if w in ("left", "right")), None))  # fmt: skip
        return _position(words) == want and (want != (None, None) or "center" in words)
    raise ValueError(f"unknown skill {skill!r}; valid: {', '.join(SKILLS)}")


def score(questions: Sequence[dict], answers: dict[str, str]) -> dict:
    """Accuracy (%) per skill and overall; the misses listed by question id."""
    right: Counter = Counter()
    total: Counter = Counter()
    wrong = []
    for q in questions:
        ok = matches(q["category"], q["answer"], answers[str(q["question_id"])])
        total[q["category"]] += 1
        right[q["category"]] += ok
        if not ok:
            wrong.append(str(q["question_id"]))
    accuracy = {s: (100.0 * right[s] / total[s] if total[s] else None) for s in SKILLS}
    n = sum(total.values())
    accuracy["all"] = 100.0 * sum(right.values()) / n if n else None
    present = [s for s in SKILLS if total[s]]
    chance = {s: CHANCE[s] for s in present}
    chance["all"] = sum(CHANCE[s] * total[s] for s in present) / n if n else None
    return {"accuracy": accuracy, "chance": chance,
            "counts": {s: total[s] for s in SKILLS} | {"all": n}, "wrong": wrong}  # fmt: skip

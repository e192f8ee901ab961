"""Captions for the built-in scenes, generated from their ground truth (see scenes.py).

Five captions per image, each from a different template with varied phrasing, all true of
the scene: they mention counts, colours, kinds, sizes, positions and relations, the way
COCO's five human captions describe one photo from several angles (paper §3, Table 1).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vistune.data.scenes import SceneObject

_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else kind + ("es" if kind.endswith("s") else "s")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(position: str) -> str:
    if position == "center":
        return "in the center"
    return ("on the " if position in ("left", "right") else "at the ") + position


def _groups(objects: list[SceneObject]) -> str:
    counts = Counter((o.color, o.kind) for o in objects)
    parts = [
        _a(f"{color} {kind}") if n == 1 else f"{_NUMBERS[n]} {color} {_plural(kind, n)}"
        for (color, kind), n in counts.items()
    ]
    return _join(parts)


def _background_phrase(background: str, rng: random.Random) -> str:
    return {
        "plain": rng.choice(["a plain background", "a solid background", "a flat backdrop"]),
        "gradient": rng.choice(["a gradient background", "a softly shaded backdrop"]),
        "noisy": rng.choice(["a grainy background", "a noisy textured background"]),
        "striped": rng.choice(["a striped background", "a backdrop of diagonal stripes"]),
    }[background]


def _cap_inventory(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    text = f"{_groups(objs)} {rng.choice(['on', 'against', 'over'])} {bg}."
    return text[0].upper() + text[1:]


def _cap_count(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    n = len(objs)
    noun = rng.choice(["shape", "object", "figure"])
    verb = "is" if n == 1 else "are"
    return f"There {verb} {_NUMBERS[n]} {_plural(noun, n)} in this image: {_groups(objs)}."


def _cap_positions(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    shown = rng.sample(objs, min(len(objs), 3))
    parts = [f"{_a(f'{o.size_name} {o.color} {o.kind}')} {_where(o.position)}" for o in shown]
    text = _join(parts) + ("" if len(shown) == len(objs) else ", among other shapes")
    return text[0].upper() + text[1:] + "."


def _cap_kinds(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    counts = Counter(o.kind for o in objs)
    opener = rng.choice(["A picture of", "An image showing", "A simple drawing of"])
    if len(counts) == 1:
        return f"{opener} {_NUMBERS[len(objs)]} {_plural(objs[0].kind, len(objs))} on {bg}."
    kinds = [_a(k) if n == 1 else f"{_NUMBERS[n]} {_plural(k, n)}" for k, n in counts.items()]
    return f"{opener} {_NUMBERS[len(objs)]} shapes: {_join(kinds)}."


def _cap_colors(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    colors = sorted({o.color for o in objs}, key=[o.color for o in objs].index)
    if len(colors) == 1:
        return f"Every shape in this picture is {colors[0]}, set against {bg}."
    return f"Shapes in {_join(colors)} are scattered over {bg}."


def _cap_relation(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    unique = [o for o in objs if sum((p.color, p.kind) == (o.color, o.kind) for p in objs) == 1]
    for a in unique:
        for b in unique:
            ax, ay, aw, ah = a.bbox
            bx, by, bw, bh = b.bbox
            if ax + aw <= bx:
                return f"The {a.color} {a.kind} is to the left of the {b.color} {b.kind}."
            if ay + ah <= by:
                return f"The {a.color} {a.kind} is above the {b.color} {b.kind}."
    largest = max(objs, key=lambda o: o.area)
    return (
        f"The biggest shape is {_a(f'{largest.color} {largest.kind}')} {_where(largest.position)}."
    )


def _cap_largest(objs: list[SceneObject], bg: str, rng: random.Random) -> str:
    if len(objs) == 1:
        o = objs[0]
        return f"A lone {o.size_name} {o.color} {o.kind} sits {_where(o.position)} of {bg}."
    largest, smallest = max(objs, key=lambda o: o.area), min(objs, key=lambda o: o.area)
    return (
        f"The largest object is {_a(f'{largest.color} {largest.kind}')} and the smallest "
        f"is {_a(f'{smallest.color} {smallest.kind}')}."
    )


_CAPTIONERS = (
    _cap_inventory, _cap_count, _cap_positions, _cap_kinds, _cap_colors, _cap_relation,
    _cap_largest,
)  # fmt: skip


def scene_captions(objects: list[SceneObject], background: str, rng: random.Random) -> list[str]:
    """Five captions, each from a different template, all true of the ground truth."""
    if not objects:
        raise ValueError("a scene needs at least one object to caption")
    return [
        cap(objects, _background_phrase(background, rng), rng) for cap in rng.sample(_CAPTIONERS, 5)
    ]

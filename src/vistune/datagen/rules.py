"""The `rules` teacher's generator: instruction data computed from the annotations alone.

Not an LLM: the paper's teacher (§3) is a text-only GPT-4 that reads captions and boxes;
this one reads the same symbolic context and writes only what it makes certain, so the
built-in scenes (and any COCO-layout data) get exact, reproducible instruction data
offline. Conversations cover what §3 lists for them (object types, counting, object
locations, relative positions, questions with definite answers) and, where the
dataset's category list is known (`ImageContext.categories`), questions about objects
that are *not* there ("How many hearts?" -> "There are no hearts."), so that a model
trained on them must look at the picture to answer either way. Each question has several
phrasings; none is the wording of `vistune eval scenes` (a test checks that).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from vistune.data.annotations import Box, ImageContext

COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "silver", "gold", "beige", "teal", "cyan", "magenta", "violet",
)  # fmt: skip
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children",
              "mouse": "mice", "sheep": "sheep", "knife": "knives", "skis": "skis"}  # fmt: skip


def plural(noun: str, n: int = 2) -> str:
    if n == 1:
        return noun
    words = noun.split(" ")
    last = words[-1]
    if last in _IRREGULAR:
        last = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(words[:-1] + [last])


def number(n: int) -> str:
    return _NUMBERS[n] if n < len(_NUMBERS) else str(n)


def a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def where(box: Box) -> str:
    """Where a box's centre falls, in thirds of the picture: "in the top left of the
    picture", "in the middle left ...", "in the top middle ...", "in the middle ...".

    One form for all nine, row word then column word: with a preposition per kind of place
    ("on the left side", "near the top"), a model commits to an edge, a corner or the
    centre on that first word, before it reads where the object is (docs/LEARNING.md,
    run 17)."""
    return f"in the {place(box)} of the picture"


def place(box: Box) -> str:
    """The third of the picture a box's centre is in: "top left", "middle left", "middle"."""
    x1, y1, x2, y2 = box.xyxy
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "middle"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return "middle" if (row, col) == ("middle", "middle") else f"{row} {col}"


def size_word(box: Box) -> str:
    x1, y1, x2, y2 = box.xyxy
    area = (x2 - x1) * (y2 - y1)
    return "large" if area > 0.08 else "small" if area < 0.03 else "medium-sized"


def relation(a_box: Box, b_box: Box) -> str | None:
    """'to the left of' / 'to the right of' / 'above' / 'below' when clearly so, else None."""
    ax, ay = (a_box.xyxy[0] + a_box.xyxy[2]) / 2, (a_box.xyxy[1] + a_box.xyxy[3]) / 2
    bx, by = (b_box.xyxy[0] + b_box.xyxy[2]) / 2, (b_box.xyxy[1] + b_box.xyxy[3]) / 2
    dx, dy = ax - bx, ay - by
    if max(abs(dx), abs(dy)) < 0.08:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


_COUNT_ASKS = (
    "How many {p} can you see?",
    "How many {p} does the picture show?",
    "Count the {p} in this picture.",
    "What is the number of {p} here?",
)
_COLOUR_ASKS = (
    "Which colour is the {c}?",
    "What is the color of the {c}?",
    "Tell me the colour of the {c}.",
    "What colour does the {c} have?",
)
_KIND_ASKS = (
    "Which object is {col}?",
    "What is the {col} thing in the picture?",
    "Name the {col} object.",
    "Which kind of object is {col}?",
)
_WHERE_ASKS = (
    "Where can I find the {n}?",
    "In which part of the picture is the {n}?",
    "Where is the {n} located?",
    "Locate the {n}.",
)
_PRESENT_ASKS = (
    "Does the picture contain {n}?",
    "Can you see {n}?",
    "Is {n} visible?",
    "Is there {n} anywhere in the picture?",
)
_ASK_COLOURS = COLOURS[:10]
"""Colours that questions about absent objects may name: the common ten."""


@dataclass(frozen=True)
class SceneFacts:
    """What the annotations make certain: captions, boxes, counts, colours, categories."""

    captions: tuple[str, ...]
    boxes: tuple[Box, ...]
    counts: dict[str, int]
    colours: dict[str, str]
    """category -> its colour, for categories with one object whose colour is known (the
    box's own `color`, or the captions naming it unambiguously)."""
    categories: tuple[str, ...] = ()
    """The dataset's category names (for questions about objects that are not there)."""

    @classmethod
    def from_context(cls, context: ImageContext) -> SceneFacts:
        counts = dict(Counter(b.category for b in context.boxes).most_common())
        colours = {}
        text = " ".join(context.captions).lower()
        for cat, n in counts.items():
            noun = f"(?:{re.escape(cat)}|{re.escape(plural(cat))})"
            pattern = rf"\b({'|'.join(COLOURS)})\s+(?:(?:small|large|big|tiny|medium)\s+)?{noun}\b"
            found = {m.group(1) for m in re.finditer(pattern, text)}
            own = {b.color for b in context.boxes if b.category == cat}
            if n == 1 and own != {""}:
                colours[cat] = own.pop()
            elif n == 1 and len(found) == 1:
                colours[cat] = found.pop()
        return cls(
            tuple(context.captions), tuple(context.boxes), counts, colours, context.categories
        )

    def named(self, box: Box) -> str:
        colour = box.color or self.colours.get(box.category)
        return f"{colour} {box.category}" if colour else box.category

    def inventory(self, places: bool = False) -> str:
        """ "two cups and a red plate"; with every box's colour known, "a red star, two
        blue circles and a green circle", and with `places` each single one's third of
        the picture: "a red star in the top left, two blue circles and ...".

        The conversation's first answer names the places: it is the turn that reads every
        object, and where an object is was the skill read least (docs/LEARNING.md, run 19)."""
        if all(b.color for b in self.boxes):
            groups = Counter((b.color, b.category) for b in self.boxes)
            at = {(b.color, b.category): place(b) for b in self.boxes}
            return join(
                [a(f"{c} {k}") + (f" in the {at[c, k]}" if places else "") if n == 1
                 else f"{number(n)} {c} {plural(k)}" for (c, k), n in groups.items()]
            )  # fmt: skip
        parts = [
            a(self.named(self._only(cat))) if n == 1 else f"{number(n)} {plural(cat)}"
            for cat, n in self.counts.items()
        ]
        return join(parts)

    def _only(self, category: str) -> Box:
        return next(b for b in self.boxes if b.category == category)

    def _singles(self) -> list[Box]:
        return [self._only(cat) for cat, n in self.counts.items() if n == 1]

    def _unique(self) -> list[Box]:
        """Boxes that their name ("red star", or "plate") picks out alone."""
        names = Counter(self.named(b) for b in self.boxes)
        return [b for b in self.boxes if names[self.named(b)] == 1]

    def conversation(self, rng: random.Random) -> list[tuple[str, str]]:
        """Up to eight questions with definite answers, in random order after the first."""
        if not self.boxes:
            first = sentence(self.captions[0])
            return [("What does this picture show?", f"The picture shows this scene: {first}")]
        first = (
            "What objects can you see in the picture?",
            f"I can see {self.inventory(places=True)}.",
        )
        makers = (self._count_present, self._count_absent, self._colour, self._kind_of_colour,
                  self._where, self._present, self._absent, self._relative)  # fmt: skip
        pairs = [pair for make in makers if (pair := make(rng)) is not None]
        rng.shuffle(pairs)
        return [first, *pairs][:8]

    def _count(self, cat: str, rng: random.Random) -> tuple[str, str]:
        """ "I count two stars.": the number is the first word that depends on the picture
        (with "There is one" / "There are two" the verb commits to one or more first)."""
        n = self.counts.get(cat, 0)
        question = rng.choice(_COUNT_ASKS).format(p=plural(cat))
        return question, f"I count {number(n)} {plural(cat, n)}."

    def _count_present(self, rng: random.Random) -> tuple[str, str]:
        """A kind that is there; one that is there more than once, where the scene has
        one, three times in four: kinds are drawn alike, so most kinds in a scene are
        single, and a teacher asking any kind taught "one" nine times as often as "two"
        (docs/LEARNING.md, run 16)."""
        several = sorted(cat for cat, n in self.counts.items() if n > 1)
        if several and rng.random() < 0.75:
            return self._count(rng.choice(several), rng)
        return self._count(rng.choice(sorted(self.counts)), rng)

    def _count_absent(self, rng: random.Random) -> tuple[str, str] | None:
        absent = sorted(set(self.categories) - set(self.counts))
        return self._count(rng.choice(absent), rng) if absent else None

    def _colour(self, rng: random.Random) -> tuple[str, str] | None:
        known = sorted(self.colours)
        if not known:
            return None
        cat = rng.choice(known)
        return rng.choice(_COLOUR_ASKS).format(c=cat), f"The {cat} is {self.colours[cat]}."

    def _kind_of_colour(self, rng: random.Random) -> tuple[str, str] | None:
        colours = Counter(b.color for b in self.boxes if b.color)
        single = sorted(c for c, n in colours.items() if n == 1)
        if not single:
            return None
        col = rng.choice(single)
        box = next(b for b in self.boxes if b.color == col)
        return rng.choice(_KIND_ASKS).format(col=col), f"The {col} object is {a(box.category)}."

    def _where(self, rng: random.Random) -> tuple[str, str] | None:
        unique = self._unique()
        if not unique:
            return None
        box = rng.choice(unique)
        name = self.named(box)
        return rng.choice(_WHERE_ASKS).format(n=name), f"The {name} is {where(box)}."

    def _evidence(self, category: str) -> str:
        """What the picture shows of a kind, said before a yes or a no: "The star in the
        picture is blue", "The stars in the picture are red and green", "There is no star
        in the picture". The yes or no then follows from a colour just read, where the
        answer's first word would be a guess (docs/LEARNING.md, run 16)."""
        same = [b for b in self.boxes if b.category == category]
        if not same:
            return f"There is no {category} in the picture"
        colours = sorted({b.color for b in same})
        if len(same) == 1:
            return f"The {category} in the picture is {colours[0]}"
        return f"The {plural(category)} in the picture are {join(colours)}"

    def _present(self, rng: random.Random) -> tuple[str, str]:
        box = rng.choice(self.boxes)
        name = self.named(box)
        question = rng.choice(_PRESENT_ASKS).format(n=a(name))
        if all(b.color for b in self.boxes):
            return question, f"{self._evidence(box.category)}, so yes, there is {a(name)}."
        return question, f"Yes, there is {a(name)} {where(box)}."

    def _absent(self, rng: random.Random) -> tuple[str, str] | None:
        """An object that is not there: preferably a colour and a kind that are both in
        the picture, but not together (the paper's strawberry-yogurt failure, §5.1)."""
        if all(b.color for b in self.boxes):
            here = {(b.color, b.category) for b in self.boxes}
            colours = sorted({c for c, _ in here})
            kinds = sorted({k for _, k in here} | set(self.categories))
            traps = sorted(
                (c, k) for c in colours for k in {k for _, k in here} if (c, k) not in here
            )
            if traps and rng.random() < 0.85:
                colour, cat = rng.choice(traps)
            else:
                options = [(c, k) for c in _ASK_COLOURS for k in kinds if (c, k) not in here]
                colour, cat = rng.choice(options)
            name = f"{colour} {cat}"
            answer = f"{self._evidence(cat)}, so no, there is no {name}."
            return rng.choice(_PRESENT_ASKS).format(n=a(name)), answer
        absent = sorted(set(self.categories) - set(self.counts))
        if not absent:
            return None
        cat = rng.choice(absent)
        return rng.choice(_PRESENT_ASKS).format(n=a(cat)), f"No, there is no {cat}."

    def _relative(self, rng: random.Random) -> tuple[str, str] | None:
        unique = self._unique()
        if len(unique) < 2:
            return None
        x, y = rng.sample(unique, 2)
        rel = relation(x, y)
        if rel is None:
            return None
        question = f"Where is the {self.named(x)} relative to the {self.named(y)}?"
        return question, f"The {self.named(x)} is {rel} the {self.named(y)}."

    def description(self) -> str:
        opening = " ".join(sentence(c) for c in self.captions[:2])
        if not self.boxes:
            return opening
        total = len(self.boxes)
        lines = [opening, f"Altogether there {'is' if total == 1 else 'are'} {number(total)} "
                 f"{'object' if total == 1 else 'objects'} in view: {self.inventory()}."]  # fmt: skip
        for box in self.boxes[:8]:
            lines.append(sentence(f"{a(size_word(box))} {self.named(box)} is {where(box)}"))
        singles = sorted(self._singles(), key=_area, reverse=True)
        if len(singles) >= 2 and relation(singles[0], singles[1]):
            x, y = singles[0], singles[1]
            lines.append(sentence(f"the {self.named(x)} is {relation(x, y)} the {self.named(y)}"))
        return " ".join(lines)

    def reasoning(self, rng: random.Random) -> tuple[str, str]:
        if not self.boxes:
            first = sentence(self.captions[0])
            q = "What is the main subject of this picture, and how can you tell?"
            return (
                q,
                f"Looking at the picture: {first} Everything else in view only sets the scene around it, so that is the main subject.",
            )
        total = len(self.boxes)
        if len(self.counts) >= 2:
            cat, n = next(iter(self.counts.items()))
            rest = [f"{number(m)} {plural(c, m)}" for c, m in self.counts.items() if c != cat]
            left = total - n
            q = f"If all the {plural(cat)} were taken away, how many objects would be left?"
            return q, (
                f"First, count everything in view: {self.inventory()}, which makes "
                f"{number(total)} objects in total. Of these, {number(n)} "
                f"{'is a' if n == 1 else 'are'} {plural(cat, n)}. Taking "
                f"{'it' if n == 1 else 'them'} away leaves {total} - {n} = {left}: "
                f"{join(rest)}. So {number(left)} {'object' if left == 1 else 'objects'} would be left."
            )
        cat, n = next(iter(self.counts.items()))
        if n >= 2:
            ordered = sorted(self.boxes, key=lambda b: (b.xyxy[0] + b.xyxy[2]) / 2)
            q = f"If you had to pick up the {plural(cat)} one by one from left to right, where would you start and where would you finish?"
            return q, (
                f"There are {number(n)} {plural(cat)} in the picture. Going from left to "
                f"right, the first one is {where(ordered[0])} and the last one is "
                f"{where(ordered[-1])}. So I would start with the {cat} {where(ordered[0])} "
                f"and finish with the one {where(ordered[-1])}."
            )
        box = self.boxes[0]
        q = f"Is the {box.category} the centre of attention in this picture? Explain."
        centred = where(box) == "in the middle of the picture"
        verdict = "Yes" if centred else "Not quite"
        why = (
            "it sits right in the middle"
            if centred
            else f"it is {where(box)} rather than in the middle"
        )
        return q, (
            f"{verdict}. The {self.named(box)} is the only object in view, so the eye goes to "
            f"it first, but {why}. It is {size_word(box)}, so it takes up "
            f"{'much' if size_word(box) == 'large' else 'only part'} of the frame."
        )


def _area(box: Box) -> float:
    x1, y1, x2, y2 = box.xyxy
    return (x2 - x1) * (y2 - y1)

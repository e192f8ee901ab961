"""Teachers that turn an image's symbolic context into instruction data (paper §3).

The paper prompts a text-only GPT-4 with captions and boxes (never the image) plus a few
hand-written seed examples. Three teachers answer the same `Request` in the same textual
format (so one parser, `vistune.datagen.parse`, reads all of them):

- `openai`: any OpenAI-compatible chat-completions endpoint through `ChatClient` (the
  paper's path; GPT-4-class APIs, vLLM, llama.cpp servers);
- `local`: a Hugging Face causal LM in this process, greedy, through its chat template
  (default: the packaged SmolLM2-135M-Instruct; loads on first use); an answer cut off
  by `max_new_tokens` is rejected as "truncated" (greedy would repeat it);
- `rules`: a deterministic generator from the captions and boxes: counts, positions,
  sizes, relative positions and colours named in the captions. It is not an LLM and says
  so in its name, which is recorded in the store and the run summary.
"""

from __future__ import annotations

import random
import re
import threading
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.chat_client import ChatClient
from vistune.datagen.context import Box, ImageContext
from vistune.datagen.parse import RejectedOutput
from vistune.datagen.store import prompt_hash


@dataclass(frozen=True)
class Request:
    """One teacher request: the messages to send and what they were built from."""

    response_type: str
    context: ImageContext
    messages: list[dict]
    question: str | None = None
    """For detail descriptions: the user's request, shown to the teacher and kept as the
    sample's human turn."""


class Teacher(ABC):
    """Base: `name` identifies the teacher in the store; `respond` returns its raw text."""

    name = "teacher"
    concurrent = True
    """False when requests cannot overlap (one in-process model); the pipeline then runs
    them one at a time whatever --workers says."""
    max_tokens: int | None = None
    """The reply token limit (None: none). Kept with each stored request, so an answer
    rejected as truncated is asked again by a run that allows more."""

    @abstractmethod
    def respond(self, request: Request) -> str:
        """The teacher's raw text answer (raises EndpointError when it cannot answer)."""

    def close(self) -> None:  # noqa: B027 (optional hook; most teachers hold nothing)
        """Release connections or memory."""


class OpenAITeacher(Teacher):
    """A chat-completions endpoint; the name records the model (not the URL)."""

    def __init__(self, base_url: str, model: str, **client_options: Any) -> None:
        self.client = ChatClient(base_url, model, **client_options)
        self.name = f"openai:{model}"
        self.max_tokens = self.client.max_tokens

    def respond(self, request: Request) -> str:
        return self.client.complete(request.messages)

    def close(self) -> None:
        self.client.close()


class LocalTeacher(Teacher):
    """A Hugging Face causal LM directory, greedy decoding with its chat template.

    A folder given is checked when the teacher is made (config, safetensors weights only,
    never a pickle; no custom code; a tokenizer with a chat template), so a problem with it
    is one ModelDirError before any request; the weights load on first use."""

    concurrent = False

    def __init__(self, model_dir: str | Path | None = None, max_new_tokens: int = 512) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_new_tokens = self.max_tokens = max_new_tokens
        # the folder's full path: two models may share a folder name (checkpoint-1000)
        label = self.model_dir.resolve() if self.model_dir else "default SmolLM2-135M-Instruct"
        self.name = f"local:{label}"
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        if self.model_dir is not None:
            self._tokenizer = _checked_tokenizer(self.model_dir)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from vistune.model.checkpoint import load_hf_model

        if self.model_dir is None:
            from vistune.weights import ensure_default_weights

            self.model_dir = ensure_default_weights().llm_dir
        if self._tokenizer is None:
            self._tokenizer = _checked_tokenizer(self.model_dir)
        self._model = load_hf_model(AutoModelForCausalLM, self.model_dir, "teacher", torch.float32)

    def respond(self, request: Request) -> str:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            tok = self._tokenizer
            text = tok.apply_chat_template(
                request.messages, tokenize=False, add_generation_prompt=True
            )
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            # the reply stops at the LLM's context: past it, positions are out of range
            # (absolute embeddings fail, rotary ones drift); this request alone is rejected
            prompt = enc["input_ids"].shape[1]
            limit = getattr(self._model.config, "max_position_embeddings", None) or 1 << 62
            if prompt >= limit:
                raise RejectedOutput("too_long", f"{prompt} tokens, the teacher reads {limit}")
            budget = min(self.max_new_tokens, limit - prompt)
            with torch.no_grad():
                out = self._model.generate(
                    **enc, do_sample=False, max_new_tokens=budget, pad_token_id=pad
                )  # (1, T + new)
            new = out[0, prompt:]
            text = tok.decode(new, skip_special_tokens=True).strip()
        if len(new) >= budget and new[-1].item() != tok.eos_token_id:
            raise RejectedOutput("truncated", f"{budget} new tokens", raw=text)
        return text

    def close(self) -> None:
        self._model = None


def _checked_tokenizer(path: Path) -> Any:
    """The tokenizer of a checked teacher folder (ModelDirError, one line, when unusable)."""
    from vistune.errors import ModelDirError
    from vistune.model.checkpoint import check_hf_dir, load_tokenizer

    check_hf_dir(path, "teacher", tokenizer=True)
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelDirError(f"{path}: the teacher's tokenizer has no chat template")
    return tokenizer


class RulesTeacher(Teacher):
    """Exact, deterministic answers computed from the annotations (not an LLM)."""

    name = "rules (not an LLM)"

    def respond(self, request: Request) -> str:
        facts = SceneFacts.from_context(request.context)
        rng = random.Random(prompt_hash(request.messages))
        if request.response_type == "conversation":
            pairs = facts.conversation(rng)
        elif request.response_type == "complex":
            pairs = [facts.reasoning(rng)]
        elif request.response_type == "detail":
            return facts.description()
        else:
            raise ValueError(f"unknown response type {request.response_type!r}")
        return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in pairs)


TEACHERS: dict[str, type[Teacher]] = {
    "openai": OpenAITeacher,
    "local": LocalTeacher,
    "rules": RulesTeacher,
}


def make_teacher(name: str, **options: Any) -> Teacher:
    """The teacher called `name` built with its own options (see each class)."""
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; valid: {', '.join(TEACHERS)}")
    return TEACHERS[name](**options)


# ----------------------------------------------------------------- the rules generator

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
    """Where a box's centre falls, in thirds of the picture."""
    x1, y1, x2, y2 = box.xyxy
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    if (row, col) == ("middle", "centre"):
        return "in the centre of the picture"
    if row == "middle":
        return f"on the {col} side of the picture"
    if col == "centre":
        return f"near the {row} of the picture"
    return f"in the {row} {col} part of the picture"


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


@dataclass(frozen=True)
class SceneFacts:
    """What the annotations make certain: captions, boxes, counts and caption colours."""

    captions: tuple[str, ...]
    boxes: tuple[Box, ...]
    counts: dict[str, int]
    colours: dict[str, str]
    """category -> its colour, for categories with one object whose colour the captions
    name unambiguously."""

    @classmethod
    def from_context(cls, context: ImageContext) -> SceneFacts:
        counts = dict(Counter(b.category for b in context.boxes).most_common())
        colours = {}
        text = " ".join(context.captions).lower()
        for cat, n in counts.items():
            noun = f"(?:{re.escape(cat)}|{re.escape(plural(cat))})"
            pattern = rf"\b({'|'.join(COLOURS)})\s+(?:(?:small|large|big|tiny|medium)\s+)?{noun}\b"
            found = {m.group(1) for m in re.finditer(pattern, text)}
            if n == 1 and len(found) == 1:
                colours[cat] = found.pop()
        return cls(tuple(context.captions), tuple(context.boxes), counts, colours)

    def named(self, box: Box) -> str:
        colour = self.colours.get(box.category)
        return f"{colour} {box.category}" if colour else box.category

    def inventory(self) -> str:
        parts = [
            a(self.named(self._only(cat))) if n == 1 else f"{number(n)} {plural(cat)}"
            for cat, n in self.counts.items()
        ]
        return join(parts)

    def _only(self, category: str) -> Box:
        return next(b for b in self.boxes if b.category == category)

    def _singles(self) -> list[Box]:
        return [self._only(cat) for cat, n in self.counts.items() if n == 1]

    def conversation(self, rng: random.Random) -> list[tuple[str, str]]:
        if not self.boxes:
            first = sentence(self.captions[0])
            return [("What does this picture show?", f"The picture shows this scene: {first}")]
        pairs = [("What objects can you see in the picture?", f"I can see {self.inventory()}.")]
        counted = [
            (f"How many {plural(cat)} are there?",
             f"There {'is' if n == 1 else 'are'} {number(n)} {plural(cat, n)}.")
            for cat, n in list(self.counts.items())[:2]
        ]  # fmt: skip
        pairs.append(counted[0])
        singles = self._singles()
        rng.shuffle(singles)
        for box in singles[:2]:
            pairs.append(
                (f"Where is the {box.category}?", f"The {self.named(box)} is {where(box)}.")
            )
        if len(singles) >= 2 and relation(singles[0], singles[1]):
            x, y = singles[0], singles[1]
            q = f"Where is the {x.category} relative to the {y.category}?"
            pairs.append((q, f"The {self.named(x)} is {relation(x, y)} the {self.named(y)}."))
        colours = [b for b in singles if b.category in self.colours]
        if colours:
            cat = colours[-1].category
            pairs.append((f"What colour is the {cat}?", f"The {cat} is {self.colours[cat]}."))
        pairs.extend(counted[1:])
        return pairs[:6]

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
        centred = where(box) == "in the centre of the picture"
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

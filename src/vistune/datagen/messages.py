"""The teacher's chat messages for one request (paper §3, Table 11).

A request is the packaged system prompt of its response type, its seed examples as earlier
user / assistant turns, then the image's symbolic context (captions and boxes); a `detail`
request adds one question drawn from the curated list. The prompt files live in
`vistune/datagen/prompts/<type>/` (system.txt, fewshot_NNN_context.txt / _response.txt).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib import resources

from vistune.data.annotations import ImageContext
from vistune.data.formats import RESPONSE_TYPES
from vistune.datagen.teachers import Request


@dataclass(frozen=True)
class Prompt:
    system: str
    examples: tuple[tuple[str, str], ...]
    """(context, response) seed examples, shown as earlier user/assistant turns."""


@cache
def load_prompt(response_type: str) -> Prompt:
    """The packaged system prompt and seed examples for one response type."""
    if response_type not in RESPONSE_TYPES:
        raise ValueError(
            f"unknown response type {response_type!r}; valid: {', '.join(RESPONSE_TYPES)}"
        )
    folder = resources.files("vistune.datagen").joinpath("prompts", response_type)
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith("_context.txt"))
    examples = tuple(
        (
            folder.joinpath(n).read_text(encoding="utf-8").strip(),
            folder.joinpath(n.replace("_context", "_response")).read_text(encoding="utf-8").strip(),
        )
        for n in names
    )
    return Prompt(folder.joinpath("system.txt").read_text(encoding="utf-8").strip(), examples)


def build_messages(
    response_type: str, context: ImageContext, question: str | None = None
) -> list[dict]:
    """Chat messages for one request: system, seed examples, then this image's context."""
    prompt = load_prompt(response_type)
    messages = [{"role": "system", "content": prompt.system}]
    for example, response in prompt.examples:
        messages.append({"role": "user", "content": example})
        messages.append({"role": "assistant", "content": response})
    content = context.render()
    if response_type == "detail":
        content += f"\n\nQuestion to answer: {question}"
    messages.append({"role": "user", "content": content})
    return messages


def detail_question(image_id: str, seed: int) -> str:
    """The detail request for one image, drawn from the curated list (paper §3)."""
    from vistune.datagen.naive import DETAIL_QUESTIONS

    return random.Random(f"{seed}:{image_id}:detail").choice(DETAIL_QUESTIONS)


def build_requests(
    contexts: list[ImageContext], types: tuple[str, ...], seed: int
) -> list[Request]:
    requests = []
    for context in contexts:
        for rtype in types:
            if rtype == "brief":
                continue
            question = detail_question(context.image_id, seed) if rtype == "detail" else None
            messages = build_messages(rtype, context, question)
            requests.append(Request(rtype, context, messages, question))
    return requests

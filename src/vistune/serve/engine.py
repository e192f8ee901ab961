"""One inference engine for the chat CLI, the HTTP API and the web UI.

messages + optional PIL image -> prompt ids under the model's conversation template
(vistune.data.conversation.tokenize_prompt, "<image>" -> IMAGE_TOKEN_ID) -> frozen tower,
projector and splice with left padding (LlavaModel, paper §4.1 eq. 1) -> our decode loop
(vistune.serve.generate). Answers stop at the template's stop string (e.g. "###" for
vicuna_v0, paper Table 2), any extra `config.stop`, or EOS.

    engine = Engine(load_model("default"))
    engine.answer([{"role": "user", "content": "What is shown?"}], image, GenerationConfig())

The engine casts the model it is given to `dtype` once (bf16 by default: on CPUs with
AVX-512 BF16/AMX the prefill runs about 3x faster than fp32; see docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from vistune.config import GenerationConfig
from vistune.data.conversation import IMAGE_PLACEHOLDER, stop_strings, tokenize_prompt
from vistune.errors import VistuneError
from vistune.serve.generate import Completion, Generator

if TYPE_CHECKING:
    from PIL import Image

    from vistune.model.llava import LlavaModel, Spliced

Request = tuple[list[dict], "Image.Image | None"]
DEFAULT_CONFIG = GenerationConfig()


def with_image(messages: list[dict], image: Image.Image | None) -> list[dict]:
    """Messages with "<image>" at the start of the first user turn when there is an image.

    A message that already holds the placeholder keeps it where the user put it; a
    placeholder without an image, or more than one, is an error the caller caused.
    """
    count = sum(str(m.get("content", "")).count(IMAGE_PLACEHOLDER) for m in messages)
    if image is None:
        if count:
            raise VistuneError(f"the messages contain {IMAGE_PLACEHOLDER} but no image was given")
        return [dict(m) for m in messages]
    if count > 1:
        raise VistuneError(f"the messages contain {IMAGE_PLACEHOLDER} {count} times; one image")
    out = [dict(m) for m in messages]
    if count == 0:
        first = next((m for m in out if m.get("role") == "user"), None)
        if first is None:
            raise VistuneError("the messages have no user turn to attach the image to")
        first["content"] = f"{IMAGE_PLACEHOLDER}\n{first.get('content', '')}"
    return out


def strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Stream pieces whose concatenation is `"".join(pieces).strip()`.

    Leading whitespace is dropped; whitespace is held back until something follows it.
    """
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        body = piece.rstrip()
        if body:
            yield pending + body
            pending = piece[len(body) :]
        else:
            pending += piece


class Engine:
    """A LlavaModel ready to answer: template, stops, dtype and the decode loop in one place."""

    def __init__(
        self,
        model: LlavaModel,
        dtype: torch.dtype = torch.bfloat16,
        template: str | None = None,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.to(dtype).eval()
        self.dtype = dtype
        self.template = template or model.config.template
        self.tokenizer = model.tokenizer
        self.stop = stop_strings(self.template, self.tokenizer)
        self.generator = Generator(model.llm, self.tokenizer)
        self.batch_size = batch_size

    @torch.inference_mode()
    def prepare(self, requests: Sequence[Request]) -> Spliced:
        """Left-padded LLM inputs for a batch of (messages, image) requests."""
        ids, images = [], []
        for messages, image in requests:
            ids.append(tokenize_prompt(with_image(messages, image), self.tokenizer, self.template))
            if image is not None:
                images.append(image)
        embeds = None
        if images:
            pixels = self.model.image_processor(images)  # (M, 3, S, S)
            embeds = self.model.project(self.model.image_features(pixels))  # (M, T, D)
        return self.model.splice(ids, embeds, padding_side="left")

    def complete(
        self, requests: Sequence[Request], config: GenerationConfig = DEFAULT_CONFIG
    ) -> list[Completion]:
        """Completions (text stripped, token ids, finish reason), batch_size rows at a time."""
        results: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            inputs = self.prepare(requests[start : start + self.batch_size])
            chunk = self.generator.run(
                inputs.inputs_embeds, inputs.attention_mask, config, self.stop
            )
            for c in chunk:
                c.text = c.text.strip()
            results.extend(chunk)
        return results

    def answer(
        self,
        messages: list[dict],
        image: Image.Image | None = None,
        config: GenerationConfig = DEFAULT_CONFIG,
    ) -> str:
        """The assistant's next answer to `messages` (about `image`, if given)."""
        return self.complete([(messages, image)], config)[0].text

    def stream(
        self,
        messages: list[dict],
        image: Image.Image | None = None,
        config: GenerationConfig = DEFAULT_CONFIG,
    ) -> Iterator[str]:
        """The same answer as `answer`, as text pieces while they are generated.

        The prompt is checked (and the image encoded) now, so bad messages raise here,
        before the caller starts sending anything; generation runs as pieces are taken."""
        inputs = self.prepare([(messages, image)])
        pieces = self.generator.stream(
            inputs.inputs_embeds, inputs.attention_mask, config, self.stop
        )
        return strip_stream(pieces)

    def answer_batch(
        self, requests: Sequence[Request], config: GenerationConfig = DEFAULT_CONFIG
    ) -> list[str]:
        """Answers for many (messages, image) requests, batched with left padding."""
        return [c.text for c in self.complete(requests, config)]

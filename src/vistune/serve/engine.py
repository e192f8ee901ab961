"""One inference engine for the chat CLI, the HTTP API and the web UI.

messages + optional PIL image -> prompt ids under the model's conversation template
(vistune.data.conversation.tokenize_prompt, "<image>" -> IMAGE_TOKEN_ID) -> frozen tower,
projector and splice with left padding (LlavaModel, paper §4.1 eq. 1) -> our decode loop
(vistune.serve.generate). Answers stop at the template's stop string (e.g. "###" for
vicuna_v0, paper Table 2), any extra `config.stop`, or EOS.

    engine = Engine(load_model("default"))
    engine.answer([{"role": "user", "content": "What is shown?"}], image, GenerationConfig())

The engine casts the model it is given to `dtype` once (bf16 by default: on CPUs with
AVX-512 BF16/AMX the prefill runs about 3x faster than fp32; see docs/PERFORMANCE.md),
keeping RoPE's frequencies in float32 as transformers does. A prompt that leaves the LLM's
context no room for an answer is a VistuneError; an answer ends (`length`) where it fills it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from vistune.config import GenerationConfig
from vistune.data.conversation import IMAGE_PLACEHOLDER, stop_strings, tokenize_prompt
from vistune.errors import VistuneError
from vistune.serve.generate import Completion, Generator, context_length

if TYPE_CHECKING:
    from PIL import Image

    from vistune.model.llava import LlavaModel, Spliced

Request = tuple[list[dict], "Image.Image | None"]
DEFAULT_CONFIG = GenerationConfig()
ROPE_BUFFERS = ("inv_freq", "original_inv_freq")
"""RoPE frequency buffers: transformers keeps them float32 in a bf16 model (its rotary
modules compute in float32); in bf16 they drift by up to 0.4%, a radian per ~250 positions."""


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, leaving float32 RoPE frequencies float32 (as `from_pretrained` with
    that dtype has them)."""
    keep = [
        (name, buffer)
        for name, buffer in model.named_buffers(remove_duplicate=False)
        if name.rpartition(".")[2] in ROPE_BUFFERS and buffer.dtype == torch.float32
    ]
    model.to(dtype)
    for name, buffer in keep:
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buffer)
    return model


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
        self.model = cast_model(model, dtype).eval()
        self.dtype = dtype
        self.template = template or model.config.template
        self.tokenizer = model.tokenizer
        self.stop = stop_strings(self.template, self.tokenizer)
        self.generator = Generator(model.llm, self.tokenizer)
        self.context = context_length(model.llm)
        self.batch_size = batch_size

    @torch.inference_mode()
    def prepare(self, requests: Sequence[Request]) -> Spliced:
        """Left-padded LLM inputs for a batch of (messages, image) requests; a prompt that
        leaves no room in the LLM's context for an answer is a VistuneError."""
        ids, images = [], []
        for messages, image in requests:
            ids.append(tokenize_prompt(with_image(messages, image), self.tokenizer, self.template))
            if image is not None:
                images.append(image)
            if self.context is not None:
                self._check_length(len(ids[-1]), image is not None)
        embeds = None
        if images:
            pixels = self.model.image_processor(images)  # (M, 3, S, S)
            embeds = self.model.project(self.model.image_features(pixels))  # (M, T, D)
        return self.model.splice(ids, embeds, padding_side="left")

    def _check_length(self, num_ids: int, has_image: bool) -> None:
        """A prompt of `num_ids` ids (the image placeholder one of them) must leave the LLM
        room for at least one answer token."""
        image = self.model.num_image_tokens if has_image else 0
        length = num_ids + max(image - 1, 0)  # (L,) after the splice
        if length >= self.context:
            counted = f" (the image counts as {image})" if has_image else ""
            raise VistuneError(
                f"the prompt is {length} tokens{counted}, but the model's context of "
                f"{self.context} must also hold the answer: shorten it"
            )

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

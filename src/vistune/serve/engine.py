"""One inference engine for the chat CLI, the HTTP API and the web UI.

messages + optional PIL image -> prompt ids under the model's conversation template
(vistune.data.conversation.tokenize_prompt, "<image>" -> IMAGE_TOKEN_ID) -> frozen tower,
projector and splice (LlavaModel, paper §4.1 eq. 1) -> our decode loop. Answers stop at the
template's stop string (e.g. "###" for vicuna_v0, paper Table 2), any extra `config.stop`,
or EOS.

    engine = Engine(load_model("default"))
    engine.answer([{"role": "user", "content": "What is shown?"}], image, GenerationConfig())

Two ways through it:

- `submit` / `stream` / `answer` (the chat CLI, `vistune serve` and its web page): requests
  join one continuous batch on the model's thread (vistune.serve.scheduler), reusing the
  cached keys and values of their longest known prefix (vistune.serve.prefix_cache);
- `complete` / `answer_batch` (batched evaluation): a static left-padded batch through
  vistune.serve.generate, all requests known up front.

The engine casts the model it is given to `dtype` once (bf16 by default: on CPUs with
AVX-512 BF16/AMX the prefill runs about 3x faster than fp32; see docs/PERFORMANCE.md),
keeping RoPE's frequencies in float32 as transformers does. A prompt that leaves the LLM's
context no room for an answer is a VistuneError; an answer ends (`length`) where it fills it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch

from vistune.config import AT_LEAST_0, AT_LEAST_1, GenerationConfig
from vistune.data.conversation import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    stop_strings,
    tokenize_prompt,
)
from vistune.errors import VistuneError
from vistune.model import llama
from vistune.serve.generate import Completion, Generator, context_length
from vistune.serve.prefix_cache import image_digest, position_key
from vistune.serve.scheduler import Delta, Done, Event, Failed, Job, Scheduler
from vistune.serve.threads import on_own_thread

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


class Stripper:
    """Turns stream pieces into pieces whose concatenation is the whole text `.strip()`ped:
    leading whitespace is dropped; whitespace is held back until something follows it."""

    def __init__(self) -> None:
        self.started, self.pending = False, ""

    def push(self, piece: str) -> str:
        """What of `piece` (and what was held back) can be shown now; may be ""."""
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if body:
            out, self.pending = self.pending + body, piece[len(body) :]
            return out
        self.pending += piece
        return ""


def strip_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Stream pieces whose concatenation is `"".join(pieces).strip()` (see Stripper)."""
    stripper = Stripper()
    for piece in pieces:
        out = stripper.push(piece)
        if out:
            yield out


class Engine:
    """A LlavaModel ready to answer: template, stops, dtype and the decode loop in one place."""

    def __init__(
        self,
        model: LlavaModel,
        dtype: torch.dtype = torch.bfloat16,
        template: str | None = None,
        batch_size: int = 8,
        max_batch: int = 8,
        max_waiting: int = 64,
        cache_bytes: int = 256 << 20,
        quantize: str = "none",
    ) -> None:
        AT_LEAST_1.check("batch_size", batch_size)
        self.model = cast_model(model, dtype).eval()
        self.dtype = dtype
        self.template = template or model.config.template
        self.tokenizer = model.tokenizer
        self.stop = stop_strings(self.template, self.tokenizer)
        self.generator = Generator(model.llm, self.tokenizer, quantize=quantize)
        # a model that cannot decode quantized is refused here, not at the first reply
        if quantize != "none" and not (self.generator.fast and self.generator.fast_decoder()):
            raise ValueError(
                f"--quantize {quantize} decodes Llama-family LLMs only "
                f"({', '.join(llama.SUPPORTED_TYPES)})"
            )
        self.context = context_length(model.llm)
        self.batch_size = batch_size
        self.scheduler = Scheduler(
            self.generator, max_batch=max_batch, max_waiting=max_waiting, cache_bytes=cache_bytes
        )

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

    def submit(
        self,
        messages: list[dict],
        image: Image.Image | None,
        config: GenerationConfig,
        emit: Callable[[Event], None],
    ) -> Job:
        """Queue one request on the continuous batch (vistune.serve.scheduler); its events
        (text pieces, then Done or Failed) go to `emit` on the model's thread.

        The prompt is checked here, so bad messages raise VistuneError before anything is
        queued; QueueFull when too many requests wait already."""
        ids = tokenize_prompt(with_image(messages, image), self.tokenizer, self.template)
        if self.context is not None:
            self._check_length(len(ids), image is not None)
        digest = None if image is None else image_digest(image)
        key = position_key(ids, digest, self.model.num_image_tokens)
        limit = config.max_new_tokens
        if self.context is not None:
            limit = min(limit, self.context - len(key))
        job = Job(
            key=key,
            embed=partial(self._embed_from, ids, image),
            config=config,
            limit=limit,
            stops=(*self.stop, *config.stop),
            tokenizer=self.tokenizer,
            emit=emit,
        )
        return self.scheduler.submit(job)

    @torch.inference_mode()
    def _embed_from(self, ids: list[int], image: Image.Image | None, start: int) -> torch.Tensor:
        """The LLM inputs of the prompt from position `start` on. # (1, L - start, D)

        When the prefix cache covers the image, the tower is not run again."""
        if image is not None:
            at = ids.index(IMAGE_TOKEN_ID)
            tokens = self.model.num_image_tokens
            if start >= at + tokens:  # only text after the cached part
                text = ids[start - tokens + 1 :]
                return self.model.splice([text], None).inputs_embeds
            pixels = self.model.image_processor([image])  # (1, 3, S, S)
            embeds = self.model.project(self.model.image_features(pixels))  # (1, T, D)
            return self.model.splice([ids], embeds).inputs_embeds[:, start:]
        return self.model.splice([ids[start:]], None).inputs_embeds

    def stream(
        self,
        messages: list[dict],
        image: Image.Image | None = None,
        config: GenerationConfig = DEFAULT_CONFIG,
    ) -> Iterator[str]:
        """The same answer as `answer`, as text pieces while they are generated.

        The prompt is checked now, so bad messages raise here, before the caller starts
        sending anything. Leaving the loop early (or closing it) cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        job = self.submit(messages, image, config, events.put)
        return strip_stream(_pieces(job, events))

    def answer(
        self,
        messages: list[dict],
        image: Image.Image | None = None,
        config: GenerationConfig = DEFAULT_CONFIG,
    ) -> str:
        """The assistant's next answer to `messages` (about `image`, if given)."""
        return "".join(self.stream(messages, image, config))

    def close(self) -> None:
        """Stop the model's thread (what runs or waits is cancelled)."""
        self.scheduler.stop()

    def answer_batch(
        self, requests: Sequence[Request], config: GenerationConfig = DEFAULT_CONFIG
    ) -> list[str]:
        """Answers for many (messages, image) requests, batched with left padding."""
        return [c.text for c in self.complete(requests, config)]


def open_engine(
    spec: str,
    dtype: str = "bf16",
    template: str | None = None,
    threads: int = 0,
    note: Callable[[str], str] = lambda text: text,
    **engine_options,
) -> Engine:
    """The Engine of `vistune chat` and `vistune serve`: `spec` (a model folder or
    "default", whose packaged weights are converted on first use, with progress on stderr)
    loaded in `dtype` ("bf16" or "fp32") on `threads` CPU threads (0: torch's default);
    each of vistune.model.model_notes is printed through `note`. `engine_options` go to
    Engine (`quantize="int8"` or `"int4"`: weight-only decode steps, bf16 only)."""
    import sys
    from pathlib import Path

    from vistune.model import DEFAULT_SPEC, load_model, model_notes

    if not AT_LEAST_0.holds(threads):
        raise VistuneError(f"--threads {AT_LEAST_0.refusal(threads)}")
    if threads:
        torch.set_num_threads(threads)
    if spec != DEFAULT_SPEC and not Path(spec).exists():
        raise VistuneError(f"{spec}: no such model directory")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if engine_options.get("quantize", "none") != "none" and dtype != "bf16":
        raise VistuneError(f"--quantize {engine_options['quantize']} needs --dtype bf16")

    def load() -> Engine:
        if spec == DEFAULT_SPEC:  # the first run converts the packaged weights: show it
            from vistune.weights import ensure_default_weights

            ensure_default_weights(progress=lambda msg: print(f"vistune: {msg}", file=sys.stderr))
        model = load_model(spec, dtype=torch_dtype)
        for text in model_notes(model, spec, template):
            print(f"vistune: note: {note(text)}", file=sys.stderr)
        try:
            return Engine(model, dtype=torch_dtype, template=template, **engine_options)
        except ValueError as err:  # a model the options do not fit: the user's to change
            raise VistuneError(str(err)) from err

    # loading computes (casts, fused and quantized copies): on a thread that ends, so that
    # the thread that decodes is the only one keeping OpenMP workers (vistune.serve.threads)
    return on_own_thread(load)


def _pieces(job: Job, events: queue.Queue[Event]) -> Iterator[str]:
    """A job's text pieces from its event queue; a failure is raised here; leaving early
    cancels the job."""
    try:
        while True:
            event = events.get()
            if isinstance(event, Delta):
                yield event.text
            elif isinstance(event, Done):
                return
            elif isinstance(event, Failed):
                raise event.error
    finally:
        job.cancel()

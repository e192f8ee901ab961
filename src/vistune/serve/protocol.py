"""The OpenAI chat-completions wire format: requests in, responses and stream chunks out.

Follows https://platform.openai.com/docs/api-reference/chat for the fields vistune honours
(messages with text and image_url parts, temperature, top_p, max_tokens and
max_completion_tokens, stop, seed, n=1, stream, stream_options.include_usage); fields it
does not use (presence_penalty, user, ...) are accepted and ignored, as most
OpenAI-compatible servers do. A request becomes the engine's inputs here:

- system (or developer) messages go before the first user turn's text: vistune's templates
  (paper Table 2) have no system slot;
- consecutive messages of one role are joined; image parts become "<image>" where they
  stand (the engine wants the image in the first user turn, as the paper trains it);
- `data:image/...;base64,` URLs are decoded here; http(s) URLs are fetched by the app,
  only from allowed hosts.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vistune.data.conversation import IMAGE_PLACEHOLDER

MAX_STOPS = 4


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.code, self.param)


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Open):
    url: str
    detail: str | None = None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    model: str
    messages: list[Message]
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


def parse_request(data: object) -> ChatRequest:
    """A validated ChatRequest; ApiError 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None
    if not request.messages:
        raise ApiError(400, "messages must hold at least one message", param="messages")
    if len(request.stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings", param="stop")
    return request


def image_urls(request: ChatRequest) -> list[str]:
    """Every image URL of the request, in order."""
    return [
        part.image_url.url
        for m in request.messages
        if isinstance(m.content, list)
        for part in m.content
        if isinstance(part, ImagePart)
    ]


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,` URL; ApiError 400 if it is not one."""
    match = _DATA_URL.match(url)
    if match is None:
        raise ApiError(400, "image_url must be data:image/...;base64,... or an http(s) URL")
    mime = (match["mime"] or "").lower()
    if mime and not mime.startswith("image/"):
        raise ApiError(400, f"image_url has media type {mime}, not an image")
    try:
        return base64.b64decode(url[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url holds invalid base64") from None


def to_messages(request: ChatRequest) -> list[dict]:
    """The engine's [{"role": "user"|"assistant", "content": str}, ...] (module docstring)."""
    system, turns = [], []
    for m in request.messages:
        text = _text(m)
        if m.role in ("system", "developer"):
            system.append(text)
            continue
        if turns and turns[-1]["role"] == m.role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": m.role, "content": text})
    if system:
        if not turns or turns[0]["role"] != "user":
            raise ApiError(400, "after the system message the first message must be the user's")
        turns[0]["content"] = "\n\n".join([*system, turns[0]["content"]])
    return turns


def _text(message: Message) -> str:
    """A message's text, each image part as the image placeholder."""
    if message.content is None:
        return ""
    parts = [message.content] if isinstance(message.content, str) else message.content
    pieces = []
    for part in parts:
        text = part if isinstance(part, str) else getattr(part, "text", None)
        if text is None:
            pieces.append(IMAGE_PLACEHOLDER)
        elif IMAGE_PLACEHOLDER in text:
            raise ApiError(
                400, f"message text may not hold {IMAGE_PLACEHOLDER}; send an image_url part"
            )
        else:
            pieces.append(text)
    return "\n".join(pieces)


FINISH = {"stop": "stop", "eos": "stop", "length": "length"}
"""vistune's finish reasons -> OpenAI's."""


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_body(
    cid: str, model: str, text: str, finish: str, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH[finish],
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def chunk_body(
    cid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    use: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One stream chunk: a delta (with finish_reason at the end), or the usage chunk
    (`delta` None: no choices, as OpenAI sends it)."""
    choices = []
    if delta is not None:
        choices = [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": None if finish is None else FINISH[finish],
                "logprobs": None,
            }
        ]
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if use is not None:
        body["usage"] = use
    return body

"""Teachers that turn an image's symbolic context into instruction data (paper §3).

The paper prompts a text-only GPT-4 with captions and boxes (never the image) plus a few
hand-written seed examples. Three teachers answer the same `Request` in the same textual
format (so one parser, `vistune.datagen.parse`, reads all of them):

- `openai`: any OpenAI-compatible chat-completions endpoint through `ChatClient` (the
  paper's path; GPT-4-class APIs, vLLM, llama.cpp servers);
- `local`: a Hugging Face causal LM in this process, greedy, through its chat template
  (vistune.local_chat, as the local judge; default: the packaged SmolLM2-135M-Instruct;
  loads on first use); an answer cut off
  by `max_new_tokens` is rejected as "truncated" (greedy would repeat it);
- `rules`: a deterministic generator from the captions and boxes (`vistune.datagen.rules`):
  counts, absent objects, colours, positions, sizes and relative positions. It is not an
  LLM and says so in its name, which is recorded in the store and the run summary.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.chat_client import ChatClient
from vistune.config import ClientConfig
from vistune.data.annotations import ImageContext
from vistune.datagen.parse import RejectedOutput
from vistune.datagen.rules import SceneFacts
from vistune.datagen.store import prompt_hash
from vistune.local_chat import LocalChatModel, PromptTooLong


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

    def __init__(self, config: ClientConfig, api_key: str | None = None) -> None:
        self.client = ChatClient(config, api_key)
        self.name = f"openai:{config.model}"
        self.max_tokens = self.client.max_tokens

    def respond(self, request: Request) -> str:
        return self.client.complete(request.messages)

    def close(self) -> None:
        self.client.close()


class LocalTeacher(Teacher):
    """A Hugging Face causal LM directory, greedy decoding with its chat template
    (vistune.local_chat: checked when made, loaded on first use)."""

    concurrent = False

    def __init__(self, model_dir: str | Path | None = None, max_new_tokens: int = 512) -> None:
        self.lm = LocalChatModel(model_dir, "teacher", max_new_tokens)
        self.max_tokens = max_new_tokens
        # the folder's full path: two models may share a folder name (checkpoint-1000)
        label = (
            self.lm.model_dir.resolve() if self.lm.model_dir else "default SmolLM2-135M-Instruct"
        )
        self.name = f"local:{label}"

    @property
    def model_dir(self) -> Path | None:
        """The folder; None until the packaged default is loaded."""
        return self.lm.model_dir

    @property
    def max_new_tokens(self) -> int:
        return self.lm.max_new_tokens

    def respond(self, request: Request) -> str:
        try:
            reply = self.lm.reply(request.messages)
        except PromptTooLong as err:  # this request alone is rejected
            raise RejectedOutput(
                "too_long", f"{err.prompt} tokens, the teacher reads {err.limit}"
            ) from err
        text = reply.text.strip()
        if reply.truncated:
            raise RejectedOutput("truncated", f"{reply.budget} new tokens", raw=text)
        return text

    def close(self) -> None:
        self.lm.close()


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

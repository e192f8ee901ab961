"""Teachers that turn an image's symbolic context into instruction data (paper §3).

The paper prompts a text-only GPT-4 with captions and boxes (never the image) plus a few
hand-written seed examples. Three teachers answer the same `Request` in the same textual
format (so one parser, `vistune.datagen.parse`, reads all of them):

- `openai`: any OpenAI-compatible chat-completions endpoint through `ChatClient` (the
  paper's path; GPT-4-class APIs, vLLM, llama.cpp servers);
- `local`: a Hugging Face causal LM in this process, greedy, through its chat template
  (default: the packaged SmolLM2-135M-Instruct; loads on first use); an answer cut off
  by `max_new_tokens` is rejected as "truncated" (greedy would repeat it);
- `rules`: a deterministic generator from the captions and boxes (`vistune.datagen.rules`):
  counts, absent objects, colours, positions, sizes and relative positions. It is not an
  LLM and says so in its name, which is recorded in the store and the run summary.
"""

from __future__ import annotations

import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.chat_client import ChatClient
from vistune.data.annotations import ImageContext
from vistune.datagen.parse import RejectedOutput
from vistune.datagen.rules import SceneFacts
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

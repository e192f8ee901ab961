"""A Hugging Face causal LM in this process that answers chat messages: the in-process
counterpart of `vistune.chat_client`, shared by datagen's `local` teacher and the local
LLaVA-Bench judge (paper §3 and §5.1 use a text-only GPT-4 in those roles).

The folder is checked when the model is made (config, safetensors weights only, never a
pickle; no custom code; a tokenizer with a chat template), so a problem with it is one
ModelDirError before any request; the weights load on first use (or on `load()`). Replies
are greedy through the tokenizer's chat template, one request at a time (a lock: the
model is not safe to share between threads), and stop at the LLM's context.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.errors import ModelDirError, VistuneError


class PromptTooLong(VistuneError):
    """The prompt fills the LLM's context: this request alone cannot be answered."""

    def __init__(self, role: str, prompt: int, limit: int) -> None:
        super().__init__(f"the prompt is {prompt} tokens, the {role} reads {limit}")
        self.prompt = prompt
        self.limit = limit


@dataclass(frozen=True)
class LocalReply:
    text: str
    """The continuation alone, decoded without special tokens (not stripped)."""
    truncated: bool
    """Stopped by the token budget rather than the end-of-sequence token."""
    budget: int
    """New tokens allowed: max_new_tokens, less where the context ends sooner."""


class LocalChatModel:
    """A checked causal LM folder (`None`: the packaged SmolLM2-135M-Instruct) in the
    role `role` ("teacher", "judge": named in its errors)."""

    def __init__(self, model_dir: str | Path | None, role: str, max_new_tokens: int) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.role = role
        self.max_new_tokens = max_new_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()
        if self.model_dir is not None:
            self.tokenizer = self._checked_tokenizer(self.model_dir)

    def _checked_tokenizer(self, path: Path) -> Any:
        from vistune.model.checkpoint import check_hf_dir, load_tokenizer

        check_hf_dir(path, self.role, tokenizer=True)
        tokenizer = load_tokenizer(path)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelDirError(f"{path}: the {self.role}'s tokenizer has no chat template")
        return tokenizer

    def load(self) -> None:
        """Load the weights now (the first reply does it otherwise)."""
        import torch
        from transformers import AutoModelForCausalLM

        from vistune.model.checkpoint import load_hf_model

        if self.model_dir is None:
            from vistune.weights import ensure_default_weights

            self.model_dir = ensure_default_weights().llm_dir
        if self.tokenizer is None:
            self.tokenizer = self._checked_tokenizer(self.model_dir)
        self.model = load_hf_model(AutoModelForCausalLM, self.model_dir, self.role, torch.float32)

    def reply(self, messages: list[dict]) -> LocalReply:
        """The greedy reply to `messages`; PromptTooLong when they fill the context."""
        import torch

        with self._lock:
            if self.model is None:
                self.load()
            tok = self.tokenizer
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            # past the context, positions are out of range (absolute embeddings fail, rotary
            # ones drift): the reply stops there, and a prompt that fills it is refused
            prompt = enc["input_ids"].shape[1]
            limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 62
            if prompt >= limit:
                raise PromptTooLong(self.role, prompt, limit)
            budget = min(self.max_new_tokens, limit - prompt)
            with torch.no_grad():
                out = self.model.generate(
                    **enc, do_sample=False, max_new_tokens=budget, pad_token_id=pad
                )  # (1, T + new)
            new = out[0, prompt:]
            decoded = tok.decode(new, skip_special_tokens=True)
        truncated = len(new) >= budget and new[-1].item() != tok.eos_token_id
        return LocalReply(decoded, truncated, budget)

    def close(self) -> None:
        self.model = None

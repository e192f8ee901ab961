"""Our own decode loop over a Hugging Face causal LM fed with input embeddings.

LLaVA (paper §4.1, Fig. 1) answers by running the LLM on the spliced sequence of text and
projected image embeddings, so generation starts from `inputs_embeds`, not token ids.
`transformers`' `generate` accepts embeddings too, but we need stop strings checked on
stable decoded text, streaming, finished rows leaving the batch and bf16 on the CPU, and a
loop we can read and measure (benchmarks/generate.py).

The loop: one prefill over the (left-padded) prompt fills a `DynamicCache`; each step then
feeds only the new token. Positions come from the attention mask (`cumsum(mask) - 1`), so
left padding does not shift them. Text is detokenised incrementally the way TGI does it (a
piece is released only when it no longer ends in a partial UTF-8 character), and text that
might be the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vistune.config import GenerationConfig
from vistune.model import llama
from vistune.serve import decoder

FINISH_REASONS = ("stop", "eos", "length")


@dataclass
class Completion:
    """One row's result: the answer text (stop string trimmed) and how it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str
    """`stop` (a stop string), `eos` (the end-of-sequence token) or `length` (max tokens)."""


@dataclass
class TextState:
    """Incremental detokeniser + stop-string matcher for one row."""

    tokenizer: object
    stop: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    stopped: bool = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        """Add a token; extend the stable text and look for a stop string in it."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        # A trailing U+FFFD means the last token ended inside a multi-byte character.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._extend(full[len(prefix) :])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def flush(self) -> None:
        """At the end, release what is left even if it is not a whole character."""
        if self.stopped:
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self._extend(full[len(prefix) :])
        self.read_offset = len(self.ids)

    def _extend(self, piece: str) -> None:
        old_len = len(self.text)
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old_len - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _holdback(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def take(self, final: bool) -> str:
        """Text that is safe to show now (everything once the row is finished)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._holdback()
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: `cumsum(mask) - 1`, clamped at 0. # (B, L)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pick(logits: torch.Tensor, config: GenerationConfig, rng: torch.Generator) -> torch.Tensor:
    """Next token per row from float logits (B, V): argmax, or temperature + top-p sampling."""
    if config.temperature == 0:
        return logits.argmax(-1)
    # Shifted to max 0 and divided in float64: a temperature below float32's range (1e-45)
    # then gives the greedy token probability 1 instead of inf / inf = NaN.
    shifted = (logits - logits.amax(-1, keepdim=True)).double()  # (B, V) <= 0
    probs = torch.softmax(shifted / config.temperature, dim=-1)  # (B, V)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= config.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=rng)  # (B, 1)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def seeded_rng(seed: int | None, device: torch.device) -> torch.Generator:
    """The sampling RNG: seeded for reproducible samples, else from fresh entropy."""
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)
    return rng


def context_length(llm: torch.nn.Module) -> int | None:
    """Positions the LLM takes (`max_position_embeddings`: the size of a learned position
    table, or the range RoPE was trained on); None when its config does not say."""
    value = getattr(getattr(llm, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def eos_ids(llm: torch.nn.Module, tokenizer: object) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS and the LLM generation config's."""
    ids: set[int] = set()
    gen_cfg = getattr(llm, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def advance(
    state: TextState, token: int, eos: set[int], stop_ids: set[int], limit: int
) -> tuple[str, Completion | None]:
    """Give one row its next token: (text now safe to show, its Completion if it ended).

    It ends as `eos` (an EOS id), `stop` (a stop id or stop string) or `length` (`limit`
    tokens). Shared by the static batch here and the continuous one (vistune.serve.scheduler).
    """
    reason = None
    if token in eos:
        reason = "eos"
    elif token in stop_ids:
        reason = "stop"
    else:
        state.push(token)
        if state.stopped:
            reason = "stop"
        elif len(state.ids) >= limit:
            reason = "length"
    if reason is None:
        return state.take(final=False), None
    state.flush()
    return state.take(final=True), Completion(state.text, list(state.ids), reason)


class Generator:
    """Greedy / sampled decoding with a KV cache over any HF causal LM.

    `autocast` (e.g. torch.bfloat16) runs the forward passes under CPU autocast; casting the
    LLM's weights to bf16 instead is the caller's choice (the Engine does that: faster here,
    see docs/PERFORMANCE.md).
    """

    def __init__(
        self,
        llm: torch.nn.Module,
        tokenizer: object,
        autocast: torch.dtype | None = None,
        fast: bool = True,
        quantize: str = "none",
    ) -> None:
        self.llm = llm
        self.quantize = quantize
        self.tokenizer = tokenizer
        self.autocast = autocast
        self.fast = fast and autocast is None and llama.supports(llm)
        self._decoder: decoder.LlamaDecoder | None = None
        self._decoder_key: tuple = ()
        self.eos = eos_ids(llm, tokenizer)
        self.context = context_length(llm)
        params = inspect.signature(llm.forward).parameters
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes
        # in 5.40); peft's wrappers take **kwargs and pass it on to the model they wrap.
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        named = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in named else "past_key_values"

    def fast_decoder(self) -> decoder.LlamaDecoder | None:
        """vistune's Llama forward (vistune.serve.decoder), rebuilt whenever the LLM's weights
        changed (training: its fused copies are stale); None when the LLM is not (or no
        longer, e.g. LoRA-wrapped) a plain Llama (vistune.model.llama.supports)."""
        key = tuple((p.data_ptr(), p._version) for p in self.llm.parameters())
        if key != self._decoder_key:
            ok = llama.supports(self.llm)
            self._decoder = decoder.LlamaDecoder(self.llm, quantize=self.quantize) if ok else None
            self._decoder_key = key
        return self._decoder

    def new_token_limit(self, attention_mask: torch.Tensor, config: GenerationConfig) -> int:
        """max_new_tokens, capped so that no row's prompt + answer runs past the context."""
        if self.context is None or attention_mask.numel() == 0:
            return config.max_new_tokens
        longest = int(attention_mask.sum(-1).max())  # the longest prompt, without padding
        if longest >= self.context:
            raise ValueError(
                f"the prompt is {longest} tokens; the LLM's context of {self.context} leaves "
                "no room for an answer"
            )
        return min(config.max_new_tokens, self.context - longest)

    def split_stops(self, stops: Sequence[str]) -> tuple[tuple[str, ...], set[int]]:
        """Stops that are added/special tokens (e.g. "<|im_end|>") match by id, since
        special tokens are skipped when decoding; the rest match on the text."""
        added = getattr(self.tokenizer, "get_added_vocab", dict)()
        text_stops = tuple(s for s in stops if s and s not in added)
        return text_stops, {added[s] for s in stops if s in added}

    @torch.inference_mode()
    def _forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: object | None,
    ) -> torch.Tensor:
        """Last-position logits as float32. # (B, V)"""
        amp = (
            torch.autocast(embeds.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with amp:
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{self._cache_kw: cache},
                **self._keep_kw,
            )
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(tokens[:, None])  # (B, 1, D)

    def steps(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        stop: Sequence[str] = (),
        use_cache: bool = True,
    ) -> Iterator[tuple[list[str], list[Completion | None]]]:
        """Run the loop; after each step yield (new text per row, Completion per finished row).

        A row's Completion appears once, on the step it finishes; finished rows leave the
        batch (and the KV cache) and yield "" afterwards. A row also ends (`length`) where
        prompt + answer fill the LLM's context; a prompt that fills it is a ValueError.
        """
        from transformers import DynamicCache

        if inputs_embeds.dim() != 3 or attention_mask.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"need inputs_embeds (B, L, D) and attention_mask (B, L), got "
                f"{tuple(inputs_embeds.shape)} and {tuple(attention_mask.shape)}"
            )
        batch = inputs_embeds.shape[0]
        limit = self.new_token_limit(attention_mask, config)
        text_stops, stop_ids = self.split_stops((*stop, *config.stop))
        states = [TextState(self.tokenizer, text_stops) for _ in range(batch)]
        rng = seeded_rng(config.seed, inputs_embeds.device)
        dtype = self.llm.get_input_embeddings().weight.dtype
        embeds = inputs_embeds.to(dtype)  # (B, L, D)
        mask = attention_mask.long()  # (B, L)
        positions = positions_from_mask(mask)  # (B, L)
        active = list(range(batch))  # rows still decoding, in batch order
        cache, kv = None, None
        fast = self.fast_decoder() if use_cache and self.fast else None
        if fast is not None:  # Llama family: vistune.serve.decoder end to end
            kv = fast.allocate(mask, limit)
            logits = fast.forward(kv, embeds, positions, mask)  # (A, V)
        else:
            cache = DynamicCache(config=self.llm.config) if use_cache else None
            logits = self._forward(embeds, mask, positions, cache)  # (A, V)
        while True:
            tokens = pick(logits, config, rng)  # (A,)
            deltas, done, keep = self._advance(states, active, tokens, stop_ids, limit)
            yield deltas, done
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=tokens.device)
                active = [active[i] for i in keep]
                tokens, mask, positions = tokens[index], mask[index], positions[index]
                if kv is not None:
                    kv = fast.select(kv, index)
                elif cache is not None:
                    cache.batch_select_indices(index)
                else:
                    embeds = embeds[index]
            new_pos = positions[:, -1:] + 1  # (A, 1)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            positions = torch.cat([positions, new_pos], dim=1)
            if kv is not None:
                logits = fast.step(kv, tokens, new_pos[:, 0])
            elif cache is not None:
                logits = self._forward(self._embed(tokens), mask, new_pos, cache)
            else:
                embeds = torch.cat([embeds, self._embed(tokens)], dim=1)
                logits = self._forward(embeds, mask, positions, None)

    def _advance(
        self,
        states: list[TextState],
        active: list[int],
        tokens: torch.Tensor,
        stop_ids: set[int],
        limit: int,
    ) -> tuple[list[str], list[Completion | None], list[int]]:
        """Give each active row its token: (new text per row, finished rows, slots to keep);
        a row ends as `length` at `limit` tokens."""
        deltas = [""] * len(states)
        done: list[Completion | None] = [None] * len(states)
        keep: list[int] = []
        for slot, row in enumerate(active):
            deltas[row], done[row] = advance(
                states[row], int(tokens[slot]), self.eos, stop_ids, limit
            )
            if done[row] is None:
                keep.append(slot)
        return deltas, done, keep

    def run(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        stop: Sequence[str] = (),
        use_cache: bool = True,
    ) -> list[Completion]:
        """Generate for every row; Completions in batch order."""
        results: list[Completion | None] = [None] * inputs_embeds.shape[0]
        for _, done in self.steps(inputs_embeds, attention_mask, config, stop, use_cache):
            for row, completion in enumerate(done):
                if completion is not None:
                    results[row] = completion
        return [r for r in results if r is not None]

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        stop: Sequence[str] = (),
    ) -> list[str]:
        """Answer text per row (B, L, D) left-padded -> B strings."""
        return [c.text for c in self.run(inputs_embeds, attention_mask, config, stop)]

    def stream(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        config: GenerationConfig,
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Text pieces of one row (1, L, D) as they become stable; they join to `generate`'s."""
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"stream takes one row, got a batch of {inputs_embeds.shape[0]}")
        for deltas, _ in self.steps(inputs_embeds, attention_mask, config, stop):
            if deltas[0]:
                yield deltas[0]

"""Continuous batching: concurrent requests share decode steps (Orca, Yu et al., OSDI 2022).

One thread owns the model. Between two decode steps it admits waiting requests (each one's
prompt is prefilled on its own, reusing the cached keys and values of its longest known
prefix, vistune.serve.prefix_cache), joins them to the running batch
(vistune.serve.decoder.LlamaDecoder.join), and drops rows that finished or whose client
went away; then one step feeds every running row its last token. So a request joins and
leaves the batch between steps, and a cancelled one frees its row within one step.

The waiting line is bounded: `submit` raises QueueFull when `max_waiting` requests wait
beyond the batch's free places, and the HTTP
layer answers 429 with Retry-After. Each request gets its own sampling settings and random
generator, so rows never share randomness.

LLMs the fast decoder does not reproduce (vistune.model.llama.supports) are answered one
request at a time through transformers' forward (vistune.serve.generate.Generator.steps):
no batching and no prefix reuse there.

Results go back through each Job's `emit` callback (called on this thread): `Delta` text
pieces (the first one when the first token is sampled, even if it shows no text yet, so a
client's first chunk marks the first token), then one `Done` or `Failed`. A finished
answer's keys and values are in the prefix cache before its `Done` is emitted, so a
follow-up sent as soon as the client hears of it finds them.

The cache is used on this thread; `clear_cache` (benchmarks, tests) takes the same lock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vistune.config import GenerationConfig
from vistune.serve.decoder import DecodeState, LlamaDecoder
from vistune.serve.generate import Completion, Generator, TextState, advance, pick, seeded_rng
from vistune.serve.prefix_cache import PrefixCache


class QueueFull(Exception):
    """More requests are waiting than the scheduler takes; try again after `retry_after` s."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are waiting already; try again later")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The request was cancelled (its client went away, or the server is stopping)."""


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    completion: Completion
    prompt_tokens: int
    """LLM positions of the prompt, the image's tokens included."""
    completion_tokens: int
    """Tokens sampled, the one that ended the answer (EOS or stop) included."""
    cached_tokens: int
    """Prompt positions whose keys and values came from the prefix cache."""


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | Done | Failed


@dataclass(eq=False)
class Job:
    """One request as the scheduler runs it. The engine fills the first block."""

    key: np.ndarray  # (L,) prefix-cache key of the prompt's positions
    embed: Callable[[int], torch.Tensor]  # start position -> (1, L - start, D) inputs
    config: GenerationConfig
    limit: int  # most new tokens (max_new_tokens, capped by the context)
    stops: tuple[str, ...]  # the template's stop strings and the request's
    tokenizer: object
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # the scheduler's state of the row
    text: TextState | None = None
    stop_ids: set[int] = field(default_factory=set)
    rng: torch.Generator | None = None
    next_token: int = -1
    position: int = 0  # the LLM position the next fed token takes
    fed: list[int] = field(default_factory=list)
    sampled: int = 0
    cached: int = 0

    @property
    def length(self) -> int:
        return len(self.key)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (at the latest after the next step)."""
        self.cancelled.set()


class Scheduler:
    """The model's thread: admits, prefills, batches and steps requests (module docstring)."""

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 8,
        max_waiting: int = 64,
        cache_bytes: int = 256 << 20,
        retry_after: int = 1,
    ) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(
                f"need max_batch >= 1 and max_waiting >= 0, got {max_batch}, {max_waiting}"
            )
        self.generator = generator
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.cache = PrefixCache(cache_bytes)
        self._cache_lock = threading.Lock()
        self.stats = collections.Counter()
        """steps, rows_stepped, peak_batch, admitted, cancelled, failed, cached_tokens,
        prompt_tokens."""
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._admitting = 0
        self._batch: DecodeState | None = None
        self._decoder: LlamaDecoder | None = None  # the batch's, looked up at admissions
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ caller side
    def submit(self, job: Job) -> Job:
        """Queue `job`; QueueFull when `max_waiting` are waiting already."""
        with self._cond:
            if self._stopping:
                raise Cancelled("the server is stopping")
            free = self.max_batch - len(self._active)  # places the next admission fills
            if len(self._waiting) >= self.max_waiting + max(free, 0):
                raise QueueFull(len(self._waiting), self.retry_after)
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="vistune-scheduler", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is waiting or running and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def clear_cache(self) -> None:
        """Forget every cached prefix (safe from any thread)."""
        with self._cache_lock:
            self.cache.clear()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; those being admitted count as running."""
        return len(self._active) + self._admitting, len(self._waiting)

    # ------------------------------------------------------------------ the model's thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        break
                    room = self.max_batch - len(self._active)
                    joining = [
                        self._waiting.popleft() for _ in range(min(room, len(self._waiting)))
                    ]
                    self._admitting = len(joining)
                self._admit(joining)
                self._admitting = 0
                if self._active:
                    self._step()
        with self._cond:
            left = [*self._active, *self._waiting]
            self._active, self._batch = [], None
            self._waiting.clear()
        for job in left:
            job.emit(Failed(Cancelled("the server is stopping")))

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill each job alone, give it its first token, and join the running ones.

        The decoder is looked up here, not every step: Generator.fast_decoder walks every
        parameter to see whether the weights changed (about 1-2 ms, a step's 5%)."""
        if not jobs:
            return
        decoder = self.generator.fast_decoder()
        if decoder is not None:
            self._decoder = decoder
        states = []
        for job in jobs:
            if job.cancelled.is_set():
                job.emit(Failed(Cancelled("cancelled before it started")))
                continue
            try:
                text_stops, job.stop_ids = self.generator.split_stops(job.stops)
                job.text = TextState(job.tokenizer, text_stops)
                job.rng = seeded_rng(job.config.seed, torch.device("cpu"))
                if decoder is None:
                    self._run_alone(job)
                    continue
                state = self._prefill(decoder, job)
            except Exception as err:  # a model error ends this request, not the server
                job.emit(Failed(err))
                continue
            if state is not None:
                states.append(state)
                self._active.append(job)
                self.stats["admitted"] += 1
        if not states:
            return
        extra = max(job.limit - job.sampled for job in self._active) + 1
        parts = states if self._batch is None else [self._batch, *states]
        self._batch = LlamaDecoder.join(parts, extra)
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._active))

    def _prefill(self, decoder: LlamaDecoder, job: Job) -> DecodeState | None:
        """The prompt's keys and values (the cached prefix reused), then the first token;
        the row's state, or None when the answer ended at its first token."""
        with self._cache_lock:
            hit = self.cache.lookup(job.key, job.length - 1)  # the last position gives logits
        if hit.length:
            state = decoder.prefilled(hit.keys, hit.values, job.length)
        else:
            state = decoder.allocate(torch.ones(1, 0, dtype=torch.bool), job.length)
        embeds = job.embed(hit.length)  # (1, L - P, D)
        positions = torch.arange(hit.length, job.length)[None]  # (1, L - P)
        logits = decoder.forward(state, embeds, positions)  # (1, V)
        job.cached, job.position = hit.length, job.length
        self.stats["cached_tokens"] += hit.length
        self.stats["prompt_tokens"] += job.length
        done = self._give(job, pick(logits, job.config, job.rng))
        self._store(job.key, decoder, state, 0)  # after the first token went out, before Done
        if done is None:
            return state
        job.emit(done)
        return None

    def _store(self, key: np.ndarray, decoder: LlamaDecoder, state: DecodeState, row: int) -> None:
        keys, values = decoder.row_cache(state, row)  # copied outside the lock
        with self._cache_lock:
            self.cache.store(key, keys, values)

    def _give(self, job: Job, token: torch.Tensor | int) -> Done | None:
        """Hand the job its sampled token (its text goes out now); its Done, for the caller
        to emit, when its answer ended."""
        token = int(token)
        job.sampled += 1
        delta, done = advance(job.text, token, self.generator.eos, job.stop_ids, job.limit)
        if delta or job.sampled == 1:  # the first token is news even before it shows
            job.emit(Delta(delta))
        if done is not None:
            return Done(done, job.length, job.sampled, job.cached)
        job.next_token = token
        return None

    def _step(self) -> None:
        """Drop cancelled rows, feed every running row its token, hand out the next ones."""
        self._keep([not job.cancelled.is_set() for job in self._active], Cancelled("cancelled"))
        if not self._active:
            return
        decoder = self._decoder
        tokens = torch.tensor([job.next_token for job in self._active])  # (A,)
        positions = torch.tensor([job.position for job in self._active])  # (A,)
        try:
            logits = decoder.step(self._batch, tokens, positions)  # (A, V)
        except Exception as err:  # a model error fails this batch; the server goes on
            self._keep([False] * len(self._active), err)
            return
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(self._active)
        running = []
        for row, job in enumerate(self._active):
            job.fed.append(job.next_token)
            job.position += 1
            done = self._give(job, pick(logits[row : row + 1], job.config, job.rng))
            if done is not None:
                key = np.concatenate([job.key, np.asarray(job.fed, dtype=np.int64)])
                self._store(key, decoder, self._batch, row)
                job.emit(done)  # its row leaves below, before the next step
            running.append(done is None)
        self._keep(running, None)

    def _keep(self, keep: list[bool], error: BaseException | None) -> None:
        """Keep the rows marked True; the others leave the batch, then are told `error`
        (if given): their place is free by the time their client hears of it."""
        if all(keep):
            return
        left = [job for job, kept in zip(self._active, keep, strict=True) if not kept]
        index = [i for i, kept in enumerate(keep) if kept]
        self._active = [self._active[i] for i in index]
        if not index:
            self._batch = None
        else:
            self._batch = LlamaDecoder.select(self._batch, torch.tensor(index))
        if error is not None:
            for job in left:
                self.stats["cancelled" if isinstance(error, Cancelled) else "failed"] += 1
                job.emit(Failed(error))

    def _run_alone(self, job: Job) -> None:
        """A whole answer through transformers' forward (LLMs the fast decoder does not take)."""
        config = job.config
        embeds = job.embed(0)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        sampled = 0
        for deltas, done in self.generator.steps(embeds, mask, config, job.stops):
            sampled += 1
            if deltas[0]:
                job.emit(Delta(deltas[0]))
            if done[0] is not None:
                job.emit(Done(done[0], job.length, sampled, 0))
                return
            if job.cancelled.is_set():
                job.emit(Failed(Cancelled("cancelled")))
                return

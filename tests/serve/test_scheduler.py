"""Continuous batching and prefix reuse: rows join and leave between steps, answers are the
ones each request gets alone, a follow-up reuses its conversation's keys and values."""

from __future__ import annotations

import copy
import queue
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.config import GenerationConfig
from vistune.serve.decoder import DecodeState, LlamaDecoder
from vistune.serve.engine import Engine
from vistune.serve.prefix_cache import PrefixCache, common_prefix, position_key
from vistune.serve.scheduler import Cancelled, Delta, Done, Failed, QueueFull

CFG = GenerationConfig(max_new_tokens=10)


def photo(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def engine(tiny_model):
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, max_batch=4, max_waiting=8)
    yield eng
    eng.close()


class Collect:
    """A job's events, kept; `done` set at Done or Failed."""

    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Done | Failed):
            self.done.set()

    @property
    def result(self):
        return self.events[-1]


def requests() -> list[tuple[list[dict], Image.Image | None]]:
    return [
        (ask("What is in the image?"), photo(0)),
        (ask("Say a number."), None),
        (ask("Describe the image concisely."), photo(1)),
        (ask("What color is the square?"), None),
        (ask("How many objects are there?"), photo(2)),
        (ask("Where is the triangle?"), photo(0)),
    ]


def test_concurrent_requests_share_steps_and_answer_as_alone(engine, tiny_model):
    alone = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, cache_bytes=0)
    expected = [alone.answer(m, img, CFG) for m, img in requests()]
    alone.close()
    collected = [Collect() for _ in requests()]
    for (m, img), c in zip(requests(), collected, strict=True):
        engine.submit(m, img, CFG, c)
    for c in collected:
        assert c.done.wait(60)
    got = ["".join(e.text for e in c.events if isinstance(e, Delta)).strip() for c in collected]
    assert got == expected
    assert all(isinstance(c.result, Done) for c in collected)
    stats = engine.scheduler.stats
    assert stats["peak_batch"] >= 2  # rows really shared steps
    assert stats["rows_stepped"] > stats["steps"]


def test_follow_up_reuses_the_conversation_prefix(engine, tiny_model):
    image = photo(3)
    first = ask("What is in the image?")
    c1 = Collect()
    engine.submit(first, image, CFG, c1)
    assert c1.done.wait(30)
    answer = c1.result.completion.text.strip()
    follow = [*first, {"role": "assistant", "content": answer}, *ask("And the colour?")]
    c2 = Collect()
    engine.submit(follow, image, CFG, c2)
    assert c2.done.wait(30)
    done = c2.result
    # the image (4 tokens) and the first turn come from the cache: the tower is not needed
    assert done.cached_tokens > engine.model.num_image_tokens
    assert done.cached_tokens < done.prompt_tokens
    cold = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, cache_bytes=0)
    assert cold.answer(follow, image, CFG) == done.completion.text.strip()
    cold.close()


def test_finished_answer_is_cached_before_its_done(engine):
    """A client that sends its follow-up as soon as it hears Done finds the whole
    conversation cached (the store used to come after Done: a race). The prompt's copy
    into the cache waits until the first token has gone out."""
    submitted, seen = threading.Event(), {}
    c = Collect()

    def emit(event):
        if not c.events:
            seen["cached at the first token"] = len(engine.scheduler.cache)
        if isinstance(event, Done):
            submitted.wait(10)
            job = seen["job"]
            full = np.concatenate([job.key, np.asarray(job.fed, dtype=np.int64)])
            seen["hit"], seen["full"] = engine.scheduler.cache.lookup(full, len(full)).length, full
        c(event)

    seen["job"] = engine.submit(ask("What is in the image?"), photo(6), CFG, emit)
    submitted.set()
    assert c.done.wait(30)
    done = c.result
    assert isinstance(done, Done)
    assert len(seen["full"]) == done.prompt_tokens + done.completion_tokens - 1  # last not fed
    assert seen["hit"] == len(seen["full"])
    assert seen["cached at the first token"] == 0
    engine.scheduler.clear_cache()
    assert len(engine.scheduler.cache) == 0


def test_follow_up_prefills_only_its_new_positions(engine, monkeypatch):
    """The image and the first turn come from the cache, as far as the follow-up's positions
    agree with the first prompt and the ids it was answered with (a retokenised answer may
    differ from the sampled ids: the tiny model's repeated words do): the tower is not run
    again, and the prefill covers only the positions after the reused ones."""
    image, first = photo(7), ask("What is in the image?")
    c1 = Collect()
    job1 = engine.submit(first, image, CFG, c1)
    assert c1.done.wait(30)
    turn = c1.result
    run, towers = [], []  # positions per LLM forward; tower calls
    forward = LlamaDecoder.forward

    def counting(self, state, embeds, positions, new_mask=None):
        run.append(embeds.shape[1])
        return forward(self, state, embeds, positions, new_mask)

    image_features = engine.model.image_features
    monkeypatch.setattr(LlamaDecoder, "forward", counting)
    monkeypatch.setattr(
        engine.model, "image_features", lambda *a: towers.append(1) or image_features(*a)
    )
    follow = [*first, {"role": "assistant", "content": turn.completion.text}, *ask("Why?")]
    c2 = Collect()
    job2 = engine.submit(follow, image, CFG, c2)
    assert c2.done.wait(30)
    done = c2.result
    assert towers == []
    assert done.cached_tokens >= turn.prompt_tokens  # the image and the first question
    held = np.concatenate([job1.key, np.asarray(job1.fed, dtype=np.int64)])
    assert done.cached_tokens == min(common_prefix(job2.key, held), len(job2.key) - 1)
    # one prefill of the positions after the cached ones, then one step per fed token
    assert run == [done.prompt_tokens - done.cached_tokens] + [1] * (done.completion_tokens - 1)


def test_the_weights_are_checked_per_admission_not_per_step(engine, monkeypatch):
    """Generator.fast_decoder walks every parameter; a running batch keeps its decoder."""
    calls = []
    lookup = engine.generator.fast_decoder
    monkeypatch.setattr(engine.generator, "fast_decoder", lambda: calls.append(1) or lookup())
    c = Collect()
    engine.submit(ask("Say a number."), None, CFG, c)
    assert c.done.wait(30)
    assert c.result.completion_tokens == CFG.max_new_tokens  # nine steps after the prefill
    assert len(calls) == 1


def test_a_different_image_is_never_reused(engine):
    c1, c2 = Collect(), Collect()
    engine.submit(ask("What is in the image?"), photo(4), CFG, c1)
    assert c1.done.wait(30)
    engine.submit(ask("What is in the image?"), photo(5), CFG, c2)
    assert c2.done.wait(30)
    assert c2.result.cached_tokens < c2.result.prompt_tokens - engine.model.num_image_tokens - 4


def test_cancelled_job_leaves_within_a_step(engine):
    long = GenerationConfig(max_new_tokens=200, stop=())
    seen = queue.Queue()
    c = Collect()

    def emit(event):
        c(event)
        seen.put(event)

    job = engine.submit(ask("the cat sat on the mat"), None, long, emit)
    seen.get(timeout=30)  # running
    steps = engine.scheduler.stats["steps"]
    job.cancel()
    assert c.done.wait(30)
    assert isinstance(c.result, Failed) and isinstance(c.result.error, Cancelled)
    assert engine.scheduler.stats["steps"] - steps <= 2
    assert engine.scheduler.load == (0, 0)


def test_queue_is_bounded(tiny_model):
    """One place in the batch and one in the line: a third request is refused."""
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, max_batch=1, max_waiting=1)
    gate = [Collect() for _ in range(3)]
    with eng.scheduler._cond:  # the thread cannot take any while we hold its lock
        eng.submit(ask("one"), None, CFG, gate[0])
        eng.submit(ask("two"), None, CFG, gate[1])
        with pytest.raises(QueueFull) as err:
            eng.submit(ask("three"), None, CFG, gate[2])
        assert err.value.retry_after >= 1
    assert gate[0].done.wait(30) and gate[1].done.wait(30)
    eng.close()


def test_model_error_fails_the_batch_and_the_next_request_works(engine, monkeypatch):
    decoder = engine.generator.fast_decoder()
    original = decoder.step

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(decoder, "step", broken)
    c = Collect()
    engine.submit(ask("the cat sat on"), None, GenerationConfig(max_new_tokens=20), c)
    assert c.done.wait(30)
    assert isinstance(c.result, Failed) and "simulated" in str(c.result.error)
    monkeypatch.setattr(decoder, "step", original)
    assert engine.answer(ask("the cat sat on"), None, CFG)


def test_join_right_aligns_rows_and_keeps_their_cache():
    def state(length: int, fill: float):
        keys = [torch.full((1, 2, length + 3, 4), fill) for _ in range(2)]
        mask = torch.zeros(1, length + 3, dtype=torch.bool)
        mask[0, :length] = True
        return DecodeState(keys, [k.clone() for k in keys], mask, length)

    joined = LlamaDecoder.join([state(2, 1.0), state(5, 2.0)], extra=4)
    assert joined.length == 5 and joined.mask.shape == (2, 9)
    assert joined.mask[0].tolist()[:5] == [False, False, False, True, True]
    keys, _ = LlamaDecoder.row_cache(joined, 0)
    assert keys.shape == (2, 2, 2, 4) and bool((keys == 1.0).all())
    keys, _ = LlamaDecoder.row_cache(joined, 1)
    assert keys.shape == (2, 2, 5, 4) and bool((keys == 2.0).all())


def test_prefix_cache_longest_common_prefix_and_budget():
    def kv(n: int):
        return torch.randn(2, 1, n, 4), torch.randn(2, 1, n, 4)

    cache = PrefixCache(max_bytes=2 * 2 * 2 * 1 * 10 * 4 * 4)  # room for 20 positions
    a = np.arange(8)
    cache.store(a, *kv(8))
    hit = cache.lookup(np.array([0, 1, 2, 9, 9]), limit=10)
    assert hit.length == 3 and hit.keys.shape[2] == 3
    assert cache.lookup(np.arange(20), limit=5).length == 5
    cache.store(np.arange(12), *kv(12))  # extends a: replaces it
    assert len(cache) == 1
    cache.store(np.arange(100, 110), *kv(10))  # over the budget: the oldest goes
    assert len(cache) == 1 and cache.lookup(np.arange(5), 10).length == 0
    assert common_prefix(np.arange(3), np.arange(5)) == 3


def test_position_key_widens_the_image():
    key = position_key([5, -200, 7], image_digest=-42, image_tokens=3)
    assert key.tolist() == [5, -42, -42, -42, 7]

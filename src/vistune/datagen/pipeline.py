"""Instruction-data generation that never loses work (paper §3).

For every image context and response type (conversation, detail, complex) the pipeline
builds the teacher prompt from the packaged prompt files (system prompt + seed examples +
the image's captions and boxes), looks the request up in the SQLite store and sends only
what has no stored answer, `workers` at a time. Answers are parsed and validated; done and
rejected answers are committed as they arrive, so a rerun or a resume after `kill -9`
sends no answered request again. `brief` samples are the naive expansion (no teacher).

At the end (also after an endpoint went down or an interrupt) the output LLaVA JSON is
written atomically with every finished sample of the requested images, in input order,
beside it `<stem>.rejected.jsonl` (raw text of rejected answers) and `<stem>.summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistune.chat_client import EndpointDownError
from vistune.config import AT_LEAST_1
from vistune.data.annotations import ImageContext
from vistune.data.formats import RESPONSE_TYPES, write_llava_json
from vistune.datagen.context import screen_contexts
from vistune.datagen.messages import build_requests
from vistune.datagen.parse import RejectedOutput, parse_response
from vistune.datagen.store import Key, Record, Store, prompt_hash
from vistune.datagen.teachers import Request, Teacher
from vistune.errors import DataError, EndpointError
from vistune.files import write_json, write_jsonl

ALL_TYPES = ("brief", *RESPONSE_TYPES)


@dataclass(frozen=True)
class DatagenConfig:
    types: tuple[str, ...] = ALL_TYPES
    """Which sample types to make, comma-separated: brief, conversation, detail, complex (`brief` needs no teacher)."""
    workers: int = 4
    """Teacher requests in flight at once (1 for an in-process model)."""
    seed: int = 0
    """Picks the brief/detail question per image; same seed, same prompts, same cache keys."""
    limit: int | None = None
    """Use only the first N usable images."""
    check_images: bool = True
    """Skip contexts whose image file is missing or unreadable under the image root."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.types if t not in ALL_TYPES]
        if unknown or not self.types:
            raise ValueError(f"unknown types {unknown}; valid: {', '.join(ALL_TYPES)}")
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"types repeat: {', '.join(self.types)}")
        AT_LEAST_1.check("workers", self.workers)
        if self.limit is not None:
            AT_LEAST_1.check("limit", self.limit)


@dataclass
class Summary:
    teacher: str
    out: str
    per_type: dict[str, Counter] = field(default_factory=dict)
    """type -> counts of done (new), cached, failed, rejected, and `rejected: <reason>`."""
    skipped: Counter = field(default_factory=Counter)
    """input reason -> images skipped."""
    written: int = 0
    remaining: int = 0
    """Teacher requests without an answer (failed or never sent): a rerun sends them."""
    aborted: str | None = None
    """Why the run stopped early (endpoint down), or None."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "out": self.out,
            "per_type": {t: dict(c) for t, c in self.per_type.items()},
            "skipped": dict(self.skipped),
            "written": self.written,
            "remaining": self.remaining,
            "aborted": self.aborted,
        }


# ---------------------------------------------------------------------------- prompts


# ---------------------------------------------------------------------------- the run

ProgressFn = Callable[[dict[str, int]], None]


class _Run:
    """State of one run: counts, the store, and the samples found or made."""

    def __init__(self, teacher: Teacher, store: Store, out: Path, types: tuple[str, ...]) -> None:
        self.teacher = teacher
        self.store = store
        self.summary = Summary(teacher.name, str(out), {t: Counter() for t in types})
        self.samples: dict[str, dict] = {}
        self.rejected: list[dict] = []
        self.tally = Counter({"total": 0, "done": 0, "cached": 0, "failed": 0, "rejected": 0})

    def key(self, request: Request) -> Key:
        return Key(
            request.context.image_id,
            request.response_type,
            prompt_hash(request.messages),
            self.teacher.name,
        )

    def stored_request(self, request: Request) -> dict[str, Any]:
        """What the store keeps of a request: the messages, the detail question and the
        reply token limit it is sent under (not part of the key; see `cut_shorter`)."""
        stored = {"messages": request.messages, "question": request.question}
        if self.teacher.max_tokens is not None:
            stored["max_tokens"] = self.teacher.max_tokens
        return stored

    def cut_shorter(self, record: Record) -> bool:
        """Whether a stored rejection is a reply cut at a token limit below this run's, so
        worth asking again. A store from before the limit was kept cannot say: its
        truncated replies are asked again once (the new answer keeps its limit)."""
        if record.reason != "truncated" or self.teacher.max_tokens is None:
            return False
        cut_at = record.request.get("max_tokens")
        return not isinstance(cut_at, int) or self.teacher.max_tokens > cut_at

    def count(self, rtype: str, what: str, reason: str | None = None) -> None:
        self.summary.per_type[rtype][what] += 1
        if reason:
            self.summary.per_type[rtype][f"rejected: {reason}"] += 1
        self.tally[what if what in self.tally else "done"] += 1

    def reject(self, request: Request, key: Key, reason: str, raw: str | None) -> None:
        self.rejected.append(
            {
                "id": f"{key.image_id}_{key.type}",
                "image": request.context.image,
                "type": key.type,
                "teacher": key.teacher,
                "prompt_hash": key.prompt_hash,
                "reason": reason,
                "response": raw,
            }
        )

    def rejected_answer(self, request: Request, key: Key, reason: str, raw: str | None) -> None:
        """Commit a fresh answer that failed validation, keeping its text."""
        self.store.finish(key, "rejected", response=raw, reason=reason)
        self.count(key.type, "rejected", reason)
        self.reject(request, key, reason, raw)

    def settle(self, request: Request, key: Key, raw: str) -> None:
        """Parse a fresh answer and commit it as done or rejected."""
        try:
            turns = parse_response(request.response_type, raw, request.question)
        except RejectedOutput as err:
            self.rejected_answer(request, key, err.reason, raw)
            return
        sample = {"id": f"{key.image_id}_{key.type}", "image": request.context.image,
                  "conversations": turns}  # fmt: skip
        self.store.finish(key, "done", response=raw, sample=sample)
        self.samples[sample["id"]] = sample
        self.count(key.type, "done")


def run_datagen(
    contexts: list[ImageContext],
    teacher: Teacher,
    store: Store,
    out: str | Path,
    config: DatagenConfig = DatagenConfig(),
    image_root: str | Path | None = None,
    skipped: Counter | None = None,
    progress: ProgressFn | None = None,
) -> Summary:
    """Make the samples of `config.types` for `contexts`; returns the run's summary.

    `image_root` is where image paths are looked up (None: not checked). `skipped` holds
    skip reasons already counted while loading. An endpoint that stays down stops the run
    (no new requests; those in flight finish) and sets `summary.aborted`; the output is
    written with every finished sample either way.
    """
    out = Path(out)
    root = Path(image_root) if image_root is not None and config.check_images else None
    run = _Run(teacher, store, out, config.types)
    run.summary.skipped.update(skipped or Counter())
    contexts = screen_contexts(contexts, root, run.summary.skipped)
    if config.limit is not None:
        contexts = contexts[: config.limit]
    run_id = store.start_run(
        {**dataclasses.asdict(config), "teacher": teacher.name, "out": str(out)}
    )
    try:
        if "brief" in config.types:
            _add_brief(run, contexts, config.seed)
        pending = _lookup(run, build_requests(contexts, config.types, config.seed))
        if progress:
            progress(dict(run.tally))
        _send(run, pending, config.workers if teacher.concurrent else 1, progress)
    except DataError as err:  # the store failed mid-run (locked, read-only, disk full)
        run.summary.aborted = str(err)
        _finish(run, run_id, contexts, config.types, out, after_error=True)
        raise DataError(
            f"{err}. Wrote {run.summary.written} finished samples to {out}; what was "
            "answered before is kept in the store: rerun the same command to resume"
        ) from None
    except BaseException:
        _finish(run, run_id, contexts, config.types, out, after_error=True)
        raise
    _finish(run, run_id, contexts, config.types, out)
    return run.summary


def _finish(
    run: _Run,
    run_id: int,
    contexts: list[ImageContext],
    types: tuple[str, ...],
    out: Path,
    after_error: bool = False,
) -> None:
    """Write the outputs and close the run's record in the store. After an error, a store
    that fails again is not reported over that error (it may be what failed)."""
    _write_outputs(run, contexts, types, out)
    with contextlib.suppress(DataError) if after_error else contextlib.nullcontext():
        run.store.finish_run(run_id, run.summary.to_dict())


def _add_brief(run: _Run, contexts: list[ImageContext], seed: int) -> None:
    from vistune.datagen.naive import brief_samples

    for sample in brief_samples(contexts, seed=seed):
        sample = {**sample, "id": f"{sample['id']}_brief"}  # naive ids are the image id
        run.samples[sample["id"]] = sample
        run.summary.per_type["brief"]["done"] += 1


def _lookup(run: _Run, requests: list[Request]) -> list[tuple[Request, Key]]:
    """Requests with no stored answer; stored answers count as cached (done or rejected),
    except replies cut at a smaller token limit than this run's (asked again)."""
    pending = []
    for request in requests:
        key = run.key(request)
        record = run.store.get(key)
        run.tally["total"] += 1
        if record is not None and record.status == "done" and record.sample is not None:
            # the teacher never saw the image path: the images may have moved since
            sample = {**record.sample, "image": request.context.image}
            run.samples[sample["id"]] = sample
            run.count(key.type, "cached")
        elif record is not None and record.status == "rejected" and not run.cut_shorter(record):
            run.summary.per_type[key.type]["cached rejected"] += 1
            run.summary.per_type[key.type][f"rejected: {record.reason}"] += 1
            run.tally["rejected"] += 1
            run.reject(request, key, record.reason or "?", record.response)
        else:
            pending.append((request, key))
    return pending


def _send(
    run: _Run, pending: list[tuple[Request, Key]], workers: int, progress: ProgressFn | None
) -> None:
    """Send requests `workers` at a time; the store is written from this thread only."""
    queue = list(reversed(pending))
    inflight: dict[Future, tuple[Request, Key]] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher") as pool:
        try:
            while queue or inflight:
                while queue and len(inflight) < workers and run.summary.aborted is None:
                    request, key = queue.pop()
                    run.store.begin(key, run.stored_request(request))
                    inflight[pool.submit(run.teacher.respond, request)] = (request, key)
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in finished:
                    request, key = inflight[future]
                    _settle_future(run, future, request, key)
                    del inflight[future]  # after settling: an interrupt leaves it pending
                    if progress:
                        progress(dict(run.tally))
        finally:
            for future in inflight:
                future.cancel()
            # also when stopped (Ctrl-C): requests in flight are pending again, not done
            failed = sum(c["failed"] for c in run.summary.per_type.values())
            run.summary.remaining = failed + len(queue) + len(inflight)


def _settle_future(run: _Run, future: Future, request: Request, key: Key) -> None:
    try:
        raw = future.result()
    except RejectedOutput as err:  # the teacher itself refused its answer (truncated)
        run.rejected_answer(request, key, err.reason, err.raw)
        return
    except EndpointError as err:
        run.store.finish(key, "failed", reason=str(err))
        run.count(key.type, "failed")
        if isinstance(err, EndpointDownError) and run.summary.aborted is None:
            run.summary.aborted = str(err)
        return
    run.settle(request, key, raw)


def _write_outputs(
    run: _Run, contexts: list[ImageContext], types: tuple[str, ...], out: Path
) -> None:
    """The three output files; a file that cannot be written is one DataError (what the
    teacher answered is in the store, so a rerun with the outputs' way clear writes them)."""
    try:
        _write_files(run, contexts, types, out)
    except OSError as err:
        where = err.filename2 or err.filename or out  # os.replace names the temp first
        raise DataError(
            f"{where}: cannot write the outputs ({err.strerror or err}); the answers are kept "
            "in the store: rerun the same command once it can be written"
        ) from None


def _write_files(
    run: _Run, contexts: list[ImageContext], types: tuple[str, ...], out: Path
) -> None:
    ordered = [
        run.samples[f"{c.image_id}_{t}"]
        for c in contexts
        for t in types
        if f"{c.image_id}_{t}" in run.samples
    ]
    write_llava_json(ordered, out)
    run.summary.written = len(ordered)
    order = {
        f"{c.image_id}_{t}": i for i, (c, t) in enumerate((c, t) for c in contexts for t in types)
    }
    rejected = sorted(run.rejected, key=lambda r: order.get(r["id"], len(order)))
    write_jsonl(out.with_name(out.stem + ".rejected.jsonl"), rejected)
    write_json(out.with_name(out.stem + ".summary.json"), run.summary.to_dict(), sort_keys=True)

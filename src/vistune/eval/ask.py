"""Ask, parse, ask again: the one request loop of every evaluation that queries a model.

The LLaVA-Bench judge (two scores, paper §5.1), the ScienceQA ensemble's judge (a letter,
§5.2) and the benchmark builder's teacher (a question and its answer) each send a request,
parse the reply and, when the request fails or the reply cannot be parsed, send it again
up to `retries` more times; what still fails is recorded by the caller, never invented.
Every try is handed to `on_try` as it ends (the run's journal keeps it). An endpoint still
down on the last try (`EndpointDownError`, after the client's own retries) is raised: it
would fail every other request too, so the run stops rather than fail them one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vistune.chat_client import EndpointDownError
from vistune.errors import VistuneError

T = TypeVar("T")


class Unusable(Exception):
    """A reply that does not parse; the message says why (it is kept in the journal)."""


@dataclass(frozen=True)
class Try(Generic[T]):
    """One request and what came of it."""

    attempt: int
    """0 for the first request."""
    content: str | None
    """The reply; None when the request itself failed."""
    value: T | None
    """The parsed reply; None when the request failed or the reply is unusable."""
    error: Exception | None
    """Why this try failed: the request's error or `Unusable`; None on success."""


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """The result of all tries: `value` None means every try failed."""

    value: T | None
    content: str | None
    """The last reply received (None if no request was answered)."""
    attempts: int
    error: Exception | None
    """The last try's failure when `value` is None."""


def ask(
    send: Callable[[], str],
    parse: Callable[[str], T],
    retries: int,
    on_try: Callable[[Try[T]], None] | None = None,
    failures: tuple[type[Exception], ...] = (VistuneError,),
) -> Outcome[T]:
    """Call `send` until `parse` accepts its reply, at most `retries + 1` times.

    `parse` raises `Unusable` for a reply to ask again; `send` raising one of `failures`
    is a failed try (anything else propagates: a bug, or a model folder that cannot load).
    """
    content: str | None = None
    error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            reply = send()
        except failures as err:
            tried: Try[T] = Try(attempt, None, None, err)
        else:
            content = reply
            try:
                tried = Try(attempt, reply, parse(reply), None)
            except Unusable as err:
                tried = Try(attempt, reply, None, err)
        if on_try is not None:
            on_try(tried)
        if tried.error is None:
            return Outcome(tried.value, content, attempt + 1, None)
        error = tried.error
        if isinstance(error, EndpointDownError) and attempt == retries:
            raise error
    return Outcome(None, content, retries + 1, error)

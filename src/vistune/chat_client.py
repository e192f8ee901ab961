"""A small client for OpenAI-compatible chat-completions endpoints.

The paper's data generation (§3) and its evaluation judge (§5.1, LLaVA-Bench) both query a
text-only GPT-4. This client reaches any server that speaks the same protocol (OpenAI,
vLLM, llama.cpp's server, ...): it POSTs `{base_url}/chat/completions` and returns the
first choice's text. Transient faults are retried by tenacity with exponential backoff and
jitter: HTTP 5xx, 408/409/425/429 (honouring `Retry-After`), connection errors, timeouts,
malformed JSON, empty content and content cut off by the token limit. After the last try
it raises `EndpointError`: `EndpointDownError` when the endpoint itself failed (HTTP
errors, no connection, timeouts) and `BadResponseError` when it answered with something
unusable. (The official `openai` client retries only HTTP faults, with a fixed backoff, and
would hand a truncated or empty reply to the parser.)

Every setting is one `ClientConfig` (vistune.config), shared by datagen's teacher and the
evaluation judge, so both commands have the same flags. It is safe to share one client between threads
(httpx's connection pool is thread-safe).
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from vistune.config import ClientConfig
from vistune.errors import EndpointError

# HTTP statuses worth another try, besides every 5xx (a server or proxy fault: 500-504, a
# CDN's 520-524, an overloaded 529); any other 4xx is the caller's fault and fails at once.
RETRY_STATUSES = frozenset({408, 409, 425, 429})


class EndpointDownError(EndpointError):
    """The endpoint failed to answer (HTTP error, no connection, timeout) on every try."""


class BadResponseError(EndpointError):
    """The endpoint answered, but with malformed JSON, empty or truncated content."""


class RequestRefusedError(EndpointError):
    """The endpoint refused this one request (HTTP 400, 413, 422: too long, bad content);
    other requests may still succeed, so a run goes on."""


REQUEST_STATUSES = frozenset({400, 413, 422})
"""Statuses that say what is wrong with one request, not with the endpoint or the key."""


class _Retry(Exception):
    """One failed attempt that may succeed on another try."""

    def __init__(self, message: str, down: bool, wait: float | None = None) -> None:
        super().__init__(message)
        self.down = down
        self.wait = wait


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ChatClient:
    """Chat completions with bounded retries; `complete(messages)` returns the reply text.

    `sleep` waits between tries (tests pass a recorder instead of waiting)."""

    def __init__(
        self,
        config: ClientConfig,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._sleep = sleep
        # half the base delay fixed plus up to half at random: base x (0.5 + 0.5 U)
        half, most = config.backoff / 2, config.max_backoff / 2
        self._backoff = wait_exponential(multiplier=half, max=most) + wait_random_exponential(
            multiplier=half, max=most
        )
        headers = {"Content-Type": "application/json"}
        if self.api_key and not self.api_key.isascii():  # httpx: a UnicodeEncodeError later
            raise EndpointError(
                "the API key (OPENAI_API_KEY) holds a character that is not ASCII: a copy and "
                "paste error?"
            )
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._http = httpx.Client(headers=headers, timeout=config.timeout, limits=limits)

    @property
    def model(self) -> str:
        return self.config.model

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def payload(self, messages: list[dict]) -> dict[str, Any]:
        """The JSON body sent for `messages`."""
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.seed is not None:
            body["seed"] = self.config.seed
        return body

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to `messages`; raises EndpointError after the last try."""
        tries = self.config.http_retries + 1
        retrying = Retrying(
            stop=stop_after_attempt(tries),
            wait=self._wait,
            retry=retry_if_exception_type(_Retry),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            return retrying(self._attempt, self.payload(messages))
        except _Retry as last:
            error = EndpointDownError if last.down else BadResponseError
            raise error(f"{self.url} failed after {tries} tries: {last}") from None

    def _wait(self, state: RetryCallState) -> float:
        err = state.outcome.exception() if state.outcome is not None else None
        return self._delay(state.attempt_number, getattr(err, "wait", None))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter before try `attempt + 1`; a server's
        Retry-After wins when it is longer."""
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        delay = self._backoff(state)
        if retry_after is not None:  # honoured in full up to 10 minutes
            delay = max(delay, min(retry_after, max(self.config.max_backoff, 600.0)))
        return delay

    def _attempt(self, body: dict[str, Any]) -> str:
        try:
            response = self._http.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise _Retry(
                f"no answer within {self.config.timeout:g} s ({type(err).__name__})", True
            ) from err
        except httpx.TransportError as err:
            raise _Retry(f"cannot reach the endpoint ({type(err).__name__}: {err})", True) from err
        status = response.status_code
        if status in RETRY_STATUSES or status >= 500:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            raise _Retry(f"HTTP {status}: {response.text[:200]!r}", True, wait)
        if status in REQUEST_STATUSES:
            raise RequestRefusedError(
                f"{self.url} refused this request, HTTP {status}: {response.text[:300]!r}"
            )
        if status >= 400:
            hint = " (check OPENAI_API_KEY)" if status in (401, 403) else ""
            raise EndpointDownError(
                f"{self.url} answered HTTP {status}{hint}: {response.text[:300]!r}"
            )
        return _content(response.text)


def _content(text: str) -> str:
    """The first choice's message content from a chat-completions response body."""
    try:
        data = json.loads(text)
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise _Retry(f"malformed response ({type(err).__name__}): {text[:200]!r}", False) from err
    if not isinstance(content, str) or not content.strip():
        raise _Retry("empty content in the response", False)
    if choice.get("finish_reason") == "length":
        raise _Retry("content truncated by the token limit (finish_reason 'length')", False)
    return content

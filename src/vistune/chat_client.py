"""A small client for OpenAI-compatible chat-completions endpoints.

The paper's data generation (§3) and its evaluation judge (§5.1, LLaVA-Bench) both query a
text-only GPT-4. This client reaches any server that speaks the same protocol (OpenAI,
vLLM, llama.cpp's server, ...): it POSTs `{base_url}/chat/completions` and returns the
first choice's text. Transient faults are retried with exponential backoff and jitter:
HTTP 5xx, 429 (honouring `Retry-After`), connection errors, timeouts, malformed JSON,
empty content and content cut off by the token limit. After the last try it raises
`EndpointError`: `EndpointDownError` when the endpoint itself failed (HTTP errors, no
connection, timeouts) and `BadResponseError` when it answered with something unusable.

It is safe to share one client between threads (httpx's connection pool is thread-safe).
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from typing import Any

import httpx

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
    """Chat completions with bounded retries; `complete(messages)` returns the reply text."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        temperature: float = 0.2,
        max_tokens: int = 1024,
        max_backoff: float = 60.0,
        seed: int | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_tokens < 1:
            raise ValueError("timeout > 0, max_retries >= 0, backoff >= 0, max_tokens >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_backoff = max_backoff
        self.seed = seed
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if self.api_key and not self.api_key.isascii():  # httpx: a UnicodeEncodeError later
            raise EndpointError(
                "the API key (OPENAI_API_KEY) holds a character that is not ASCII: a copy and "
                "paste error?"
            )
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits)

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
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to `messages`; raises EndpointError after the last try."""
        body = self.payload(messages)
        last: _Retry | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, last.wait if last else None))
            try:
                return self._attempt(body)
            except _Retry as err:
                last = err
        assert last is not None
        tries = self.max_retries + 1
        error = EndpointDownError if last.down else BadResponseError
        raise error(f"{self.url} failed after {tries} tries: {last}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; a server's Retry-After wins when it is longer."""
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        with self._rng_lock:
            delay = base * (0.5 + 0.5 * self._rng.random())
        if retry_after is not None:  # honoured in full up to 10 minutes
            delay = max(delay, min(retry_after, max(self.max_backoff, 600.0)))
        return delay

    def _attempt(self, body: dict[str, Any]) -> str:
        try:
            response = self._http.post(self.url, json=body)
        except httpx.TimeoutException as err:
            raise _Retry(
                f"no answer within {self.timeout:g} s ({type(err).__name__})", True
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

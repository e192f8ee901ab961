"""vistune.chat_client against a real loopback server with injected faults.

Waits between tries are recorded, not slept, so no assertion depends on the wall clock."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.datagen.conftest import FakeChatServer
from vistune.chat_client import (
    BadResponseError,
    ChatClient,
    ClientConfig,
    EndpointDownError,
    RequestRefusedError,
    parse_retry_after,
)
from vistune.errors import EndpointError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
REPLY = "Question: What can be seen in the picture?\nAnswer: A few simple objects."


@pytest.fixture
def chat_server() -> Iterator[FakeChatServer]:
    server = FakeChatServer()
    yield server
    server.close()


def client(server, sleeps: list[float] | None = None, **kw) -> ChatClient:
    kw = {"timeout": 2.0, "http_retries": 3, "backoff": 0.001, **kw}
    config = ClientConfig(server.url, "teacher-model", **kw)
    return ChatClient(
        config, api_key="sk-test", sleep=(sleeps if sleeps is not None else []).append
    )


def test_success_sends_the_openai_payload(chat_server):
    with client(chat_server, temperature=0.7, max_tokens=55, seed=3) as c:
        assert c.complete(MESSAGES) == REPLY
    body = chat_server.bodies[0]
    assert body == {
        "model": "teacher-model",
        "messages": MESSAGES,
        "temperature": 0.7,
        "max_tokens": 55,
        "seed": 3,
    }
    assert chat_server.headers[0]["Authorization"] == "Bearer sk-test"


def test_api_key_comes_from_the_environment(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    with ChatClient(ClientConfig(chat_server.url, "m", backoff=0.001)) as c:
        c.complete(MESSAGES)
    assert chat_server.headers[0]["Authorization"] == "Bearer sk-env"


def test_an_api_key_that_is_not_ascii_is_named(monkeypatch):
    """A key pasted with a stray character used to be a UnicodeEncodeError from httpx at
    the first request."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-\u2011abc")  # a non-breaking hyphen
    with pytest.raises(EndpointError, match=r"API key \(OPENAI_API_KEY\) holds a character"):
        ChatClient(ClientConfig("http://127.0.0.1:9/v1", "m"))


@pytest.mark.parametrize(
    "fault", ["500", "501", "503", "520", "529", "malformed", "cut", "empty", "length"]
)
def test_transient_faults_are_retried(chat_server, fault):
    chat_server.inject(fault, fault)
    with client(chat_server) as c:
        assert c.complete(MESSAGES) == REPLY
    assert len(chat_server.bodies) == 3


def test_429_honours_retry_after(chat_server):
    chat_server.retry_after = "0.4"
    chat_server.inject("429")
    sleeps: list[float] = []
    with client(chat_server, sleeps) as c:
        assert c.complete(MESSAGES) == REPLY
    assert sleeps == [0.4]  # the server's wait, not the 0.001 s backoff
    assert len(chat_server.bodies) == 2


def test_timeout_is_retried(chat_server):
    """The first try hangs past the timeout (a reply would come after 0.8 s and make one
    request in all); the second is answered."""
    chat_server.hang = 0.8
    chat_server.inject("timeout")
    sleeps: list[float] = []
    with client(chat_server, sleeps, timeout=0.25) as c:
        assert c.complete(MESSAGES) == REPLY
    assert len(chat_server.bodies) == 2
    assert len(sleeps) == 1 and 0.0005 <= sleeps[0] <= 0.001


def test_endpoint_down_raises_after_bounded_retries(chat_server):
    chat_server.down = True
    with client(chat_server, http_retries=2) as c, pytest.raises(EndpointDownError) as err:
        c.complete(MESSAGES)
    assert len(chat_server.bodies) == 3
    assert "failed after 3 tries" in str(err.value) and "HTTP 503" in str(err.value)
    assert chat_server.url in str(err.value)


def test_persistent_bad_content_is_a_bad_response(chat_server):
    chat_server.inject("empty", "empty", "empty")
    with client(chat_server, http_retries=2) as c, pytest.raises(BadResponseError) as err:
        c.complete(MESSAGES)
    assert isinstance(err.value, EndpointError)
    assert "empty content" in str(err.value)


def test_unauthorised_is_not_retried(chat_server):
    chat_server.inject("401")
    with client(chat_server) as c, pytest.raises(EndpointDownError, match="OPENAI_API_KEY"):
        c.complete(MESSAGES)
    assert len(chat_server.bodies) == 1


def test_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ClientConfig(f"http://127.0.0.1:{port}/v1", "m", http_retries=1, backoff=0.001)
    with ChatClient(config) as c:
        with pytest.raises(EndpointDownError, match="cannot reach"):
            c.complete(MESSAGES)


def test_backoff_grows_and_is_jittered():
    c = ChatClient(ClientConfig("http://127.0.0.1:9/v1", "m", backoff=1.0, max_backoff=5.0))
    delays = [c._delay(attempt, None) for attempt in (1, 2, 3, 4, 5)]
    for delay, base in zip(delays, (1, 2, 4, 5, 5), strict=True):
        assert base * 0.5 <= delay <= base
    assert c._delay(1, 3.0) == 3.0


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(later) <= 31


def test_bad_base_url_is_rejected():
    with pytest.raises(ValueError, match="http"):
        ClientConfig("127.0.0.1:8000", "m")


def test_a_refused_request_is_not_retried_and_not_a_down_endpoint(chat_server):
    chat_server.inject("400")
    with client(chat_server) as c, pytest.raises(RequestRefusedError, match="HTTP 400") as err:
        c.complete(MESSAGES)
    assert not isinstance(err.value, EndpointDownError)
    assert len(chat_server.bodies) == 1

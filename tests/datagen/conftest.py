"""A real chat-completions server on loopback with injected faults, for the datagen tests.

`FakeChatServer` runs `http.server.ThreadingHTTPServer` on 127.0.0.1 (port 0) in a thread
and answers `POST /v1/chat/completions`. Faults queued with `server.inject(...)` apply to
the next requests, one each: an HTTP status such as "500" or "401", "429" (with `Retry-After`), "timeout" (sleeps longer
than the client's timeout), "malformed" (a body that is not JSON), "cut" (a JSON body cut
in half), "empty" (empty content), "length" (finish_reason "length"). `server.down = True`
answers 503 to everything. Requests are counted per prompt hash (`server.counts`).
`reply(messages)` gives each answer's content, or an int: that HTTP status with an error
body (the evaluation tests' scripted judge is built on it).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def messages_hash(messages: list[dict]) -> str:
    """Same recipe as vistune.datagen.store.prompt_hash (checked in test_pipeline)."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_reply(messages: list[dict]) -> str:
    """A well-formed teacher answer: a description for detail prompts, else one Q/A pair."""
    last = messages[-1]["content"]
    if "Question to answer:" in last:
        return "The picture shows a few simple objects on a plain background."
    return "Question: What can be seen in the picture?\nAnswer: A few simple objects."


class FakeChatServer:
    def __init__(self, reply: Callable[[list[dict]], str | int] = default_reply) -> None:
        self.reply = reply
        self.latency = 0.0
        self.hang = 1.0
        self.retry_after = "0.3"
        self.down = False
        self.faults: deque[str] = deque()
        self.counts: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def inject(self, *faults: str) -> None:
        with self.lock:
            self.faults.extend(faults)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, body: dict, headers: dict) -> str | None:
        with self.lock:
            self.bodies.append(body)
            self.headers.append(headers)
            self.times.append(time.monotonic())
            self.counts[messages_hash(body.get("messages", []))] += 1
            if self.down:
                return "503"
            return self.faults.popleft() if self.faults else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                fault = server._next(body, dict(self.headers))
                if server.latency:
                    time.sleep(server.latency)
                if fault == "429":
                    self._send(429, b'{"error": "slow down"}', {"Retry-After": server.retry_after})
                    return
                if fault is not None and fault.isdigit():
                    self._send(int(fault), b'{"error": "injected"}')
                    return
                if fault == "timeout":
                    time.sleep(server.hang)
                content = server.reply(body["messages"])
                if isinstance(content, int):
                    self._send(content, b'{"error": {"message": "scripted failure"}}')
                    return
                finish = "stop"
                if fault == "empty":
                    content = ""
                elif fault == "length":
                    finish = "length"
                data = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": finish,
                        }
                    ],
                }
                raw = json.dumps(data).encode("utf-8")
                if fault == "malformed":
                    raw = b"<html>oops</html>"
                elif fault == "cut":
                    raw = raw[: len(raw) // 2]
                self._send(200, raw)

        return Handler


@pytest.fixture
def chat_server() -> Iterator[FakeChatServer]:
    server = FakeChatServer()
    yield server
    server.close()

"""The OpenAI-compatible API on a real server on loopback: the official openai client with
and without streaming, 16 concurrent requests without cross-talk, every bad input answered
with an error object and the server still serving, auth, disconnects, a model error."""

from __future__ import annotations

import base64
import copy
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from vistune.config import GenerationConfig
from vistune.serve.app import ThreadedServer, create_app
from vistune.serve.engine import Engine
from vistune.serve.settings import ServeConfig

openai = pytest.importorskip("openai", reason="the serve extra: pip install -e '.[serve]'")

NAME = "tiny"
LIMITS = ServeConfig(max_body_bytes=1 << 20, max_pixels=1_000_000, max_tokens=64)


def photo(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def data_url(image: Image.Image, kind: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image: Image.Image | None = None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    parts = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": text},
    ]
    return {"role": "user", "content": parts}


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, max_batch=8, max_waiting=32)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def cold(tiny_model):
    """The same model answering each request alone, with no prefix cache."""
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, cache_bytes=0)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with ThreadedServer(create_app(engine, LIMITS, NAME, own_engine=False)) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(cold: Engine, text: str, image: Image.Image | None, max_tokens: int = 12) -> str:
    content = text if image is None else f"<image>\n{text}"
    return cold.answer(
        [{"role": "user", "content": content}], image, GenerationConfig(max_new_tokens=max_tokens)
    )


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_openai_client_answers_with_an_image(client, cold, engine):
    image = photo(0)
    out = client.chat.completions.create(
        model=NAME, messages=[user("What is in the image?", image)], temperature=0, max_tokens=12
    )
    assert out.choices[0].message.content == alone(cold, "What is in the image?", image)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > engine.model.num_image_tokens  # the image's 4 included
    assert 1 <= out.usage.completion_tokens <= 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_openai_client_streams_the_same_answer_with_usage(client, cold):
    image = photo(1)
    stream = client.chat.completions.create(
        model=NAME, messages=[user("Describe the image.", image)], temperature=0, max_tokens=12,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone(cold, "Describe the image.", image)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_stream_ends_with_done(server):
    body = {"model": NAME, "messages": [user("Hi")], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_connections_send_small_writes_at_once(server):
    """TCP_NODELAY on every accepted connection: with Nagle's algorithm on, each streamed
    chunk after the headers waited for the client's delayed ACK (40 ms on Linux), the first
    token's chunk included."""
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        connections = list(server.server.server_state.connections)  # uvicorn's, held open
        assert connections
        for connection in connections:
            sock = connection.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_sixteen_concurrent_requests_answer_as_alone(client, cold, engine):
    asks = [
        (
            f"Question {i}: what is in the picture?" if i % 2 else f"Say {i}.",
            photo(10 + i) if i % 2 else None,
        )
        for i in range(16)
    ]
    expected = [alone(cold, text, image) for text, image in asks]
    steps = dict(engine.scheduler.stats)

    def one(item):
        text, image = item
        out = client.chat.completions.create(
            model=NAME, messages=[user(text, image)], temperature=0, max_tokens=12
        )
        return out.choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, asks))
    assert got == expected
    stats = engine.scheduler.stats
    stepped = stats["rows_stepped"] - steps.get("rows_stepped", 0)
    assert stepped > stats["steps"] - steps.get("steps", 0)  # rows shared decode steps


def test_follow_up_turn_reuses_the_cached_prefix(client, cold):
    image = photo(2)
    first = [user("What is in the image?", image)]
    a = client.chat.completions.create(model=NAME, messages=first, temperature=0, max_tokens=12)
    follow = [
        *first,
        {"role": "assistant", "content": a.choices[0].message.content},
        user("What colour?"),
    ]
    b = client.chat.completions.create(model=NAME, messages=follow, temperature=0, max_tokens=12)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached > 4 and cached < b.usage.prompt_tokens
    messages = [
        {"role": "user", "content": "<image>\nWhat is in the image?"},
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "What colour?"},
    ]
    assert b.choices[0].message.content == cold.answer(
        messages, image, GenerationConfig(max_new_tokens=12)
    )


def huge_png(side: int = 8_000) -> bytes:
    """A PNG whose header claims side x side pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _image_body(url: str, count: int = 1) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
    return {
        "model": NAME,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Q"}]}],
    }


BAD = {
    "invalid JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    "not an object": ([1, 2], 400, "JSON object"),
    "schema violation": ({"model": NAME, "messages": "hello"}, 400, "messages"),
    "bad role": ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    "no model": ({"messages": [user("x")]}, 400, "model"),
    "unknown model": ({"model": "gpt-9", "messages": [user("x")]}, 400, "unknown model"),
    "empty messages": ({"model": NAME, "messages": []}, 400, "at least one message"),
    "n=2": ({"model": NAME, "messages": [user("x")], "n": 2}, 400, "n"),
    "negative temperature": (
        {"model": NAME, "messages": [user("x")], "temperature": -1},
        400,
        "temperature",
    ),
    "max_tokens over the limit": (
        {"model": NAME, "messages": [user("x")], "max_tokens": 65},
        400,
        "at most 64",
    ),
    "invalid base64": (
        _image_body("data:image/png;base64,@@@not-base64@@@"),
        400,
        "invalid base64",
    ),
    "not an image": (
        _image_body("data:image/png;base64," + base64.b64encode(b"hello world").decode()),
        400,
        "not an image",
    ),
    "not an image type": (_image_body("data:text/plain;base64,aGk="), 400, "not an image"),
    "too many images": (_image_body(data_url(photo(3)), count=2), 400, "at most 1"),
    "too many pixels": (
        _image_body("data:image/png;base64," + base64.b64encode(huge_png()).decode()),
        413,
        "over the limit",
    ),
    "remote URL": (_image_body("http://example.com/cat.png"), 400, "remote image URLs are refused"),
    "file URL": (_image_body("file:///etc/passwd"), 400, "data:image"),
    "text holds <image>": ({"model": NAME, "messages": [user("look <image>")]}, 400, "<image>"),
    "ends with the assistant": (
        {"model": NAME, "messages": [user("x"), {"role": "assistant", "content": "y"}]},
        400,
        "last message",
    ),
    "prompt past the context": (
        {"model": NAME, "messages": [user("the cat sat on the mat " * 200)]},
        400,
        "context",
    ),
    "body too large": ({"model": NAME, "messages": [user("x" * (1 << 20))]}, 413, "limit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_an_error_object_and_the_server_keeps_serving(server, client, case):
    body, status, words = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"]
    ok = client.chat.completions.create(model=NAME, messages=[user("Hi")], max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_api_key_is_required_when_set(engine):
    config = ServeConfig(api_key="s3cret")
    with ThreadedServer(create_app(engine, config, NAME, own_engine=False)) as live:
        url = live.url + "/v1/chat/completions"
        body = {"model": NAME, "messages": [user("Hi")], "max_tokens": 3}
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(live.url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=NAME, messages=[user("Hi")], max_tokens=3).choices
        assert httpx.get(live.url + "/health").status_code == 200


def test_remote_images_only_from_allowed_hosts(engine):
    """A host on the allow-list is fetched (a local file server here); others are not."""
    import http.server
    import socketserver

    png = io.BytesIO()
    photo(4).save(png, "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png.getvalue())

        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        image_url = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
        config = ServeConfig(allow_image_host=("127.0.0.1",))
        with ThreadedServer(create_app(engine, config, NAME, own_engine=False)) as live:
            body = _image_body(image_url) | {"max_tokens": 3}
            assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 200
            other = _image_body(image_url.replace("127.0.0.1", "localhost")) | {"max_tokens": 3}
            r = httpx.post(live.url + "/v1/chat/completions", json=other)
            assert r.status_code == 400 and "allow-image-host" in r.json()["error"]["message"]
        files.shutdown()


def slow_down(engine: Engine, monkeypatch) -> None:
    """Each decode step takes at least 20 ms, so an answer runs long enough to interrupt."""
    decoder = engine.generator.fast_decoder()
    step = decoder.step

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", slow)


def _long_prompt(cold: Engine) -> str:
    """A prompt whose greedy answer runs to 64 tokens (no EOS before)."""
    for i in range(40):
        text = f"Tell me story number {i}."
        job = cold.complete(
            [([{"role": "user", "content": text}], None)], GenerationConfig(max_new_tokens=64)
        )
        if job[0].finish_reason == "length":
            return text
    pytest.skip("no prompt of the tiny model runs to 64 tokens")


def test_client_that_disconnects_mid_stream_frees_its_row(server, engine, cold, monkeypatch):
    slow_down(engine, monkeypatch)
    text = _long_prompt(cold)
    before = engine.scheduler.stats["cancelled"]
    body = {
        "model": NAME,
        "messages": [user(text)],
        "max_tokens": 64,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # the role chunk, then a first piece of text is on its way
    deadline = time.monotonic() + 5
    while engine.scheduler.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.stats["cancelled"] == before + 1, dict(engine.scheduler.stats)
    assert engine.scheduler.load == (0, 0)


def test_full_line_answers_429_with_retry_after(tiny_model, cold, monkeypatch):
    eng = Engine(copy.deepcopy(tiny_model), dtype=torch.float32, max_batch=1, max_waiting=0)
    slow_down(eng, monkeypatch)
    text = _long_prompt(cold)
    with ThreadedServer(create_app(eng, LIMITS, NAME)) as live:
        url = live.url + "/v1/chat/completions"
        long = {
            "model": NAME,
            "messages": [user(text)],
            "max_tokens": 64,
            "stream": True,
            "temperature": 0,
        }
        with httpx.stream("POST", url, json=long) as r:
            lines = r.iter_lines()  # (a dropped iterator would close the response)
            next(lines)  # running, and holding the only place
            busy = httpx.post(url, json={"model": NAME, "messages": [user("Hi")], "max_tokens": 3})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert busy.json()["error"]["type"] == "rate_limit_error"


def test_model_error_is_a_500_and_the_next_request_works(server, engine, client, monkeypatch):
    decoder = engine.generator.fast_decoder()
    step = decoder.step
    calls = []

    def broken_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("simulated kernel failure")
        return step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", broken_once)
    body = {"model": NAME, "messages": [user("the cat sat on")], "max_tokens": 20, "temperature": 0}
    # the first token comes from the prefill; the failing step follows it
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
    assert client.chat.completions.create(model=NAME, messages=[user("Hi")], max_tokens=3).choices


@pytest.mark.slow
def test_default_model_through_the_openai_client(default_weights):
    """The packaged model (256 image tokens) answers a question with the astronaut photo, in
    a stream and whole, and a follow-up turn reuses the image's cached positions."""
    from skimage import data

    from vistune.model import load_model

    eng = Engine(load_model("default", dtype=torch.bfloat16), dtype=torch.bfloat16)
    with ThreadedServer(create_app(eng, ServeConfig(), "vistune-default")) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        image = Image.fromarray(data.astronaut())
        ask = [user("What is the capital of France? Answer with the city name.", image)]
        out = client.chat.completions.create(
            model="vistune-default", messages=ask, temperature=0, max_tokens=12
        )
        assert "Paris" in out.choices[0].message.content
        assert out.usage.prompt_tokens > 256
        follow = [*ask, {"role": "assistant", "content": out.choices[0].message.content},
                  user("What is the capital of Italy? Answer with the city name.")]  # fmt: skip
        stream = client.chat.completions.create(
            model="vistune-default", messages=follow, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Rome" in text
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 256

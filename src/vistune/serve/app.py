"""The HTTP server: an OpenAI-compatible chat API and the web chat, on one engine (§5.1).

    app = create_app(engine, ServeConfig(), "vistune-default")   # served by uvicorn

Routes: GET /v1/models, POST /v1/chat/completions (JSON, or Server-Sent Events with
`stream: true`, ending with `data: [DONE]`), GET /health, GET / (the web chat, a page of
our own that calls the same API). FastAPI/Starlette do the HTTP; the body is read and
checked here (its size before JSON parsing, the schema in vistune.serve.protocol), so that
every bad request gets an OpenAI-style error object and the server keeps serving:

- 400: invalid JSON, a schema violation, invalid base64, a payload that is not an image, an
  unknown model, too many images, an empty message list, max_tokens past the limit;
- 401: a missing or wrong bearer token when an API key is set (compared in constant time);
- 413: a body or an image (pixels, read from its header before decoding) past the limits;
- 429 + Retry-After: the waiting line is full (vistune.serve.scheduler);
- 500: a model error (that request fails; the next one is served); 503: shutting down.

A streaming client that goes away cancels its request: Starlette cancels the response
when it sees the disconnect, and the scheduler drops the row before its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vistune.config import GenerationConfig
from vistune.data.image import decode_image
from vistune.errors import ImageTooLargeError, VistuneError
from vistune.serve import protocol
from vistune.serve.engine import Engine, Stripper
from vistune.serve.protocol import ApiError
from vistune.serve.scheduler import Cancelled, Delta, Done, Event, Failed, Job, QueueFull
from vistune.serve.settings import MAX_IMAGES, ServeConfig

log = logging.getLogger("vistune.serve")
DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default when a request names none (vistune chat's own default is 0, greedy)."""
DISCONNECT_POLL_S = 0.5


def create_app(
    engine: Engine, config: ServeConfig, model_name: str, own_engine: bool = True
) -> FastAPI:
    """The ASGI app serving `engine` as `model_name`; `own_engine`: close it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_engine:
            await run_in_threadpool(engine.close)

    app = FastAPI(
        title="vistune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    api = _Api(engine, config, model_name)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        body = protocol.error_body(str(err.detail), "invalid_request_error")
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(protocol.error_body(f"internal error: {err}", "server_error"), 500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running, waiting = engine.scheduler.load
        return {"status": "ok", "model": model_name, "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        api.check_key(request)
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": api.started, "owned_by": "vistune"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.chat(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(api.page)

    return app


class _Api:
    """The chat-completions handler and its checks (module docstring)."""

    def __init__(self, engine: Engine, config: ServeConfig, model_name: str) -> None:
        self.engine, self.config, self.model_name = engine, config, model_name
        self.started = int(time.time())
        self.page = resources.files("vistune.serve").joinpath("web/index.html").read_text("utf-8")

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (
            scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def chat(self, request: Request):
        self.check_key(request)
        body = await _read_body(request, self.config.max_body_bytes)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        req = protocol.parse_request(data)
        if req.model != self.model_name:
            raise ApiError(
                400, f"unknown model {req.model!r}; this server serves {self.model_name!r}",
                code="model_not_found", param="model",
            )  # fmt: skip
        gen = self._generation_config(req)
        urls = protocol.image_urls(req)
        if len(urls) > MAX_IMAGES:
            raise ApiError(
                400, f"{len(urls)} images in the request; at most {MAX_IMAGES}",
                param="messages",
            )  # fmt: skip
        messages = protocol.to_messages(req)
        image = await self._image(urls[0]) if urls else None
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: Event) -> None:  # on the model's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        try:
            job = self.engine.submit(messages, image, gen, emit)
        except QueueFull as err:
            raise ApiError(
                429, f"the server is busy: {err}", kind="rate_limit_error",
                headers={"Retry-After": str(err.retry_after)},
            ) from None  # fmt: skip
        except Cancelled as err:
            raise ApiError(503, str(err), kind="server_error") from None
        except VistuneError as err:
            raise ApiError(400, str(err)) from None
        cid = protocol.new_id()
        if req.stream:
            first = await events.get()
            if isinstance(first, Failed):
                job.cancel()
                raise _failure(first.error)
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _JobStream(
                job,
                self._sse(cid, job, first, events, usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(cid, job, events, request)

    def _generation_config(self, req: protocol.ChatRequest) -> GenerationConfig:
        max_tokens = req.max_completion_tokens or req.max_tokens or self.config.max_tokens
        if max_tokens > self.config.max_tokens:
            raise ApiError(
                400, f"max_tokens is {max_tokens}; this server allows at most {self.config.max_tokens}",
                param="max_tokens",
            )  # fmt: skip
        temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stops,
            seed=req.seed,
        )

    async def _image(self, url: str):
        """The request's image from a data URL, or fetched from an allowed host."""
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            data = await self._fetch(url)
        else:
            data = protocol.decode_data_url(url)
        try:
            return await run_in_threadpool(decode_image, data, "image_url", self.config.max_pixels)
        except ImageTooLargeError as err:
            raise ApiError(413, str(err), param="image_url") from None
        except VistuneError as err:
            raise ApiError(400, str(err), param="image_url") from None

    async def _fetch(self, url: str) -> bytes:
        import httpx

        host = (urlsplit(url).hostname or "").lower()
        if host not in self.config.allow_image_host:
            raise ApiError(
                400,
                "remote image URLs are refused (the server fetches nothing by default); send "
                "the image as a data:image/...;base64 URL, or start the server with "
                f"--allow-image-host {host or 'HOST'}",
                param="image_url",
            )
        limit, chunks, size = self.config.max_body_bytes, [], 0
        try:
            async with httpx.AsyncClient(timeout=self.config.fetch_timeout) as client:
                async with client.stream("GET", url) as response:  # redirects not followed
                    if response.status_code != 200:
                        raise ApiError(400, f"fetching {url}: HTTP {response.status_code}")
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ApiError(413, f"the image at {url} is over {limit} bytes")
                        chunks.append(chunk)
        except httpx.HTTPError as err:
            raise ApiError(400, f"fetching {url}: {err}") from None
        return b"".join(chunks)

    async def _whole(self, cid: str, job: Job, events: asyncio.Queue[Event], request: Request):
        """Wait for the answer; a client that leaves meanwhile cancels it."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse(
                            protocol.error_body("client went away", "cancelled"), 499
                        )
                    continue
                if isinstance(event, Done):
                    c = event.completion
                    use = protocol.usage(
                        event.prompt_tokens, event.completion_tokens, event.cached_tokens
                    )
                    body = protocol.completion_body(
                        cid, self.model_name, c.text.strip(), c.finish_reason, use
                    )
                    return JSONResponse(body)
                if isinstance(event, Failed):
                    raise _failure(event.error)
        finally:
            job.cancel()

    async def _sse(
        self, cid: str, job: Job, event: Event, events: asyncio.Queue[Event], include_usage: bool
    ) -> AsyncIterator[str]:
        """The answer as chat.completion.chunk events, then [DONE]."""
        stripper, name = Stripper(), self.model_name
        try:
            yield _data(protocol.chunk_body(cid, name, {"role": "assistant", "content": ""}))
            while True:
                if isinstance(event, Delta):
                    piece = stripper.push(event.text)
                    if piece:
                        yield _data(protocol.chunk_body(cid, name, {"content": piece}))
                elif isinstance(event, Done):
                    yield _data(protocol.chunk_body(cid, name, {}, event.completion.finish_reason))
                    if include_usage:
                        use = protocol.usage(
                            event.prompt_tokens, event.completion_tokens, event.cached_tokens
                        )
                        yield _data(protocol.chunk_body(cid, name, None, use=use))
                    break
                else:  # Failed after the stream began: say so in the stream
                    err = _failure(event.error)
                    yield _data(err.body())
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()


class _JobStream(StreamingResponse):
    """A stream that cancels its job as soon as the client disconnects.

    Under ASGI 2.4 servers (uvicorn) Starlette learns of a disconnect only when a send fails,
    and leaves the body iterator unclosed; here a watcher reads the disconnect message
    itself, and the iterator is closed whatever happens."""

    def __init__(self, job: Job, content: AsyncIterator[str], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            self.job.cancel()
            await self.body_iterator.aclose()


class ThreadedServer:
    """uvicorn serving `app` on a free loopback port from a thread of this process (tests,
    benchmarks, notebooks); `vistune serve` runs uvicorn in the main thread instead.

        with ThreadedServer(create_app(engine, ServeConfig(), "m")) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1") -> None:
        import socket
        import threading

        import uvicorn

        # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
        # whose proto says TCP, and accepted connections copy it from this one. With proto 0
        # each streamed chunk after the headers waited for the client's delayed ACK (40 ms on
        # Linux), which the first-token times of benchmarks/serve.py included; `vistune
        # serve` binds through uvicorn (getaddrinfo's proto) and never had the wait.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def _failure(error: BaseException) -> ApiError:
    """The HTTP error of a request the scheduler failed."""
    if isinstance(error, Cancelled):
        return ApiError(503, f"request cancelled: {error}", kind="server_error")
    if isinstance(error, VistuneError):
        return ApiError(400, str(error))
    log.error("model error", exc_info=error)
    return ApiError(500, f"model error: {type(error).__name__}: {error}", kind="server_error")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)

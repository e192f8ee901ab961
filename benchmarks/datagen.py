"""Data-generation throughput against a teacher of fixed latency (paper §3; issue 3 item 12).

    .venv/bin/python benchmarks/datagen.py --latency 0.2 --workers 1,4,8,16 --rounds 4

A loopback chat-completions server sleeps `latency` seconds per request and answers a
well-formed complex-reasoning reply. For each worker count N the full pipeline
(`run_datagen`: prompts, SQLite store, parsing, atomic output) sends `rounds * N` requests.
Ideal throughput is N requests per latency period; the script prints the achieved rate and
its ratio to the ideal, achieved / (N / latency).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vistune.data.annotations import Box, ImageContext
from vistune.datagen.pipeline import DatagenConfig, run_datagen
from vistune.datagen.store import Store
from vistune.datagen.teachers import OpenAITeacher

REPLY = (
    "Question: Why are the cups here?\nAnswer: They stand ready on the table, so guests can drink."
)


def serve(latency: float) -> ThreadingHTTPServer:
    """A chat-completions server on 127.0.0.1 that takes `latency` seconds per request."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(latency)
            body = json.dumps(
                {
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": REPLY},
                            "finish_reason": "stop",
                        }
                    ]
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # the default backlog of 5 drops connections at 16 workers

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return server


def measure(url: str, workers: int, n: int, workdir: Path, tag: str = "run") -> float:
    """Seconds the pipeline takes to answer n fresh requests with `workers` in flight."""
    contexts = [
        ImageContext(f"{tag}-{workers}-{i}", f"{i}.png", (f"Two cups on table {i}.",),
                     (Box("cup", (0.1, 0.2, 0.3, 0.4)), Box("cup", (0.6, 0.2, 0.8, 0.4))))
        for i in range(n)
    ]  # fmt: skip
    teacher = OpenAITeacher(url, "bench", api_key="none", timeout=30.0)
    config = DatagenConfig(types=("complex",), workers=workers, check_images=False)
    with Store(workdir / f"w{workers}.sqlite") as store:
        start = time.perf_counter()
        summary = run_datagen(contexts, teacher, store, workdir / f"w{workers}.json", config)
        elapsed = time.perf_counter() - start
    teacher.close()
    if summary.per_type["complex"]["done"] != n:
        raise RuntimeError(f"expected {n} answers, got {dict(summary.per_type['complex'])}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request")
    parser.add_argument("--workers", default="1,4,8,16", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=4, help="requests per worker")
    args = parser.parse_args()
    server = serve(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    print(f"latency {args.latency:.3f} s per request, {args.rounds} requests per worker")
    print(f"{'workers':>7} {'requests':>8} {'seconds':>8} {'req/s':>7} {'ideal':>7} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        measure(url, 1, 1, Path(tmp), tag="warmup")  # warm up imports and the connection pool
        for workers in (int(w) for w in args.workers.split(",")):
            n = workers * args.rounds
            elapsed = measure(url, workers, n, Path(tmp))
            rate, ideal = n / elapsed, workers / args.latency
            print(
                f"{workers:>7} {n:>8} {elapsed:>8.2f} {rate:>7.1f} {ideal:>7.1f} {rate / ideal:>6.2f}"
            )
            sys.stdout.flush()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

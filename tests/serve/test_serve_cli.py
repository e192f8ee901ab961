"""`vistune serve` as a process (flags, SIGTERM), and the repo's own OpenAI clients (the
datagen teacher, the eval judge) pointed at it by their --base-url flags."""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from vistune.cli import main
from vistune.serve.app import ThreadedServer, create_app
from vistune.serve.engine import Engine
from vistune.serve.settings import ServeConfig

pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")
NAME = "tiny"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def server(tiny_model):
    engine = Engine(copy.deepcopy(tiny_model), dtype=torch.float32)
    # The random tiny model rarely ends an answer, and the repo's client refuses truncated
    # ones; common letters as extra stops make its answers end ("stop") after a few tokens.
    engine.stop = (*engine.stop, *"etaoinsr")
    with ThreadedServer(create_app(engine, ServeConfig(), NAME)) as live:
        yield live


def test_datagen_teacher_reaches_the_server_by_its_flags(server, tmp_path):
    from vistune.commands import datagen
    from vistune.data.annotations import ImageContext
    from vistune.datagen.teachers import Request

    parser = argparse.ArgumentParser()
    datagen.add_arguments(parser)
    args = parser.parse_args(
        ["--coco", str(tmp_path), "--teacher", "openai", "--base-url", server.url + "/v1",
         "--model", NAME, "--max-tokens", "8", "--out", str(tmp_path / "o.json")]
    )  # fmt: skip
    teacher = datagen._teacher(args, ("conversation",))
    messages = [
        {"role": "system", "content": "You write questions about a picture."},
        {"role": "user", "content": "A cat on a mat."},
        {"role": "assistant", "content": "Question: what is on the mat?"},
        {"role": "user", "content": "A dog in a park."},
    ]
    context = ImageContext(image_id="1", image="1.jpg", captions=("x",))
    reply = teacher.respond(Request("conversation", context, messages))
    assert isinstance(reply, str) and reply
    teacher.close()


def test_eval_judge_reaches_the_server_by_its_flags(server, tmp_path):
    from vistune.chat_client import ChatClient
    from vistune.commands import eval as eval_command
    from vistune.eval.judge import BenchItem, judge_messages

    parser = argparse.ArgumentParser()
    eval_command.add_arguments(parser)
    files = [
        f"--{n}={tmp_path / n}.jsonl" for n in ("questions", "context", "reference", "answers")
    ]
    args = parser.parse_args(
        ["judge", *files, "--out", str(tmp_path / "j"), "--base-url", server.url + "/v1",
         "--model", NAME, "--max-tokens", "8"]
    )  # fmt: skip
    config = eval_command._client(args, args.base_url, args.model, "")
    item = BenchItem("q1", "conversation", "What is it?", "A cat.", "A cat.", "A dog.")
    with ChatClient(config) as client:
        assert isinstance(client.complete(judge_messages(item, "Score both from 1 to 10.")), str)


def test_bad_serve_flags_are_one_line(capsys):
    assert main(["serve", "--model", "/no/such/model"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["serve", "--max-batch", "0"]) == 2
    assert "max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--cache-mb", "-1"]) == 2  # was "max-waiting and cache-mb ..."
    assert "cache-mb must be at least 0, got -1" in capsys.readouterr().err
    assert main(["serve", "--fetch-timeout", "inf"]) == 2
    assert "fetch-timeout must be above 0 and finite, got inf" in capsys.readouterr().err


def test_serve_flags_come_from_serve_config(monkeypatch):
    """--allow-image-host, a tuple of ServeConfig, was the one flag written by hand."""
    from vistune.commands import serve

    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--allow-image-host", "A.org", "--allow-image-host", "b.org",
                              "--port", "0"])  # fmt: skip
    assert serve._config(args) == ServeConfig(port=0, allow_image_host=("a.org", "b.org"))
    assert serve._config(parser.parse_args([])) == ServeConfig()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_and_exits_zero(tiny_model, tmp_path):
    model_dir = copy.deepcopy(tiny_model).save(tmp_path / "model")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vistune.cli", "serve", "--model", str(model_dir), "--port",
         str(port), "--dtype", "fp32", "--served-model-name", NAME, "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 64, "stream": True, "temperature": 0}  # fmt: skip
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    started.set()
                    lines.append(line)

        client = threading.Thread(target=stream)
        client.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        client.join(30)
        assert [line for line in lines if line][-1] == "data: [DONE]"  # it finished its answer
        last = json.loads([line for line in lines if line.startswith("data: {")][-1][6:])
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()

"""`vistune chat`: one-shot and interactive answers, and one clean error line for bad input."""

from __future__ import annotations

import builtins
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from vistune.cli import main
from vistune.config import GenerationConfig
from vistune.serve.engine import Engine

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    return tiny_model.save(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    from vistune.model.llava import LlavaModel

    return Engine(LlavaModel.load(model_dir), dtype=torch.float32)


def write_photo(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (32, 48, 3), generator=g, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


def huge_png(path: Path, side: int = 8_000) -> Path:
    """A PNG whose header claims side x side pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def chat(*args: str) -> list[str]:
    return ["chat", "--dtype", "fp32", "--max-new-tokens", str(MAX_TOKENS), *args]  # args win


def type_lines(monkeypatch, script) -> None:
    """`input()` returns the lines of `script` (an iterator), then raises EOFError."""

    def fake_input(prompt: str = "") -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)


def ask(engine, history, image) -> str:
    return engine.answer(history, image, GenerationConfig(max_new_tokens=MAX_TOKENS))


def two_turns(engine, image) -> tuple[str, str]:
    """The engine's answers to "What is it?" then "And the colour?" about `image`."""
    q1 = {"role": "user", "content": "What is it?"}
    a1 = ask(engine, [q1], image)
    q2 = {"role": "user", "content": "And the colour?"}
    return a1, ask(engine, [q1, {"role": "assistant", "content": a1}, q2], image)


def test_one_shot_prints_the_answer(model_dir, engine, tmp_path, capsys):
    img = write_photo(tmp_path / "a.png", 0)
    threads = torch.get_num_threads()
    try:
        rc = main(
            chat("--model", str(model_dir), "--image", str(img), "--prompt", "What is it?",
                 "--threads", "1")
        )  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0
    expected = ask(
        engine, [{"role": "user", "content": "What is it?"}], Image.open(img).convert("RGB")
    )
    assert out == expected + "\n"
    assert "untrained projector" in err and "Traceback" not in err
    assert "plain template" not in err
    rc = main(chat("--model", str(model_dir), "--image", str(img), "--prompt", "What is it?",
                   "--template", "plain", "--max-tokens", "2"))  # fmt: skip
    assert rc == 0
    assert "the plain template (a stage-1 model) renders only the image" in capsys.readouterr().err


def test_one_shot_exits_cleanly_in_its_own_process(model_dir):
    """The model's thread ends before the interpreter: left running, with one torch thread,
    it aborted the process at exit ("terminate called without an active exception", 134)."""
    code = "import sys; from vistune.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, *chat("--model", str(model_dir), "--prompt", "hi"),
         "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() and "terminate called" not in done.stderr


def test_interactive_session(model_dir, engine, tmp_path, capsys, monkeypatch):
    img_a, img_b = write_photo(tmp_path / "a.png", 1), write_photo(tmp_path / "b.png", 2)
    script = iter(
        [
            "What is it?",
            "",
            "And the colour?",
            f"/image {tmp_path / 'missing.png'}",
            f"/image {img_b}",
            "Describe it.",
            "/clear",
            "Describe it.",
            "/nope",
        ]
    )

    type_lines(monkeypatch, script)
    rc = main(chat("--model", str(model_dir), "--image", str(img_a)))
    out, err = capsys.readouterr()
    assert rc == 0
    a, b = (Image.open(p).convert("RGB") for p in (img_a, img_b))
    a1, a2 = two_turns(engine, a)
    a3 = ask(engine, [{"role": "user", "content": "Describe it."}], b)
    assert out == f"{a1}\n{a2}\n{a3}\n{a3}\n\n"  # /clear restarts; EOF ends with a newline
    assert "vistune: error:" in err and "missing.png" in err  # bad /image keeps the session
    assert "conversation cleared" in err and "unknown command /nope" in err


def test_exit_command_ends_the_session(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(builtins, "input", lambda prompt="": "/exit")
    assert main(chat("--model", str(model_dir))) == 0
    assert capsys.readouterr().out == ""


def test_a_bad_line_keeps_the_session(model_dir, engine, tmp_path, capsys, monkeypatch):
    """A message the engine refuses (a second image placeholder, one too long for the
    context) prints one error line; the session and its conversation go on without it."""
    img = write_photo(tmp_path / "a.png", 4)
    script = iter(["What is it?", "Look at <image> again", "word " * 600, "And the colour?"])

    type_lines(monkeypatch, script)
    rc = main(chat("--model", str(model_dir), "--image", str(img)))
    out, err = capsys.readouterr()
    assert rc == 0
    a1, a2 = two_turns(engine, Image.open(img).convert("RGB"))
    assert out == f"{a1}\n{a2}\n\n"
    errors = [line for line in err.splitlines() if line.startswith("vistune: error:")]
    assert len(errors) == 2 and "<image>" in errors[0] and "context" in errors[1]
    assert "Traceback" not in err


def bad_inputs(tmp_path: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    good = write_photo(tmp_path / "good.png", 3)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    no_proj = tmp_path / "no_projector"
    shutil.copytree(model_dir, no_proj)
    (no_proj / "projector.safetensors").unlink()
    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["model"]["projector"] = "linear"
    (mismatched / "config.json").write_text(json.dumps(config))
    m, q = ["--model", str(model_dir)], ["--prompt", "What is it?"]
    return {
        "missing image": ([*m, "--image", str(tmp_path / "nope.png"), *q], "nope.png"),
        "corrupt image": ([*m, "--image", str(corrupt), *q], "corrupt.png"),
        "not an image": ([*m, "--image", str(text), *q], "notes.txt"),
        "huge image": ([*m, "--image", str(huge_png(tmp_path / "huge.png")), *q], "huge.png"),
        "empty prompt": ([*m, "--image", str(good), "--prompt", "  \n"], "prompt"),
        "no model dir": (["--model", str(tmp_path / "none"), *q], "none"),
        "missing file": (["--model", str(no_proj), *q], "projector"),
        "mismatched": (["--model", str(mismatched), *q], "mismatched"),
        "bad flag": ([*m, *q, "--temperature", "-1"], "--temperature must"),
        "nan temperature": ([*m, *q, "--temperature", "nan"], "--temperature must"),
        "bad top-p": ([*m, *q, "--top-p", "0"], "--top-p must"),
        "bad answer length": ([*m, *q, "--max-new-tokens", "0"], "--max-new-tokens must"),
        "bad threads": ([*m, *q, "--threads", "-2"], "--threads"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing image",
        "corrupt image",
        "not an image",
        "huge image",
        "empty prompt",
        "no model dir",
        "missing file",
        "mismatched",
        "bad flag",
        "nan temperature",
        "bad top-p",
        "bad answer length",
        "bad threads",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, model_dir, tmp_path, capsys):
    args, mention = bad_inputs(tmp_path, model_dir)[case]
    rc = main(chat(*args))
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vistune: error:") and mention in lines[0]


def test_prompt_longer_than_the_context_is_one_error_line(model_dir, capsys):
    rc = main(chat("--model", str(model_dir), "--prompt", "word " * 600))
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vistune: error: the prompt is") and "context of 512" in last


def test_debug_shows_the_traceback(model_dir, tmp_path, capsys):
    rc = main(["--debug", *chat("--model", str(model_dir), "--image", str(tmp_path / "x.png"))])
    err = capsys.readouterr().err
    assert (
        rc == 2
        and "Traceback" in err
        and err.strip().splitlines()[-1].startswith("vistune: error:")
    )


@pytest.mark.slow
def test_default_model_answers_and_says_projector_is_untrained(default_weights, tmp_path, capsys):
    from skimage import data

    img = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(img)
    rc = main(
        ["chat", "--model", "default", "--image", str(img), "--max-tokens", "12",
         "--prompt", "What is the capital of France? Answer with the city name."]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out
    assert err.strip().splitlines() == [
        "vistune: note: the packaged base model has an untrained projector, "
        "so its answers ignore the image"
    ]

"""`vistune chat`: talk to a model about an image.

    vistune chat --model default --image photo.jpg --prompt "What is in the picture?"
    vistune chat --model runs/finetune --image photo.jpg      # interactive, streamed

Interactive commands: `/image PATH` switches images (and starts a new conversation, since
the image belongs to the first turn, paper §3 / Table 2), `/image` alone drops the image,
`/clear` starts over, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from vistune.errors import VistuneError

HELP = "Chat with a model about an image (one answer with --prompt, else interactive)."

INTERACTIVE_HELP = "/image PATH switches image, /clear starts over, /exit or Ctrl-D quits"
GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "seed")
"""The GenerationConfig fields chat takes as flags (`--max-new-tokens`, ...), with the
dataclass's defaults and its attribute docstrings as their help."""
OLD_NAMES = {"max_new_tokens": ("--max-tokens",)}
"""Chat's answer length was `--max-tokens` before it took eval's name; kept as an alias."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vistune.commands.engine_flags import add_engine_flags
    from vistune.commands.flags import add_dataclass_flags
    from vistune.config import GenerationConfig

    add_engine_flags(parser)
    parser.add_argument("--image", help="image file to talk about")
    parser.add_argument("--prompt", help="ask one question, print the answer and exit")
    add_dataclass_flags(parser, GenerationConfig, only=GENERATION_FLAGS, aliases=OLD_NAMES)


def _generation_config(args: argparse.Namespace):
    """The GenerationConfig of the flags; a value it refuses is one error line naming the
    flag (GenerationConfig holds the checks, before the model loads)."""
    from vistune.commands.flags import config_from_flags
    from vistune.config import GenerationConfig

    return config_from_flags(args, GenerationConfig, only=GENERATION_FLAGS)


def run(args: argparse.Namespace) -> int:
    from vistune.commands.engine_flags import engine_from_flags
    from vistune.data.image import load_image

    config = _generation_config(args)
    if args.prompt is not None and not args.prompt.strip():
        raise VistuneError("the prompt is empty")
    image = load_image(args.image) if args.image else None

    def hint(note: str) -> str:
        return note + ("; --template vicuna_v0 asks in words" if "plain template" in note else "")

    engine = engine_from_flags(args, hint)
    try:
        if args.prompt is not None:
            print(engine.answer([{"role": "user", "content": args.prompt}], image, config))
            return 0
        return _interactive(engine, image, config)
    finally:  # the model's thread ends before the interpreter (left running, it aborted it)
        engine.close()


def _interactive(engine, image, config) -> int:
    """Read questions until /exit or EOF; stream each answer; keep the conversation."""
    from vistune.data.image import load_image

    print(f"vistune chat: {INTERACTIVE_HELP}", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image") :].strip()
            try:
                image = load_image(path) if path else None
            except VistuneError as err:
                print(f"vistune: error: {err}", file=sys.stderr)
                continue
            history = []
            print(f"(image: {path or 'none'}; new conversation)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {INTERACTIVE_HELP}", file=sys.stderr)
            continue
        asked = [*history, {"role": "user", "content": line}]
        try:
            reply = _stream_answer(engine, asked, image, config)
        except VistuneError as err:  # e.g. a second <image>, or past the context: not kept
            print(f"vistune: error: {err}", file=sys.stderr)
            continue
        history = [*asked, {"role": "assistant", "content": reply}]


def _stream_answer(engine, history: list[dict], image, config) -> str:
    pieces = []
    try:
        for piece in engine.stream(history, image, config):
            print(piece, end="", flush=True)
            pieces.append(piece)
    except KeyboardInterrupt:
        print(" (interrupted)", end="")
    print(flush=True)
    return "".join(pieces)

"""The `vistune` command: subcommand -> function, no logic.

Each subcommand lives in `vistune.commands.<name>` and exposes `HELP` (one line),
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
subcommand runs, so `vistune chat` does not pay for the training imports.

Errors a user can cause (`VistuneError`) print one line on stderr and exit 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from vistune.errors import VistuneError

# name -> module under vistune.commands
COMMANDS: dict[str, str] = {
    "datagen": "datagen",
    "eval": "eval",
    "scenes": "scenes",
    "mix": "mix",
    "weights": "weights",
    "demo": "demo",
    "train": "train",
    "features": "features",
    "chat": "chat",
    "export": "export",
    "import": "import_model",
    "serve": "serve",
}


def _load(name: str):
    return importlib.import_module(f"vistune.commands.{COMMANDS[name]}")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistune",
        description="Visual instruction tuning: data, training, evaluation, chat.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if argv and argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
        module = _load(name)
        parser = argparse.ArgumentParser(prog=f"vistune {name}", description=module.HELP)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
    else:
        parser = _top_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        module = _load(args.command)
    try:
        return int(module.run(args) or 0)
    except VistuneError as err:
        if debug:
            traceback.print_exc()
        print(f"vistune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vistune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

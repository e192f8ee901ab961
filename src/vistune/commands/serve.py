"""`vistune serve`: an OpenAI-compatible API and a web chat for a model (paper §5.1).

    vistune serve --model default                       # http://127.0.0.1:8000/
    vistune serve --model runs/finetune --api-key KEY --port 8080

Binds to 127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C) stops taking requests,
lets the running ones finish (at most --grace seconds, then cancels them) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from vistune.commands.flag_types import positive_int
from vistune.commands.flags import add_dataclass_flags, flag_values
from vistune.errors import VistuneError

HELP = "Serve a model over an OpenAI-compatible HTTP API with a web chat."
API_KEY_ENV = "VISTUNE_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vistune.commands.engine_flags import add_engine_flags
    from vistune.serve.settings import ServeConfig

    add_engine_flags(parser)
    parser.add_argument(
        "--grace", type=positive_int, default=30,
        help="seconds running requests get to finish after SIGTERM (default: 30)",
    )  # fmt: skip
    add_dataclass_flags(parser, ServeConfig, default_text={
        "api_key": "none: open", "served_model_name": "the model folder's name, or vistune-default",
        "allow_image_host": "none, remote image URLs are refused",
    })  # fmt: skip


def _config(args: argparse.Namespace):
    from vistune.serve.settings import ServeConfig

    values = flag_values(args, ServeConfig)
    values["api_key"] = values["api_key"] or os.environ.get(API_KEY_ENV) or None
    try:
        return ServeConfig(**values)
    except ValueError as err:
        raise VistuneError(str(err).replace("_", "-")) from None


def served_name(spec: str) -> str:
    from vistune.model import DEFAULT_SPEC, model_dir_of

    if spec == DEFAULT_SPEC:
        return "vistune-default"
    path = model_dir_of(spec).resolve()
    return path.parent.name if path.name == "model" else path.name


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from vistune.commands.engine_flags import engine_from_flags
    from vistune.serve.app import create_app

    config = _config(args)
    engine = engine_from_flags(
        args, max_batch=config.max_batch, max_waiting=config.max_waiting,
        cache_bytes=config.cache_mb << 20,
    )  # fmt: skip
    name = config.served_model_name or served_name(args.model)
    app = create_app(engine, config, name)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="info",
            timeout_graceful_shutdown=args.grace, lifespan="on",
        )
    )  # fmt: skip
    key = " (API key required)" if config.api_key else ""
    print(f"vistune: serving {name} on http://{config.host}:{config.port}/{key}", file=sys.stderr)
    # uvicorn handles SIGTERM/SIGINT itself, then re-raises the signal to the handler that was
    # there before it: a no-op here, so a clean shutdown exits 0 instead of dying by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    engine.close()
    return 0

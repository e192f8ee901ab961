"""The flags of the commands that load a model to answer (`chat`, `serve`), declared once:
which model, its template, the dtype and decode weights, and the CPU threads."""

from __future__ import annotations

import argparse
from collections.abc import Callable

DTYPES = ("bf16", "fp32")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    from vistune.data.conversation import TEMPLATES
    from vistune.serve.decoder import QUANTIZE

    parser.add_argument(
        "--model", default="default", help='model directory, or "default" (packaged base)'
    )
    parser.add_argument(
        "--template", choices=sorted(TEMPLATES), help="override the model's conversation template"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="bf16", help="bf16 (faster on CPU) or fp32"
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE, default="none",
        help="int8 / int4: decode steps read weight-only int8 (half of bf16's bytes) or int4 "
        "(a quarter, groups of 32) copies of the LLM's matrices: faster, answers may differ "
        "from bf16's (the CPU, --dtype bf16, Llama-family LLMs); none (the default): as loaded",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (0: torch's default; 1 is much faster on a busy CPU)",
    )  # fmt: skip


def engine_from_flags(
    args: argparse.Namespace, note: Callable[[str], str] = lambda text: text, **options
):
    """vistune.serve.engine.open_engine with the flags of `add_engine_flags`."""
    from vistune.serve.engine import open_engine

    return open_engine(
        args.model, args.dtype, args.template, args.threads, note, quantize=args.quantize,
        **options,
    )  # fmt: skip

"""`vistune weights`: convert the packaged default weights into the cache (once).

    vistune weights            # -> ~/.cache/vistune/models/{smollm2-135m-instruct,dinov2-vits14}
    vistune weights --force    # rebuild even if already converted

Prints the two model directories on stdout (LLM first); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "convert the packaged SmolLM2 + DINOv2 weights into the vistune cache (once)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="cache root (default: $VISTUNE_HOME or ~/.cache/vistune)",
    )
    parser.add_argument(
        "--force", action="store_true", help="convert again even if the directories exist"
    )


def run(args: argparse.Namespace) -> int:
    from vistune.weights import ensure_default_weights

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    weights = ensure_default_weights(home=args.home, progress=progress, force=args.force)
    print(weights.llm_dir)
    print(weights.vision_dir)
    return 0

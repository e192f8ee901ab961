"""`vistune scenes`: render the built-in synthetic scene dataset in COCO layout (paper §3).

    vistune scenes --n 200 --seed 0 --out data/scenes

writes DIR/annotations/{captions,instances}_{train,val}.json and DIR/{train,val}/*.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from vistune.errors import VistuneError

HELP = "render synthetic shape scenes with exact boxes and captions as a COCO-layout dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, required=True, help="number of images (both splits)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, identical dataset")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of images in the val split"
    )
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")


def run(args: argparse.Namespace) -> int:
    from vistune.data.scenes import make_scenes

    if args.n < 1:
        raise VistuneError(f"--n must be at least 1, got {args.n}")
    if not 0 <= args.val_fraction < 1:
        raise VistuneError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.size < 32:
        raise VistuneError(f"--size must be at least 32, got {args.size}")
    if args.out.exists() and not args.out.is_dir():
        raise VistuneError(f"--out {args.out} is a file, not a folder")
    with tqdm(total=args.n, desc="scenes", unit="img", file=sys.stderr) as bar:
        counts = make_scenes(
            args.out, args.n, args.seed, args.val_fraction, args.size, progress=bar.update
        )
    summary = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"wrote {args.n} scenes to {args.out} ({summary})")
    return 0

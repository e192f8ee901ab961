"""`vistune mix`: build the stage-2 instruction mix from per-type LLaVA JSON files (Table 4).

    vistune mix --input conversation=conv.json --input detail=detail.json \\
        --input complex=complex.json --ratios conv+5%detail+10%complex --out mix.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vistune.errors import VistuneError

HELP = "mix conversation/detail/complex LLaVA JSON files by ratio into one training file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vistune.datagen.mix import PRESETS

    presets = ", ".join(PRESETS).replace("%", "%%")  # argparse %-formats help strings
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="TYPE=FILE",
        help="a response type and its LLaVA JSON file (repeat per type)",
    )
    parser.add_argument(
        "--ratios",
        default="full",
        help=f"a preset ({presets}) or type=ratio,... e.g. conversation=1,detail=0.05",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same mix")
    parser.add_argument("--out", type=Path, required=True, help="output LLaVA JSON file")
    parser.add_argument("--indent", type=int, default=None, help="pretty-print (default: compact)")


def run(args: argparse.Namespace) -> int:
    from vistune.data.formats import write_llava_json
    from vistune.datagen.mix import mix_with_counts

    if args.out.is_dir():
        raise VistuneError(f"--out {args.out} is a folder, not a file")
    files = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VistuneError(f"--input takes TYPE=FILE, got {item!r}")
        if name in files:
            raise VistuneError(
                f"--input gives {name} twice ({files[name]}, {path}); one file a type"
            )
        files[name] = Path(path)
    try:
        samples, counts = mix_with_counts(files, args.ratios, args.seed)
    except ValueError as err:
        raise VistuneError(str(err)) from None
    write_llava_json(samples, args.out, indent=args.indent)
    parts = ", ".join(f"{name} {n}" for name, n in counts.items())
    print(f"wrote {len(samples)} samples to {args.out} ({parts})")
    return 0

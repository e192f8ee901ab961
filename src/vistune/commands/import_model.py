"""`vistune import`: a Hugging Face Llava folder or an official LLaVA checkpoint as a
vistune model directory (which chat, serve, eval and `train --init` load).

    vistune import --from hf exports/llava-hf --out models/imported
    vistune import --from llava checkpoints/llava-v1.5-7b --vision-tower clip-vit-l-336 \\
        --out models/llava15 --template vicuna_v0
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "import a Hugging Face Llava folder or an official LLaVA checkpoint"
SOURCES = ("hf", "llava")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from vistune.data.conversation import TEMPLATES

    parser.add_argument(
        "--from",
        dest="source",
        choices=SOURCES,
        required=True,
        help="hf: LlavaForConditionalGeneration folder; llava: official LLaVA layout",
    )
    parser.add_argument("src", type=Path, help="the folder to import")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument(
        "--template",
        choices=sorted(TEMPLATES),
        help="conversation template (default: a vistune export's own; else hf: chat_template "
        "when the tokenizer has one, llava: vicuna_v0)",
    )
    parser.add_argument(
        "--vision-tower",
        type=Path,
        help="llava: the vision tower folder (default: config.json's mm_vision_tower)",
    )


def run(args: argparse.Namespace) -> int:
    from vistune.errors import VistuneError
    from vistune.model.checkpoint import read_model_dir

    if args.source == "hf":
        if args.vision_tower is not None:
            raise VistuneError(
                "--vision-tower is for --from llava (a Llava folder holds its tower)"
            )
        from vistune.interop.hf_import import import_hf

        out = import_hf(args.src, args.out, template=args.template)
    else:
        from vistune.interop.llava_import import import_llava

        out = import_llava(args.src, args.out, args.vision_tower, template=args.template)
    config = read_model_dir(out).config
    print(
        f"wrote {out} ({config.projector}, layer {config.vision_layer}, {config.vision_select}, "
        f"{config.image_aspect} {config.image_size} px, template {config.template})"
    )
    return 0

"""`vistune export`: a model directory in the Hugging Face Llava layout.

    vistune export --model runs/finetune/model --out exports/llava-hf --format hf \\
        --eval eval/scenes

The folder loads with `LlavaForConditionalGeneration.from_pretrained(OUT)` and
`AutoProcessor.from_pretrained(OUT)`, no custom code, and carries a model card (README.md)
with the base models, data, training configs and the tables of the `--eval` runs. The
export is checked against transformers on a probe before it is put in place.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a model to the Hugging Face Llava layout (transformers loads it as it is)"
FORMATS = ("hf",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory (or training output)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--format", choices=FORMATS, default="hf", help="hf: LlavaForConditionalGeneration"
    )
    parser.add_argument(
        "--eval",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="an evaluation run folder whose report.md goes into the model card (repeat)",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights as written"
    )


def run(args: argparse.Namespace) -> int:
    from vistune.interop.hf_export import export_hf

    result = export_hf(args.model, args.out, evals=args.eval, dtype=args.dtype)
    print(
        f"wrote {result['out']} (HF Llava; strategy {result['vision_feature_select_strategy']}, "
        f"layer {result['vision_feature_layer']}, <image> id {result['image_token_id']}; "
        f"logits checked against transformers: max |diff| {result['max_logit_diff']:.1e})"
    )
    return 0

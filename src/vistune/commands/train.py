"""`vistune train`: one training stage (paper §4.2) from a YAML config and/or flags.

    vistune train --config configs/scenes/pretrain.yaml
    vistune train --config configs/scenes/finetune.yaml --max-steps 50 --out runs/ft
    torchrun --nproc_per_node 8 -m vistune.cli train --config configs/paper/finetune.yaml

Every TrainConfig setting (its ModelConfig's fields included, named flat) is a flag (`--lr`, `--per-device-batch`, `--no-group-by-length`,
...); flags override the file. Progress (with ETA) goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from vistune.commands.flags import add_dataclass_flags
from vistune.train.config import SETTINGS, TrainConfig, load_config

HELP = "train a stage (pretrain: projector; finetune: projector + LLM or LoRA)"


def add_arguments(parser: argparse.ArgumentParser, only: frozenset[str] | None = None) -> None:
    """`--config` and a flag per TrainConfig field (or per field in `only`); a flag left
    out is None, so the file's value stands."""
    parser.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
    by_stage = {
        f.name: "stage default" for f in dataclasses.fields(TrainConfig) if f.default is None
    }
    by_stage["template"] = "stage default"
    add_dataclass_flags(parser, TrainConfig, only=only, given_only=True, default_text=by_stage)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vistune.train.loop import train

    overrides = {name: getattr(args, name) for name in SETTINGS}
    cfg = load_config(args.config, overrides)
    main = int(os.environ.get("RANK", "0")) == 0
    bars: dict[str, tqdm] = {}

    def say(message: str) -> None:
        if main:
            tqdm.write(f"vistune train: {message}", file=sys.stderr)

    def on_features(done: int, total: int) -> None:
        if "features" not in bars:
            bars["features"] = tqdm(
                total=total, desc="features", unit="img", file=sys.stderr, disable=not main
            )
        bar = bars["features"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def on_step(record: dict, total: int) -> None:
        if "steps" not in bars:
            bars["steps"] = tqdm(
                total=total,
                initial=record["step"] - 1,
                desc=cfg.stage,
                unit="step",
                file=sys.stderr,
                disable=not main,
            )
        bar = bars["steps"]
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        bar.update(1)

    try:
        result = train(cfg, say=say, on_step=on_step, on_features=on_features)
    finally:
        for bar in bars.values():
            bar.close()
    if main:
        skipped = sum(result.skipped.values())
        print(f"model: {result.model_dir}")
        print(
            f"steps: {result.steps}  final loss: {result.loss:.4f}  "
            f"samples: {result.samples}  skipped: {skipped} {dict(result.skipped)}  "
            f"padding share: {result.padding_share:.1%}"
        )
    return 0

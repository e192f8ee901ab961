"""`vistune demo`: the whole LLaVA recipe on the built-in scenes with the packaged weights.

    vistune demo --out runs/demo

weights -> scenes -> instruction data (rules teacher: brief for stage 1; conversation,
detail and complex for stage 2, paper §3) -> stage-1 training (projector only) -> stage-2
training (projector + LLM, §4.2) -> exact-answer evaluation on held-out scenes -> one chat
answer. Each step prints the `vistune` command it runs, so the demo doubles as a recipe.
A step whose output already exists is skipped, so an interrupted demo resumes where it
stopped, a training stage from its last checkpoint (`--force` redoes everything, clearing
the demo's training folders first).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vistune.errors import VistuneError

FIRST_VAL_IMAGE = "<first held-out image>"
"""Stands for an image that exists only once the scenes are rendered."""

HELP = "run the whole recipe (data, two training stages, evaluation, chat) on built-in scenes"


@dataclass(frozen=True)
class Step:
    title: str
    argv: list[str]
    done: Path
    """The step is skipped when this file exists."""
    train_out: Path | None = None
    """A training step's output folder: resumed when it has checkpoints, cleared by --force."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="working folder (default: runs/demo)")
    parser.add_argument("--images", type=int, default=400, help="scenes to render (default: 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain-epochs", type=int, default=3, help="stage-1 passes (default: 3)"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="stage-2 passes (default: 1)"
    )
    parser.add_argument(
        "--max-steps", type=int, default=0, help="cap each stage's steps (0: no cap)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=20, help="held-out scenes to evaluate (default: 20)"
    )
    parser.add_argument(
        "--image-size", type=int, default=112, help="image side: 112 gives 64 image tokens"
    )
    parser.add_argument("--force", action="store_true", help="redo steps whose output exists")


def steps(args: argparse.Namespace) -> list[Step]:
    """The recipe, as the commands a user would type."""
    out = Path(args.out)
    scenes, data = out / "scenes", out / "data"
    pretrain, finetune = out / "pretrain", out / "finetune"
    cap = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    common_train = ["--image-folder", str(scenes), "--precision", "bf16", "--seed", str(args.seed)]
    return [
        Step("convert the packaged weights", ["weights"], out / ".never"),
        Step(
            "render built-in scenes (COCO layout)",
            ["scenes", "--n", str(args.images), "--seed", str(args.seed), "--out", str(scenes)],
            scenes / "annotations" / "instances_val.json",
        ),
        Step(
            "stage-1 data: captions as brief descriptions (naive expansion, §3)",
            [
                "datagen",
                "--coco",
                str(scenes),
                "--split",
                "train",
                "--types",
                "brief",
                "--teacher",
                "rules",
                "--out",
                str(data / "brief.json"),
            ],
            data / "brief.json",
        ),
        Step(
            "stage-2 data: conversation, detail, complex reasoning (rules teacher)",
            [
                "datagen",
                "--coco",
                str(scenes),
                "--split",
                "train",
                "--types",
                "conversation,detail,complex",
                "--teacher",
                "rules",
                "--out",
                str(data / "instruct.json"),
            ],
            data / "instruct.json",
        ),
        Step(
            "stage 1: align the projector (vision tower and LLM frozen)",
            [
                "train",
                "--stage",
                "pretrain",
                "--init",
                "default",
                "--data",
                str(data / "brief.json"),
                "--out",
                str(pretrain),
                "--image-size",
                str(args.image_size),
                "--epochs",
                str(args.pretrain_epochs),
                "--batch-size",
                "32",
                "--per-device-batch",
                "16",
                "--lr",
                "2e-3",
                *common_train,
                *cap,
            ],
            pretrain / "model" / "config.json",
            train_out=pretrain,
        ),
        Step(
            "stage 2: tune projector + LLM on instruction data",
            [
                "train",
                "--stage",
                "finetune",
                "--init",
                str(pretrain),
                "--data",
                str(data / "instruct.json"),
                "--out",
                str(finetune),
                "--epochs",
                str(args.finetune_epochs),
                "--batch-size",
                "16",
                "--per-device-batch",
                "16",
                "--lr",
                "2e-5",
                *common_train,
                *cap,
            ],
            finetune / "model" / "config.json",
            train_out=finetune,
        ),
        Step(
            "evaluate on held-out scenes (exact answers per skill)",
            [
                "eval",
                "scenes",
                "--coco",
                str(scenes),
                "--split",
                "val",
                "--images",
                str(args.eval_images),
                "--model",
                str(finetune / "model"),
                "--out",
                str(out / "eval"),
            ],
            out / "eval" / "report.json",
        ),
        Step(
            "chat with the tuned model about a held-out image",
            [
                "chat",
                "--model",
                str(finetune / "model"),
                "--image",
                FIRST_VAL_IMAGE,
                "--prompt",
                "What shapes are in the image?",
            ],
            out / ".never",
        ),
    ]


def _first_val_image(scenes: Path) -> str:
    images = sorted((scenes / "val").glob("*.png"))
    if not images:
        raise VistuneError(f"no rendered validation images in {scenes / 'val'}")
    return str(images[0])


def run(args: argparse.Namespace, call: Callable[[list[str]], int] | None = None) -> int:
    if call is None:
        from vistune.cli import main as call
    plan = steps(args)
    started = time.monotonic()
    for number, step in enumerate(plan, 1):
        argv = step.argv
        if FIRST_VAL_IMAGE in argv:
            argv = [
                _first_val_image(Path(args.out) / "scenes") if a == FIRST_VAL_IMAGE else a
                for a in argv
            ]
        if step.done.exists() and not args.force:
            print(
                f"[{number}/{len(plan)}] {step.title}: done already ({step.done})", file=sys.stderr
            )
            continue
        argv = _resume_or_restart(step, argv, args.force)
        command = "vistune " + " ".join(shlex.quote(a) for a in argv)
        print(f"\n[{number}/{len(plan)}] {step.title}\n$ {command}", file=sys.stderr, flush=True)
        code = call(argv)
        if code != 0:
            raise VistuneError(f"demo step {number} failed (exit {code}): {command}")
    _summary(Path(args.out), time.monotonic() - started)
    return 0


def _resume_or_restart(step: Step, argv: list[str], force: bool) -> list[str]:
    """A training step whose folder has checkpoints (an earlier demo stopped in it, or
    finished it): `train` refuses such a folder without --resume, so resume it, or under
    --force clear it and train from the start."""
    from vistune.train.checkpoint import latest_checkpoint

    if step.train_out is None or latest_checkpoint(step.train_out) is None:
        return argv
    if force:
        print(f"--force: clearing {step.train_out}", file=sys.stderr)
        shutil.rmtree(step.train_out)
        return argv
    return [*argv, "--resume"]


def _summary(out: Path, seconds: float) -> None:
    report = out / "eval" / "report.json"
    print(f"\nDemo finished in {seconds / 60:.1f} min. Outputs in {out}/", file=sys.stderr)
    if report.is_file():
        accuracy = json.loads(report.read_text()).get("accuracy", {})
        cells = ", ".join(f"{k} {v:.1f}%" for k, v in accuracy.items() if v is not None)
        print(f"Held-out scene accuracy: {cells}")
    print(f"Chat with it: vistune chat --model {out / 'finetune' / 'model'} --image IMAGE")

"""`vistune demo`: which steps run, and how a training stage with checkpoints is resumed or
redone (with a stand-in for the `vistune` commands, so no model is trained)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vistune.commands import demo


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--out", str(out), *extra])


class FakeVistune:
    """Records each argv and writes the output the real command would leave."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if argv[0] == "scenes":
            (out / "val").mkdir(parents=True, exist_ok=True)
            (out / "val" / "000.png").write_bytes(b"")
            (out / "annotations").mkdir(exist_ok=True)
            (out / "annotations" / "instances_val.json").write_text("{}")
        elif argv[0] == "datagen":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("[]")
        elif argv[0] == "train":
            checkpoint = out / "checkpoints" / "step-00000003"
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "state.json").write_text("{}")
            (out / "model").mkdir(exist_ok=True)
            (out / "model" / "config.json").write_text("{}")
        elif argv[0] == "eval":
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps({"accuracy": {"all": 50.0}}))
        return 0

    def commands(self) -> list[str]:
        return [argv[0] for argv in self.calls]

    def train(self, stage: str) -> list[str]:
        return next(a for a in self.calls if a[0] == "train" and stage in a)


def test_demo_runs_every_step_then_skips_what_is_done(tmp_path):
    fake = FakeVistune()
    assert demo.run(_args(tmp_path / "demo"), call=fake) == 0
    assert fake.commands() == [
        "weights", "scenes", "datagen", "datagen", "train", "train", "eval", "chat"
    ]  # fmt: skip
    assert "--resume" not in fake.train("pretrain")
    assert fake.calls[-1][fake.calls[-1].index("--image") + 1].endswith("val/000.png")
    again = FakeVistune()
    demo.run(_args(tmp_path / "demo"), call=again)
    assert again.commands() == ["weights", "chat"]


def test_demo_resumes_a_training_stage_it_stopped_in(tmp_path):
    out = tmp_path / "demo"
    checkpoint = out / "pretrain" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    fake = FakeVistune()
    demo.run(_args(out), call=fake)
    assert fake.train("pretrain")[-1] == "--resume"
    assert "--resume" not in fake.train("finetune")


def test_demo_force_clears_finished_training_stages(tmp_path):
    out = tmp_path / "demo"
    demo.run(_args(out), call=FakeVistune())
    (out / "pretrain" / "old.txt").write_text("from the first run")
    fake = FakeVistune()
    demo.run(_args(out, "--force"), call=fake)
    assert "--resume" not in fake.train("pretrain") + fake.train("finetune")
    assert not (out / "pretrain" / "old.txt").exists()
    assert (out / "pretrain" / "model" / "config.json").is_file()

"""`vistune demo`: which steps run, and how a training stage with checkpoints is resumed or
redone (with a stand-in for the `vistune` commands, so no model is trained)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vistune import cli
from vistune.commands import demo


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--out", str(out), *extra])


SCENE = {
    "images": [{"id": 1, "file_name": "000000000001.png", "width": 64, "height": 64}],
    "annotations": [{"image_id": 1, "category_id": 9, "bbox": [1, 1, 9, 9], "kind": "star",
                     "color": "red", "size_name": "small", "position": "top left"}],
    "categories": [{"id": 9, "name": "star"}],
}  # fmt: skip


def no_answers(model_dir, images, astronaut):
    return [{"image": str(p), "question": "What is there?", "answer": "a red star"} for p in images]


class FakeVistune:
    """Records each argv and writes the output the real command would leave."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> int:
        # the real parser of the command: a flag the demo passes that the command lacks fails
        parser = argparse.ArgumentParser(exit_on_error=False)
        cli._load(argv[0]).add_arguments(parser)
        parser.parse_args(argv[1:])
        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if argv[0] == "scenes":
            (out / "val").mkdir(parents=True, exist_ok=True)
            (out / "val" / "000000000001.png").write_bytes(b"")
            (out / "annotations").mkdir(exist_ok=True)
            (out / "annotations" / "instances_val.json").write_text(json.dumps(SCENE))
        elif argv[0] in ("datagen", "mix"):
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
            report = {"accuracy": {"all": 50.0, "count": 40.0}, "chance": {"all": 20.0},
                      "counts": {"all": 10}}  # fmt: skip
            (out / "report.json").write_text(json.dumps(report))
        return 0

    def commands(self) -> list[str]:
        return [argv[0] for argv in self.calls]

    def train(self, stage: str) -> list[str]:
        return next(a for a in self.calls if a[0] == "train" and stage in a)


def test_demo_runs_every_step_then_skips_what_is_done(tmp_path):
    fake = FakeVistune()
    assert demo.run(_args(tmp_path / "demo"), call=fake, answer=no_answers) == 0
    assert fake.commands() == [
        "weights", "scenes", "datagen", "datagen", "datagen", "datagen", "mix", "train", "train",
        "eval", "eval", "eval", "chat",
    ]  # fmt: skip
    # stage 2 trains on Table 4's conv + 5% detail + 10% complex, mixed from one file a type
    mix = next(a for a in fake.calls if a[0] == "mix")
    assert mix[mix.index("--ratios") + 1] == "conv+5%detail+10%complex"
    assert [a.split("=")[0] for a in mix if "=" in a] == ["conversation", "detail", "complex"]
    finetune_data = fake.train("finetune")[fake.train("finetune").index("--data") + 1]
    assert finetune_data == mix[mix.index("--out") + 1]
    pretrain = fake.train("pretrain")
    assert pretrain[pretrain.index("--projector") + 1] == "mlp2x_gelu_pos"
    finetune = fake.train("finetune")  # the grounded projector learns slower than the LLM
    assert finetune[finetune.index("--lr") + 1] == "2e-4"
    assert finetune[finetune.index("--projector-lr") + 1] == "5e-5"
    assert pretrain[pretrain.index("--image-size") + 1] == "126"
    assert "--resume" not in fake.train("pretrain")
    assert fake.train("pretrain")[fake.train("pretrain").index("--ground") + 1].endswith("scenes")
    assert "--ground-where" in fake.train("pretrain")
    evals = [a for a in fake.calls if a[0] == "eval"]
    assert ["--control", "shuffled"] == evals[1][-2:]
    assert ["--template", "chat_template"] == evals[2][-2:]
    assert fake.calls[-1][fake.calls[-1].index("--image") + 1].endswith("val/000000000001.png")
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| tuned model (stage 1 + 2) | 40.00 | - | - | - | - | - | 50.00 |" in report
    assert "| chance | - | - | - | - | - | - | 20.00 |" in report
    assert "`000000000001.png` (really: red star): *What is there?* a red star" in report
    again = FakeVistune()
    demo.run(_args(tmp_path / "demo"), call=again, answer=no_answers)
    assert again.commands() == ["weights", "chat"]


def test_demo_ablation_trains_a_conversation_only_model_and_tabulates_it(tmp_path):
    fake = FakeVistune()
    demo.run(_args(tmp_path / "demo", "--ablation"), call=fake, answer=no_answers)
    trains = [a for a in fake.calls if a[0] == "train"]
    assert len(trains) == 3 and trains[2][trains[2].index("--data") + 1].endswith(
        "conversation.json"
    )
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Ablation" in report and (tmp_path / "demo" / "ablation.png").is_file()


def test_demo_resumes_a_training_stage_it_stopped_in(tmp_path):
    out = tmp_path / "demo"
    checkpoint = out / "pretrain" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    fake = FakeVistune()
    demo.run(_args(out), call=fake, answer=no_answers)
    assert fake.train("pretrain")[-1] == "--resume"
    assert "--resume" not in fake.train("finetune")


def test_demo_force_clears_finished_training_stages(tmp_path):
    out = tmp_path / "demo"
    demo.run(_args(out), call=FakeVistune(), answer=no_answers)
    (out / "pretrain" / "old.txt").write_text("from the first run")
    fake = FakeVistune()
    demo.run(_args(out, "--force"), call=fake, answer=no_answers)
    assert "--resume" not in fake.train("pretrain") + fake.train("finetune")
    assert not (out / "pretrain" / "old.txt").exists()
    assert (out / "pretrain" / "model" / "config.json").is_file()

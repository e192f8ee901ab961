"""A run killed with SIGKILL and resumed ends with the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.train.conftest import tiny_args

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vistune.cli", "train", "--config", str(config), *extra]


def _last_step(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [
        json.loads(line)["step"] for line in log.read_text().splitlines() if line.endswith("}")
    ]
    return max(steps, default=0)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "projector.safetensors"))
    tensors.update(load_file(str(model_dir / "llm" / "model.safetensors")))
    return tensors


def test_sigkill_and_resume_matches_uninterrupted(tiny_data, tiny_model_dir, tmp_path):
    feats = tmp_path / "feats"
    common = dict(stage="finetune", epochs=12, save_every=5, keep_last=2, lr=1e-3)
    configs = {}
    for name in ("full", "killed"):
        args = tiny_args(tiny_data, tmp_path / name, feats, tiny_model_dir, **common)
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(args))
    # A fresh process like the killed and resumed ones: the same thread count (float sums)
    # and the same compiled kernels (vistune.train.llama_cpu), with no state left by other
    # tests in this one.
    full = subprocess.run(_command(configs["full"]), env=_env(), capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(
        _command(configs["killed"]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 60
    while _last_step(log) < 11 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(log)
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints and all(name.startswith("step-") for name in checkpoints)
    assert not (tmp_path / "killed" / "model").exists()

    resumed = subprocess.run(
        _command(configs["killed"], "--resume"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    expected = _weights(tmp_path / "full" / "model")
    got = _weights(tmp_path / "killed" / "model")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 73)), f"log not continuous after kill at {killed_at}"
    assert len(list((tmp_path / "killed" / "checkpoints").iterdir())) == 2


def test_resume_refuses_a_new_data_order_and_names_schedule_changes(tmp_path):
    import pytest

    from vistune.errors import VistuneError
    from vistune.train.checkpoint import check_resumed_config
    from vistune.train.config import TrainConfig

    saved = TrainConfig(stage="finetune", batch_size=8, lr=1e-3).to_dict()
    said = []
    check_resumed_config(dict(saved), saved, tmp_path, said.append)
    assert said == []
    for change in ({"batch_size": 16}, {"seed": 7}, {"group_by_length": False}):
        with pytest.raises(VistuneError, match=f"resuming with {next(iter(change))} "):
            check_resumed_config({**saved, **change}, saved, tmp_path, said.append)
    # these change the samples' tokens: they were blamed on the data ("written for different
    # data") when the fingerprint was compared first
    for change in ({"template": "plain"}, {"model_max_length": 60},
                   {"scienceqa_answer_format": "answer-first"}):  # fmt: skip
        key = next(iter(change))
        with pytest.raises(VistuneError, match=f"resuming with {key} .* change the samples"):
            check_resumed_config({**saved, **change}, saved, tmp_path, said.append)
    check_resumed_config({**saved, "lr": 5e-4, "max_steps": 90}, saved, tmp_path, said.append)
    assert said == ["resuming with changed settings: lr 0.001 -> 0.0005, max_steps 0 -> 90"]
    said.clear()
    check_resumed_config({**saved, "precision": "fp32", "image_folder": "/elsewhere"}, saved,
                         tmp_path, said.append)  # fmt: skip
    assert said == ["resuming with changed settings: precision 'bf16' -> 'fp32', "
                    "image_folder '' -> '/elsewhere'"]  # fmt: skip


def test_resume_refuses_a_different_model(tmp_path):
    """What the trainable tensors are, or the frozen weights they go with, may not change
    on a resume: a new lora_r gave a size-mismatch traceback, a new init was taken silently
    (the checkpoint's projector then went with another LLM)."""
    import pytest

    from vistune.errors import VistuneError
    from vistune.train.checkpoint import check_resumed_config
    from vistune.train.config import TrainConfig

    tuned = TrainConfig(stage="finetune", lora_r=4, init="runs/pretrain").to_dict()
    fresh = TrainConfig(stage="pretrain", init="default").to_dict()
    changes = [
        (tuned, {"lora_r": 8}),
        (tuned, {"lora_alpha": 32.0}),
        (tuned, {"init": "runs/other"}),
        (tuned, {"stage": "pretrain", "lora_r": 0}),
        (fresh, {"llm": "/models/other"}),
        (fresh, {"projector": "linear"}),
        (fresh, {"vision_layer": -1}),
        (fresh, {"image_size": 112}),
    ]
    for saved, change in changes:
        key = next(iter(change))
        with pytest.raises(VistuneError, match=f"resuming with {key} .* the model"):
            check_resumed_config({**saved, **change}, saved, tmp_path, print)
    # the settings of a fresh model do nothing when `init` is a model directory
    said: list[str] = []
    check_resumed_config({**tuned, "image_size": 112}, tuned, tmp_path, said.append)
    assert said == []


def test_a_checkpoint_written_again_replaces_the_old_one_whole(tmp_path):
    """The same step saved twice used to delete the old folder before the new one was in
    place; an unreadable newest checkpoint names the one a resume can fall back to."""
    import pytest
    import torch

    from vistune.errors import VistuneError
    from vistune.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    def save(step: int, value: float):
        weights = {"w": torch.full((2,), value)}
        optim = {"state": {"w": {"step": 1.0}}, "param_groups": [{"lr": 0.1}]}
        return save_checkpoint(tmp_path, step, weights, optim, {"fingerprint": "f"}, 3)

    save(1, 1.0)
    save(2, 2.0)
    final = save(2, 3.0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert torch.equal(load_checkpoint(final)[0]["w"], torch.full((2,), 3.0))
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-00000001", "step-00000002"]
    (final / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VistuneError, match="move it away to resume from step-00000001"):
        load_checkpoint(final)

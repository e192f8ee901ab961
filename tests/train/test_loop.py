"""Training loop on the tiny model: stages, outputs, skips, NaN stop."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.train.conftest import tiny_args
from vistune.train.config import TrainConfig
from vistune.train.loop import train


def test_pretrain_trains_projector_only(tiny_data, tiny_model_dir, tmp_path):
    cfg = TrainConfig(**tiny_args(tiny_data, tmp_path / "out", tmp_path / "feats", tiny_model_dir))
    result = train(cfg)
    assert result.steps == 6  # 24 samples / batch 4
    model_dir = tmp_path / "out" / "model"
    before = load_file(str(tiny_model_dir / "projector.safetensors"))
    after = load_file(str(model_dir / "projector.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    llm_before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    llm_after = load_file(str(model_dir / "llm" / "model.safetensors"))
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "padding_share"} <= set(log[0])

"""The exported model card: base models, data, every stage's resolved config, eval tables."""

from __future__ import annotations

import json
import shutil

from vistune.cli import main
from vistune.interop.model_card import PACKAGED, training_stages


def fake_runs(root, model_dir):
    """pre/ (stage 1 from default) and ft/ (stage 2 from pre), each with model/ and its
    train_config.json, as `vistune train` leaves them."""
    shutil.copytree(model_dir, root / "pre" / "model")
    shutil.copytree(model_dir, root / "ft" / "model")
    pre = {"stage": "pretrain", "data": "data/brief.json", "init": "default", "vision": "",
           "llm": "", "template": "plain", "max_steps": 0}  # fmt: skip
    ft = {"stage": "finetune", "data": "data/mix.json", "init": str(root / "pre"),
          "vision": "", "llm": "", "template": "chat_template", "max_steps": 300}  # fmt: skip
    (root / "pre" / "train_config.json").write_text(json.dumps(pre))
    (root / "ft" / "train_config.json").write_text(json.dumps(ft))
    return root / "ft" / "model"


def test_stages_are_found_through_init_first_stage_first(make_model_dir, tmp_path):
    model = fake_runs(tmp_path, make_model_dir("clip"))
    stages = training_stages(model)
    assert [s.config["stage"] for s in stages] == ["pretrain", "finetune"]
    assert training_stages(make_model_dir("clip")) == []  # no run folder around it


def test_export_card_carries_bases_data_configs_and_eval(make_model_dir, tmp_path, capsys):
    model = fake_runs(tmp_path, make_model_dir("clip"))
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "report.md").write_text(
        "# Scenes accuracy\n\n| skill | acc |\n| --- | --- |\n| colour | 73.0 |\n"
    )
    out = tmp_path / "hf"
    assert main(["export", "--model", str(model), "--out", str(out), "--eval", str(evals)]) == 0
    card = (out / "README.md").read_text()
    assert PACKAGED["vision"] in card and PACKAGED["llm"] in card
    assert "data/brief.json" in card and "data/mix.json" in card
    assert '"stage": "pretrain"' in card and '"max_steps": 300' in card
    assert "### Scenes accuracy" in card and "| colour | 73.0 |" in card
    assert "| vision_feature_select_strategy | default |" in card


def test_export_refuses_an_eval_folder_without_a_report(make_model_dir, tmp_path, capsys):
    args = ["export", "--model", str(make_model_dir("clip")), "--out", str(tmp_path / "hf")]
    assert main([*args, "--eval", str(tmp_path)]) == 2
    assert "report.md: missing" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()

"""TrainConfig: stage defaults, validation, YAML + flags, the stage plans."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from vistune.cli import main
from vistune.commands.flags import field_help
from vistune.config import ModelConfig
from vistune.errors import DataError
from vistune.train.config import SETTINGS, TrainConfig, load_config
from vistune.train.optim import lr_at
from vistune.train.stages import STAGES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_stage_defaults_follow_the_paper():
    pre, fine = TrainConfig(stage="pretrain"), TrainConfig(stage="finetune")
    assert (pre.lr, pre.batch_size, pre.epochs) == (2e-3, 128, 1)
    assert (fine.lr, fine.batch_size, fine.epochs) == (2e-5, 32, 3)
    assert (pre.model.template, fine.model.template) == ("plain", "vicuna_v0")
    assert pre.plan == {"vision": "frozen", "projector": "train", "llm": "frozen"}
    assert fine.plan["llm"] == "train"
    assert TrainConfig(stage="finetune", lora_r=8).plan == STAGES["finetune_lora"]


def test_validation_names_the_problem():
    with pytest.raises(ValueError, match="unknown stage 'pretrian'; valid: pretrain, finetune"):
        TrainConfig(stage="pretrian")
    with pytest.raises(ValueError, match="per_device_batch must be at least 1"):
        TrainConfig(per_device_batch=0)
    with pytest.raises(ValueError, match="lora_r applies to the finetune stage"):
        TrainConfig(stage="pretrain", lora_r=4)
    # checked here, not once the model has loaded
    with pytest.raises(ValueError, match="unknown template 'vicuna'; valid: vicuna_v0,"):
        TrainConfig.from_settings({"template": "vicuna"})
    with pytest.raises(ValueError, match="unknown scienceqa_answer_format 'answer_first'"):
        TrainConfig(scienceqa_answer_format="answer_first")


def test_yaml_with_flags_overriding(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: finetune\nlr: 2e-4\nbatch_size: 16\nmax_steps: 5\n")
    cfg = load_config(path, {"max_steps": 9, "lr": None})
    assert (cfg.stage, cfg.lr, cfg.batch_size, cfg.max_steps, cfg.epochs) == (
        "finetune",
        2e-4,
        16,
        9,
        3,
    )
    path.write_text("stage: pretrain\nlearning_rate: 1\n")
    with pytest.raises(DataError, match=r"c.yaml: unknown config keys: learning_rate"):
        load_config(path, {})
    path.write_text("lr: fast\n")
    with pytest.raises(DataError, match="lr must be a float"):
        load_config(path, {})


def test_a_refused_setting_names_where_it_came_from(tmp_path):
    """A flag's mistake was reported against the config file, which did not hold it."""
    path = tmp_path / "c.yaml"
    path.write_text("stage: pretrain\nlr: 2e-3\n")
    with pytest.raises(DataError, match=r"^--stage finetun: unknown stage 'finetun'"):
        load_config(path, {"stage": "finetun", "max_steps": 3})
    with pytest.raises(DataError, match=r"^--per-device-batch 0: per_device_batch must be"):
        load_config(path, {"per_device_batch": 0})
    path.write_text("stage: pretrain\nepochs: 0\n")
    with pytest.raises(DataError, match=r"c.yaml: epochs must be at least 1"):
        load_config(path, {"max_steps": 3})
    path.write_text("stage: pretrain\n")
    with pytest.raises(DataError, match=r"^--lora-r 8: lora_r applies to the finetune stage"):
        load_config(path, {"lora_r": 8})
    path.write_text("stage: finetune\n")  # each flag fine alone, refused together
    with pytest.raises(DataError, match=r"c.yaml with the flags given: lora_r applies"):
        load_config(path, {"lora_r": 8, "stage": "pretrain"})
    with pytest.raises(DataError, match=r"^flags: unknown stage"):
        load_config(None, {"stage": "finetun"})


def test_every_field_is_a_documented_flag(tmp_path, capsys):
    docs = field_help(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(field_help(ModelConfig)) == {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in SETTINGS:  # the ModelConfig's fields flat: --projector, not --model.projector
        assert "--" + name.replace("_", "-") in text, name
    assert "--model " not in text and "model settings:" in text
    assert "--no-group-by-length" in text and "(default: stage default)" in text
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: config file not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["scenes/pretrain", "scenes/finetune", "paper/pretrain", "paper/finetune"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", {})
    assert cfg.stage == name.split("/")[1]
    if name.startswith("paper"):
        assert cfg.lr == (2e-3 if cfg.stage == "pretrain" else 2e-5)
        assert cfg.batch_size == (128 if cfg.stage == "pretrain" else 32)


def test_cosine_schedule_with_warmup():
    total, peak = 100, 1.0
    lrs = [lr_at(s, total, peak, 0.03) for s in range(total)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[3] == pytest.approx(1.0)
    middle = 3 + (total - 3) // 2
    assert lrs[middle] == pytest.approx(0.5 * (1 + math.cos(math.pi * (middle - 3) / 97)))
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] < 0.01


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", 0, "image_size must be at least 1, got 0"),
        ("image_size", -14, "image_size must be at least 1, got -14"),
        ("lora_dropout", 1.5, r"lora_dropout must be in \[0, 1\), got 1.5"),
        ("lora_alpha", 0.0, "lora_alpha must be above 0 and finite, got 0.0"),
        ("lr", math.inf, "lr must be above 0 and finite, got inf"),
        ("projector_lr", 0.0, "projector_lr must be above 0 and finite, got 0.0"),
        ("projector_lr", math.nan, "projector_lr must be above 0 and finite, got nan"),
        ("max_grad_norm", math.nan, "max_grad_norm must be >= 0, got nan"),
        ("weight_decay", math.nan, "weight_decay must be at least 0 and finite, got nan"),
        ("weight_decay", math.inf, "weight_decay must be at least 0 and finite, got inf"),
        ("threads", -1, "threads must be at least 0, got -1"),
        ("gain_samples", -2, "gain_samples must be at least 0, got -2"),
        ("seed", -1, r"seed must be in \[0, 2\*\*63\), got -1"),
        ("seed", 2**63, r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_bad_numbers_are_refused_naming_the_field(field, value, message):
    """Each of these used to pass and then gave a traceback (image_size with init default,
    lora_dropout, a NaN weight_decay), NaN weights (a NaN max_grad_norm) or an update by
    an infinite lr before the NaN stop."""
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_settings({"stage": "finetune", field: value})


def test_a_large_seed_shuffles():
    """A seed above ~1.8e13 overflowed the shuffle's 64-bit generator seed at step 1."""
    from vistune.data.dataset import global_batches

    lengths = list(range(40))
    big = global_batches(lengths, 4, seed=2**63 - 1, epoch=2)
    assert sorted(i for batch in big for i in batch) == list(range(40))


def test_a_value_of_the_wrong_kind_names_its_field(tmp_path):
    path = tmp_path / "c.yaml"
    for text, message in (
        ("lr: [1]\n", "lr must be a float"),
        ("epochs: {a: 1}\n", "epochs must"),
        # an empty value is YAML's null: it used to reach the run (a traceback for init and
        # seed) or switch a setting off silently (group_by_length, lora_merge, plot)
        ("init:\n", "init must be a str, got an empty value"),
        ("seed:\n", "seed must be a int, got an empty value"),
        ("group_by_length:\n", "group_by_length must be a bool, got an empty value"),
    ):
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            load_config(path, {})


def test_fresh_model_settings_the_tower_refuses_are_one_line(
    tiny_clip_dir, tiny_llm_dir, tiny_data, tmp_path, capsys
):
    parts = ["--init", "default", "--vision", str(tiny_clip_dir), "--llm", str(tiny_llm_dir)]
    for flag, value, message in (
        ("--vision-layer", "10", "vision layer 10 out of range for a 2-layer tower"),
        ("--image-size", "0", "image_size must be at least 1"),
        ("--image-size", "13", "image_size 13 is smaller than the vision tower's patch 14"),
    ):
        argv = ["train", *parts, "--data", str(tiny_data), "--out", str(tmp_path / "out")]
        assert main([*argv, "--features", str(tmp_path / "f"), flag, value]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_fresh_model_settings_with_a_model_directory_must_match_it(tiny_model_dir, tmp_path):
    """A model directory keeps its own projector, tower layer and image size: a different
    value given with it is refused (it used to be ignored silently), an equal one passes."""
    init, size = str(tiny_model_dir), 28  # the tiny model's image side (tests/conftest.py)
    with pytest.raises(
        DataError, match=r"^flags: image_size 64 \(the model's: 28\): .*init default"
    ):
        load_config(None, {"init": init, "stage": "finetune", "image_size": 64})
    path = tmp_path / "stage2.yaml"
    path.write_text(f"stage: finetune\ninit: {init}\nprojector: linear\nvision_layer: -1\n")
    with pytest.raises(DataError, match=r"stage2.yaml: projector 'linear' \(the model's: "
                       r"'mlp2x_gelu'\), vision_layer -1 \(the model's: -2\)"):  # fmt: skip
        load_config(path, {})
    same = {"init": init, "image_size": size, "projector": "mlp2x_gelu"}
    assert load_config(None, same).model.image_size == size
    # not given: the model's own value, not the dataclass default (see the round trip test)
    assert load_config(None, {"init": init}).model.image_size == size
    # an unreadable directory is left for building the model to report
    assert load_config(None, {"init": str(tmp_path), "image_size": 64}).model.image_size == 64


def test_a_stage_2_config_saved_beside_its_output_loads_again(tiny_model_dir, tmp_path):
    """train_config.json of a run from a model directory held the fresh-model defaults
    (image_size 224, mlp2x_gelu), not the model's own settings: it misstated what was
    trained, and `--config train_config.json` was refused for differing from the model."""
    init = str(tiny_model_dir)
    cfg = load_config(None, {"init": init, "stage": "finetune", "projector": "mlp2x_gelu"})
    assert cfg.model == ModelConfig(image_size=28, projector="mlp2x_gelu", vision_layer=-2)
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps(cfg.to_dict()))  # as train/report.py writes it
    assert load_config(saved, {}) == cfg


def test_a_refused_model_setting_names_the_flag_that_gave_it(tiny_model_dir, tmp_path):
    """A flag's value was blamed on the config file read beside it."""
    path = tmp_path / "stage2.yaml"
    path.write_text(f"stage: finetune\ninit: {tiny_model_dir}\n")
    with pytest.raises(DataError, match=r"^flags: image_size 64 \(the model's: 28\)"):
        load_config(path, {"image_size": 64})
    path.write_text(f"stage: finetune\ninit: {tiny_model_dir}\nprojector: linear\n")
    with pytest.raises(
        DataError,
        match=r"stage2.yaml: projector 'linear' \(the model's: 'mlp2x_gelu'\), "
        r"--image-size 64 \(the model's: 28\)",
    ):
        load_config(path, {"image_size": 64, "lr": None})


def test_the_model_settings_are_one_model_config(tmp_path):
    """TrainConfig holds a ModelConfig (it repeated six of its fields, copied across by
    hand); the settings stay flat keys, so YAML files, flags and train_config.json keep
    their names, and a file written before the change loads to the same run."""
    cfg = TrainConfig.from_settings(
        {"stage": "finetune", "projector": "linear", "image_size": 112, "vision_layer": -1}
    )
    assert cfg.model == ModelConfig(projector="linear", image_size=112, vision_layer=-1,
                                    template="vicuna_v0")  # fmt: skip
    assert TrainConfig.from_settings({"image_size": 56}).model.template == "plain"
    assert TrainConfig.from_settings({"template": None}).model == TrainConfig().model
    flat = cfg.to_dict()
    assert "model" not in flat and flat["projector"] == "linear" and flat["template"] == "vicuna_v0"
    assert list(flat) == list(SETTINGS)
    assert TrainConfig.from_settings(flat) == cfg
    # an older run's train_config.json: every TrainConfig field flat, as dataclasses.asdict wrote it
    old = tmp_path / "train_config.json"
    old.write_text(json.dumps({**flat, "template": "vicuna_v0", "image_size": 112}))
    assert load_config(old, {}) == cfg
    assert load_config(old, {"image_size": 224}).model.image_size == 224
    with pytest.raises(ValueError, match="unknown settings: model"):
        TrainConfig.from_settings({"model": {"projector": "linear"}})
    path = tmp_path / "c.yaml"
    path.write_text("projector: mlp3x\n")
    with pytest.raises(DataError, match=r"c.yaml: unknown projector 'mlp3x'; valid: linear,"):
        load_config(path, {})

"""What cannot be exported or imported is refused: one line naming what is supported and
what is wrong, exit 2, and nothing (not even a temporary) left at OUT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vistune.cli import main
from vistune.interop.hf_export import export_hf


def refused(argv: list[str], out: Path, capsys) -> str:
    """Run `vistune argv`; check exit 2, one stderr line, no OUT and no temporaries."""
    capsys.readouterr()  # what the test's own setup printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vistune: error: ") and "\n" not in err, err
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    return err


@pytest.mark.parametrize(
    ("projector", "reason"),
    [("linear", "two layers with an activation between"), ("mlp2x_gelu_pos", "position table")],
)
def test_export_refuses_projectors_without_a_place(
    projector, reason, make_model_dir, tmp_path, capsys
):
    model = make_model_dir("clip", projector=projector)
    err = refused(
        ["export", "--model", str(model), "--out", str(tmp_path / "o")], tmp_path / "o", capsys
    )
    assert reason in err and "supported: mlp2x_gelu" in err


def test_export_refuses_dinov2_registers(tiny_llm_dir, tmp_path, capsys):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from vistune.config import ModelConfig
    from vistune.model.llava import LlavaModel

    tower = tmp_path / "reg"
    config = Dinov2WithRegistersConfig(image_size=28, patch_size=14, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       mlp_ratio=2, num_register_tokens=4)  # fmt: skip
    Dinov2WithRegistersModel(config).save_pretrained(tower)
    model = LlavaModel.from_parts(tower, tiny_llm_dir, ModelConfig(image_size=28)).save(
        tmp_path / "model"
    )
    err = refused(
        ["export", "--model", str(model), "--out", str(tmp_path / "o")], tmp_path / "o", capsys
    )
    assert "dinov2_with_registers" in err and "supported: clip, siglip, dinov2" in err


def test_export_refuses_clip_at_another_size(make_model_dir, tmp_path, capsys):
    model = make_model_dir("clip", image_size=56)
    err = refused(
        ["export", "--model", str(model), "--out", str(tmp_path / "o")], tmp_path / "o", capsys
    )
    assert "image_size 56" in err and "own 28" in err


def test_export_never_overwrites_a_foreign_folder(make_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--model", str(make_model_dir("clip")), "--out", str(out)]) == 2
    assert "not a vistune HF export" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_replaces_its_own_earlier_export(make_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    for _ in range(2):
        assert main(["export", "--model", str(make_model_dir("clip")), "--out", str(out)]) == 0
    assert "max |diff|" in capsys.readouterr().out


@pytest.fixture
def hf_copy(make_model_dir, tmp_path_factory):
    """A fresh copy of a tiny export to break."""
    base = tmp_path_factory.getbasetemp() / "hf_export_base"
    if not base.exists():
        export_hf(make_model_dir("clip"), base)
    copy = tmp_path_factory.mktemp("broken") / "hf"
    shutil.copytree(base, copy)
    return copy


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_import_hf_refuses_another_architecture(hf_copy, tmp_path, capsys):
    _edit_config(hf_copy, model_type="blip-2")
    err = refused(
        ["import", "--from", "hf", str(hf_copy), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "'blip-2' is not supported; supported: llava" in err


def test_import_hf_refuses_missing_and_pickled_weights(hf_copy, tmp_path, capsys):
    weights = hf_copy / "model.safetensors"
    weights.rename(hf_copy / "pytorch_model.bin")
    err = refused(
        ["import", "--from", "hf", str(hf_copy), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "model.safetensors" in err and "pytorch_model.bin" in err and "never loaded" in err


def test_import_hf_refuses_a_projector_that_does_not_fit(hf_copy, tmp_path, capsys):
    tensors = load_file(str(hf_copy / "model.safetensors"))
    tensors["model.multi_modal_projector.linear_1.weight"] = torch.zeros(32, 16)
    save_file(tensors, str(hf_copy / "model.safetensors"), metadata={"format": "pt"})
    err = refused(
        ["import", "--from", "hf", str(hf_copy), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "mismatched: model.multi_modal_projector.linear_1.weight" in err


def test_import_hf_refuses_concatenated_layers(hf_copy, tmp_path, capsys):
    _edit_config(hf_copy, vision_feature_layer=[-2, -1])
    err = refused(
        ["import", "--from", "hf", str(hf_copy), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "several layers" in err


def test_import_refuses_to_overwrite_a_foreign_folder(hf_copy, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["import", "--from", "hf", str(hf_copy), "--out", str(out)]) == 2
    assert "not a vistune model directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _official(path: Path, tower: Path, tiny_builders, **config) -> Path:
    """A minimal official-layout folder (see test_import.build_official for the full one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_builders.build_tiny_tokenizer()
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    tensors = dict(LlamaForCausalLM(text).state_dict())
    tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()
    tensors.update({"model.mm_projector.0.weight": torch.zeros(48, 32),
                    "model.mm_projector.0.bias": torch.zeros(48),
                    "model.mm_projector.2.weight": torch.zeros(48, 48),
                    "model.mm_projector.2.bias": torch.zeros(48)})  # fmt: skip
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    settings = {**text.to_dict(), "model_type": "llava_llama", "mm_vision_tower": str(tower),
                "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                "image_aspect_ratio": "pad", **config}  # fmt: skip
    (path / "config.json").write_text(json.dumps(settings))
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "llava_mpt"}, "'llava_mpt' is not supported; supported: llava_llama"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_projector_type": "mlp3x_gelu"}, "supported: linear, mlp2x_gelu"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio 'anyres'"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "give --vision-tower DIR"),
    ],
)
def test_import_llava_refuses_what_it_cannot_map(
    config, message, tiny_clip_dir, tiny_builders, tmp_path, capsys
):
    src = _official(tmp_path / "src", tiny_clip_dir, tiny_builders, **config)
    err = refused(
        ["import", "--from", "llava", str(src), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert message in err


def test_import_llava_refuses_a_projector_that_does_not_fit(
    tiny_clip_dir, tiny_builders, tmp_path, capsys
):
    src = _official(tmp_path / "src", tiny_clip_dir, tiny_builders)
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.mm_projector.0.weight"] = torch.zeros(48, 16)  # mm_hidden 16, tower 32
    save_file(tensors, str(src / "model.safetensors"))
    err = refused(
        ["import", "--from", "llava", str(src), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "'0.weight' has shape (48, 16)" in err and "hidden 32" in err


def test_import_llava_refuses_pickled_weights(tiny_clip_dir, tiny_builders, tmp_path, capsys):
    src = _official(tmp_path / "src", tiny_clip_dir, tiny_builders)
    (src / "model.safetensors").rename(src / "pytorch_model-00001-of-00002.bin")
    err = refused(
        ["import", "--from", "llava", str(src), "--out", str(tmp_path / "o")],
        tmp_path / "o",
        capsys,
    )
    assert "pickle" in err

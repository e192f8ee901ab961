"""VisionTower: any supported HF tower, layer selection, token selection, frozen."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from vistune.errors import ModelDirError
from vistune.model.vision import VISION_MODELS, VisionTower

SIZE = 28
TOWER_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _pixels(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def registers_dir(tmp_path_factory):
    """A tiny DINOv2 with 3 register tokens: sequence [CLS, reg x 3, 4 patches]."""
    path = tmp_path_factory.mktemp("dinov2_reg")
    torch.manual_seed(2)
    config = Dinov2WithRegistersConfig(
        image_size=SIZE, patch_size=14, mlp_ratio=2, num_register_tokens=3, **TOWER_SIZES
    )
    Dinov2WithRegistersModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full_clip_dir(tmp_path_factory, tiny_builders):
    """A tiny full CLIPModel (text + vision) dir, model_type "clip"."""
    path = tmp_path_factory.mktemp("clip_full")
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, **TOWER_SIZES),
        vision_config=dict(image_size=SIZE, patch_size=14, **TOWER_SIZES),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tiny_builders.write_preprocessor_config(path, [0.5] * 3, [0.5] * 3, SIZE)
    return path, model


@pytest.mark.parametrize(
    "fixture, hf_class, has_cls",
    [
        ("tiny_clip_dir", CLIPVisionModel, True),
        ("tiny_dinov2_dir", Dinov2Model, True),
        ("tiny_siglip_dir", SiglipVisionModel, False),
    ],
)
def test_default_layer_is_penultimate_hidden_state_patches(request, fixture, hf_class, has_cls):
    path = request.getfixturevalue(fixture)
    tower = VisionTower.from_pretrained(path)
    assert isinstance(tower.model, hf_class)
    assert (tower.hidden_size, tower.patch_size) == (32, 14)
    reference = hf_class.from_pretrained(path).eval()
    pixels = _pixels()
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    expected = hidden[:, 1:] if has_cls else hidden  # SigLIP has no CLS: patch = all
    features = tower(pixels)
    assert features.shape == (2, 4, 32) == (2, tower.num_tokens(SIZE), 32)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)


def test_cls_patch_keeps_cls_first_and_one_more_token(tiny_clip_dir):
    patch = VisionTower.from_pretrained(tiny_clip_dir, select="patch")
    both = VisionTower.from_pretrained(tiny_clip_dir, select="cls_patch")
    assert (patch.num_tokens(SIZE), both.num_tokens(SIZE)) == (4, 5)
    assert (patch.num_tokens(224), both.num_tokens(224)) == (256, 257)
    pixels = _pixels()
    a, b = patch(pixels), both(pixels)
    assert b.shape == (2, 5, 32)
    torch.testing.assert_close(b[:, 1:], a, rtol=0, atol=0)
    reference = CLIPVisionModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        cls = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 0]
    torch.testing.assert_close(b[:, 0], cls, rtol=0, atol=0)


def test_other_layers_select_their_hidden_state(tiny_dinov2_dir):
    reference = Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    pixels = _pixels(1)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
    for layer in (-1, 0, 1):
        tower = VisionTower.from_pretrained(tiny_dinov2_dir, layer=layer)
        torch.testing.assert_close(tower(pixels), hidden[layer][:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        VisionTower.from_pretrained(tiny_dinov2_dir, layer=5)


def test_dinov2_registers_are_dropped(registers_dir):
    patch = VisionTower.from_pretrained(registers_dir, select="patch")
    both = VisionTower.from_pretrained(registers_dir, select="cls_patch")
    assert patch.num_registers == 3
    pixels = _pixels()
    reference = Dinov2WithRegistersModel.from_pretrained(registers_dir).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == 1 + 3 + 4
    torch.testing.assert_close(patch(pixels), hidden[:, 4:], rtol=0, atol=0)
    expected = torch.cat([hidden[:, :1], hidden[:, 4:]], dim=1)
    torch.testing.assert_close(both(pixels), expected, rtol=0, atol=0)
    assert both.num_tokens(SIZE) == 5


@pytest.fixture(scope="module")
def full_siglip_dir(tmp_path_factory):
    """A tiny full SiglipModel (text + vision) dir, model_type "siglip"."""
    path = tmp_path_factory.mktemp("siglip_full")
    torch.manual_seed(4)
    config = SiglipConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, eos_token_id=1, **TOWER_SIZES),
        vision_config=dict(image_size=SIZE, patch_size=14, **TOWER_SIZES),
    )
    model = SiglipModel(config).eval()
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize(
    "fixture, model_type, hf_class, first",
    [
        ("full_clip_dir", "clip", CLIPVisionModel, 1),
        ("full_siglip_dir", "siglip", SiglipVisionModel, 0),
    ],
)
def test_vision_part_of_a_full_dir(request, fixture, model_type, hf_class, first):
    path, full = request.getfixturevalue(fixture)
    tower = VisionTower.from_pretrained(path)
    assert tower.model_type == model_type and isinstance(tower.model, hf_class)
    pixels = _pixels()
    with torch.no_grad():
        hidden = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(tower(pixels), hidden[:, first:], rtol=0, atol=0)


def test_siglip_has_no_cls_to_keep(tiny_siglip_dir):
    with pytest.raises(ValueError, match="no CLS token"):
        VisionTower.from_pretrained(tiny_siglip_dir, select="cls_patch")


def test_other_image_sizes_interpolate_positions(tiny_clip_dir, tiny_siglip_dir):
    for path in (tiny_clip_dir, tiny_siglip_dir):
        tower = VisionTower.from_pretrained(path)
        assert tower(_pixels(1, size=42)).shape == (1, 9, 32) == (1, tower.num_tokens(42), 32)


def test_tower_is_frozen_and_stays_in_eval(tiny_clip_dir):
    tower = VisionTower.from_pretrained(tiny_clip_dir)
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.model.training
    pixels = _pixels().requires_grad_(True)
    assert not tower(pixels).requires_grad


def test_unknown_model_type_lists_supported(tmp_path, tiny_clip_dir):
    for name in ("model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    config["model_type"] = "vit"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="'vit' is not supported") as info:
        VisionTower.from_pretrained(tmp_path)
    for model_type in VISION_MODELS:
        assert model_type in str(info.value)


def test_missing_dir_and_missing_weights(tmp_path, tiny_clip_dir):
    with pytest.raises(ModelDirError, match="not found"):
        VisionTower.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(ModelDirError, match=r"missing vision tower weights \(model.safetensors\)"):
        VisionTower.from_pretrained(tmp_path)

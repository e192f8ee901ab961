"""export -> import gives back the model: the same settings and the same logits."""

from __future__ import annotations

import pytest
import torch

from vistune.interop.hf_export import export_hf
from vistune.interop.hf_import import import_hf
from vistune.model.llava import LlavaModel


@pytest.mark.parametrize(
    ("tower", "settings"),
    [
        ("clip", {"template": "vicuna_v0", "image_aspect": "crop"}),
        ("siglip", {"template": "chat_template", "vision_layer": -1}),
        ("dinov2", {"template": "plain", "vision_select": "cls_patch", "image_aspect": "resize"}),
    ],
)
def test_export_then_import_gives_the_same_logits(
    tower, settings, make_model_dir, interop, tmp_path
):
    original_dir = make_model_dir(tower, **settings)
    export_hf(original_dir, tmp_path / "hf")
    back_dir = import_hf(tmp_path / "hf", tmp_path / "back")
    original, back = LlavaModel.load(original_dir), LlavaModel.load(back_dir)
    assert back.config == original.config
    assert back.projector_trained
    image = interop.make_image()
    ours = interop.vistune_logits(original, image)  # (1, L, V)
    again = interop.vistune_logits(back, image)  # (1, L, V + 1): the <image> row
    assert again.shape[-1] == ours.shape[-1] + 1
    torch.testing.assert_close(again[..., : ours.shape[-1]], ours, atol=1e-5, rtol=0)


def test_a_second_round_trip_changes_nothing_more(make_model_dir, tmp_path):
    """An imported export already has <image>: exporting it again adds no row."""
    export_hf(make_model_dir("clip"), tmp_path / "hf1")
    back = import_hf(tmp_path / "hf1", tmp_path / "back1")
    result = export_hf(back, tmp_path / "hf2")
    assert result["image_token_id"] == 600
    hf1 = (tmp_path / "hf1" / "model.safetensors").read_bytes()
    hf2 = (tmp_path / "hf2" / "model.safetensors").read_bytes()
    assert len(hf1) == len(hf2)

"""`export_hf`: transformers loads the folder with no custom code, and it computes what
vistune computes (logits, greedy tokens, answers), on every supported tower."""

from __future__ import annotations

import json

import pytest
import torch

from vistune.config import GenerationConfig
from vistune.interop.hf_export import export_hf
from vistune.model.llava import LlavaModel
from vistune.serve.engine import Engine

TOWER_SELECTS = [
    ("clip", "patch", "default"),
    ("clip", "cls_patch", "full"),
    ("siglip", "patch", "full"),
    ("dinov2", "patch", "default"),
    ("dinov2", "cls_patch", "full"),
]


@pytest.mark.parametrize(("tower", "select", "strategy"), TOWER_SELECTS)
def test_export_loads_in_transformers_with_equal_logits(
    tower, select, strategy, make_model_dir, interop, tmp_path
):
    model_dir = make_model_dir(tower, vision_select=select)
    export_hf(model_dir, tmp_path / "hf")
    hf, processor = interop.load_hf(tmp_path / "hf")
    assert type(processor).__name__ == "LlavaProcessor"
    assert hf.config.vision_feature_select_strategy == strategy
    assert hf.config.vision_feature_layer == -2
    assert hf.config.vision_config.model_type.startswith(tower)
    model = LlavaModel.load(model_dir)
    image = interop.make_image()
    ours = interop.vistune_logits(model, image)  # (1, L, V)
    inputs = interop.hf_inputs(processor, image)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert theirs.shape[:2] == ours.shape[:2]
    torch.testing.assert_close(theirs[..., : ours.shape[-1]], ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("aspect", ["pad", "resize", "crop"])
def test_processor_pixels_equal_vistunes(aspect, make_model_dir, interop, tmp_path):
    model_dir = make_model_dir("clip", image_aspect=aspect)
    export_hf(model_dir, tmp_path / "hf")
    _, processor = interop.load_hf(tmp_path / "hf")
    model = LlavaModel.load(model_dir)
    for size in [(41, 23), (23, 57), (28, 28), (300, 200)]:
        image = interop.make_image(*size)
        theirs = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(theirs, model.image_processor([image]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("template", ["chat_template", "vicuna_v0", "plain"])
def test_greedy_tokens_and_answers_match_vistune_chat(template, make_model_dir, interop, tmp_path):
    model_dir = make_model_dir("clip", template=template)
    export_hf(model_dir, tmp_path / "hf")
    hf, processor = interop.load_hf(tmp_path / "hf")
    engine = Engine(LlavaModel.load(model_dir), dtype=torch.float32)
    image = interop.make_image()
    question = [{"role": "user", "content": interop.QUESTION}]
    ours = engine.complete([(question, image)], GenerationConfig(max_new_tokens=32))[0]
    inputs = interop.hf_inputs(processor, image)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.finish_reason == "length"  # a random model never stops: all 32 compared
    assert new == ours.token_ids and len(new) == 32
    text = processor.decode(new, skip_special_tokens=True)
    for stop in engine.stop:
        text = text.split(stop)[0]
    assert text.strip() == ours.text


def test_processor_chat_template_builds_vistunes_prompt(make_model_dir, tmp_path, interop):
    from vistune.data.conversation import build_prompt, tokenize_prompt
    from vistune.serve.engine import with_image

    for template in ("chat_template", "vicuna_v0", "plain"):
        model_dir = make_model_dir("clip", template=template)
        out = export_hf(model_dir, tmp_path / template)["out"]
        _, processor = interop.load_hf(out)
        model = LlavaModel.load(model_dir)
        history = [
            {"role": "user", "content": "Describe it."},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "And the circle?"},
        ]
        hf_history = [dict(history[0], content=[{"type": "image"},
                                               {"type": "text", "text": "Describe it."}]),
                      *history[1:]]  # fmt: skip
        ours = build_prompt(with_image(history, interop.make_image()), model.tokenizer, template)
        assert processor.apply_chat_template(hf_history, add_generation_prompt=True) == ours
        ids = tokenize_prompt(with_image(history, interop.make_image()), model.tokenizer, template)
        assert len(ids) > 1


def test_export_writes_card_sidecar_and_suppresses_the_image_token(make_model_dir, tmp_path):
    result = export_hf(make_model_dir("clip"), tmp_path / "hf")
    out = tmp_path / "hf"
    assert result["max_logit_diff"] <= 1e-4
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md",
            "vistune.json", "generation_config.json", "chat_template.jinja"} <= names  # fmt: skip
    assert not list(out.glob("*.bin")) and not list(out.glob("*.py"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    assert config["image_token_index"] == result["image_token_id"] == 600  # the tokenizer's next
    assert config["text_config"]["vocab_size"] == 601  # one zero row for <image>
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == [600]
    card = (out / "README.md").read_text()
    for heading in ("## Base models", "## Data", "## Training configs", "## Evaluation"):
        assert heading in card


def test_export_to_bf16_writes_bf16_weights(make_model_dir, tmp_path):
    from safetensors import safe_open

    export_hf(make_model_dir("clip"), tmp_path / "hf", dtype="bf16")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}

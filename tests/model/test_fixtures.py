"""The shared tiny fixtures (tests/conftest.py) are what their docstrings say."""

from __future__ import annotations

import json


def test_tiny_llm_dir_has_weights_tokenizer_and_chat_template(tiny_llm_dir, tiny_builders):
    from transformers import AutoTokenizer

    config = json.loads((tiny_llm_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 2)
    assert (tiny_llm_dir / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    assert len(tok) == config["vocab_size"] == 600
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is in the image?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt)["input_ids"]
    assert tok.decode(ids) == prompt
    # Deterministic: a rebuilt tokenizer gives the same ids.
    assert tiny_builders.build_tiny_tokenizer()(prompt)["input_ids"] == ids


def test_tiny_towers_have_their_model_types_and_preprocessor(
    tiny_clip_dir, tiny_dinov2_dir, tiny_siglip_dir
):
    for path, model_type in [
        (tiny_clip_dir, "clip_vision_model"),
        (tiny_dinov2_dir, "dinov2"),
        (tiny_siglip_dir, "siglip_vision_model"),
    ]:
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == model_type
        assert config["hidden_size"] == 32 and config["patch_size"] == 14
        pre = json.loads((path / "preprocessor_config.json").read_text())
        assert len(pre["image_mean"]) == len(pre["image_std"]) == 3


def test_tiny_model_has_four_image_tokens(tiny_model, tiny_builders):
    assert tiny_model.config.image_size == tiny_builders.image_size
    assert tiny_model.num_image_tokens == 4
    assert tiny_model.llm_hidden_size == 32
    assert not tiny_model.projector_trained

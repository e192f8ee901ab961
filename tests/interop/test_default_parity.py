"""Parity on the packaged default weights (DINOv2 ViT-S/14 at 224 px + SmolLM2-135M, its
chat template): transformers' Llava on the export answers as `vistune chat` does."""

from __future__ import annotations

import pytest
import torch

from vistune.config import GenerationConfig
from vistune.interop.hf_export import export_hf
from vistune.model import load_model
from vistune.serve.engine import Engine

QUESTION = "Describe the image in detail."


@pytest.mark.slow
def test_default_model_export_matches_vistune_chat(default_weights, interop, tmp_path):
    model = load_model("default")
    model_dir = model.save(tmp_path / "model", frozen_llm=True)
    result = export_hf(model_dir, tmp_path / "hf")
    assert result["vision_feature_select_strategy"] == "default"
    hf, processor = interop.load_hf(tmp_path / "hf")
    image = interop.make_image(320, 200)

    ours = interop.vistune_logits(model, image, QUESTION)  # (1, L, V)
    inputs = interop.hf_inputs(processor, image, QUESTION)
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert (theirs[..., : ours.shape[-1]] - ours).abs().max() <= 1e-4

    # the answer `vistune chat` gives (it ends at <|im_end|>), word for word
    engine = Engine(model, dtype=torch.float32)
    question = [{"role": "user", "content": QUESTION}]
    answer = engine.complete([(question, image)], GenerationConfig(max_new_tokens=32))[0]
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[: len(answer.token_ids)] == answer.token_ids
    assert processor.decode(new, skip_special_tokens=True).strip() == answer.text

    # 32 greedy tokens past the end-of-turn (min_new_tokens masks EOS): vistune's argmax,
    # EOS masked the same way, picks each of them
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 32
    prompt = interop.vistune_ids(model, image, QUESTION)
    with torch.no_grad():
        logits = model(input_ids=[prompt + new], pixel_values=model.image_processor([image])).logits
    steps = logits[0, -33:-1].clone()  # (32, V): the logits that chose each new token
    eos = hf.generation_config.eos_token_id
    steps[:, eos if isinstance(eos, list) else [eos]] = -torch.inf
    assert steps.argmax(-1).tolist() == new

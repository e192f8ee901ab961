"""The default model on the packaged weights (DINOv2 ViT-S/14 + SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch

from vistune.data.conversation import IMAGE_TOKEN_ID, tokenize_prompt
from vistune.model import load_model


@pytest.mark.slow
def test_default_model_runs_on_a_photo(default_weights):
    from PIL import Image
    from skimage import data as skdata

    model = load_model("default")
    assert model.projector_trained is False
    assert model.vision.model_type == "dinov2" and model.vision.hidden_size == 384
    assert model.llm_hidden_size == 576 and model.num_image_tokens == 256
    pixels = model.image_processor([Image.fromarray(skdata.astronaut())])
    assert pixels.shape == (1, 3, 224, 224)
    messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    ids = tokenize_prompt(messages, model.tokenizer, model.config.template)
    assert ids.count(IMAGE_TOKEN_ID) == 1
    with torch.no_grad():
        features = model.image_features(pixels)
        out = model([ids], image_features=features)
    assert features.shape == (1, 256, 384)
    assert out.logits.shape == (1, len(ids) - 1 + 256, model.llm.config.vocab_size)
    assert torch.isfinite(out.logits).all()

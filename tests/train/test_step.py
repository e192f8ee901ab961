"""The training step's batched splice equals LlavaModel.splice; its loss equals the model's."""

from __future__ import annotations

import torch

from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.train.step import TrainStep, batch_inputs

IDS = [
    [5, 6, IMAGE_TOKEN_ID, 7, 8, 9],
    [10, 11, 12],  # text only
    [IMAGE_TOKEN_ID, 13, 14, 15, 16, 17, 18],
]
LABELS = [
    [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9],
    [IGNORE_INDEX, 11, 12],
    [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 15, 16, 17, 18],
]


def test_batch_inputs_equals_model_splice(tiny_model):
    torch.manual_seed(0)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    with torch.no_grad():
        embeds = tiny_model.project(feats)
        ref = tiny_model.splice(IDS, embeds, LABELS, padding_side="right")
        inputs, mask, labels, positions = batch_inputs(
            IDS, LABELS, embeds, tiny_model.llm.get_input_embeddings()
        )
    assert inputs.shape == ref.inputs_embeds.shape == (3, 10, tiny_model.llm_hidden_size)
    torch.testing.assert_close(inputs, ref.inputs_embeds, rtol=0, atol=0)
    assert torch.equal(mask, ref.attention_mask)
    assert torch.equal(labels, ref.labels)
    assert torch.equal(positions, ref.position_ids)


def test_step_loss_is_the_models_summed_token_loss(tiny_model):
    torch.manual_seed(1)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    with torch.no_grad():
        total = TrainStep(tiny_model)(IDS, LABELS, feats)
        mean = tiny_model(IDS, image_features=feats, labels=LABELS).loss
    count = sum(sum(lab != IGNORE_INDEX for lab in labs[1:]) for labs in LABELS)
    torch.testing.assert_close(total / count, mean, rtol=1e-5, atol=1e-6)

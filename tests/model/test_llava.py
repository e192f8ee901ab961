"""LlavaModel: splicing, mixed batches, padding, loss, gradients, any tower + Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from vistune.config import ModelConfig
from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.model.llava import LlavaModel

TINY_IMAGE_SIZE = 28  # the tiny towers' image side (tests/conftest.py): 4 patch tokens
IMG = IMAGE_TOKEN_ID
IGN = IGNORE_INDEX


def _embeds(model: LlavaModel, m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, model.num_image_tokens, model.llm_hidden_size, generator=g)  # (M, T, D)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)


def _tok_embed(model: LlavaModel, ids: list[int]) -> torch.Tensor:
    return model.llm.get_input_embeddings()(torch.tensor(ids))


def test_llama_llm_and_clip_tower(tiny_model):
    assert isinstance(tiny_model.llm, LlamaForCausalLM)
    assert tiny_model.vision.model_type == "clip_vision_model"
    assert tiny_model.image_processor is not None


def test_splice_mixed_batch_right_padding(tiny_model):
    ids = [[5, 6, IMG, 7], [8, 9], [IMG, 10, 11]]
    labels = [[IGN, IGN, IGN, 7], [IGN, 9], [IGN, 10, 11]]
    T = tiny_model.num_image_tokens
    with torch.no_grad():
        features = tiny_model.image_features(_pixels(2))  # (2, T, Dv)
        image_embeds = tiny_model.project(features)  # (2, T, D)
        sp = tiny_model.splice(ids, image_embeds, labels)
    lengths = [3 + T, 2, 2 + T]
    L = max(lengths)
    assert sp.inputs_embeds.shape == (3, L, 32)
    assert sp.attention_mask.tolist() == [[1] * n + [0] * (L - n) for n in lengths]
    assert sp.position_ids[0].tolist() == list(range(L))
    assert sp.position_ids[1, :2].tolist() == [0, 1]
    e = sp.inputs_embeds
    with torch.no_grad():
        # Sample 0: two text tokens, the first image's T rows, one text token, then padding.
        torch.testing.assert_close(e[0, :2], _tok_embed(tiny_model, [5, 6]), rtol=0, atol=0)
        torch.testing.assert_close(e[0, 2 : 2 + T], image_embeds[0], rtol=0, atol=0)
        torch.testing.assert_close(e[0, 2 + T], _tok_embed(tiny_model, [7])[0], rtol=0, atol=0)
        # Sample 1 has no image and takes none; sample 2 takes the second row.
        torch.testing.assert_close(e[1, :2], _tok_embed(tiny_model, [8, 9]), rtol=0, atol=0)
        torch.testing.assert_close(e[2, :T], image_embeds[1], rtol=0, atol=0)
        torch.testing.assert_close(
            e[2, T : T + 2], _tok_embed(tiny_model, [10, 11]), rtol=0, atol=0
        )
    assert sp.labels[0].tolist() == [IGN] * (2 + T) + [7]
    assert sp.labels[1].tolist() == [IGN, 9] + [IGN] * (L - 2)
    assert sp.labels[2].tolist() == [IGN] * T + [10, 11] + [IGN] * (L - 2 - T)
    assert e[1, 2:].abs().sum() == 0


def test_splice_left_padding_for_generation(tiny_model):
    ids = [[5, IMG, 6], [7]]
    image_embeds = _embeds(tiny_model, 1)
    T = tiny_model.num_image_tokens
    with torch.no_grad():
        sp = tiny_model.splice(ids, image_embeds, padding_side="left")
    L = 2 + T
    assert sp.labels is None
    assert sp.attention_mask[1].tolist() == [0] * (L - 1) + [1]
    assert sp.position_ids[1, -1].item() == 0
    assert sp.position_ids[0].tolist() == list(range(L))
    with torch.no_grad():
        torch.testing.assert_close(sp.inputs_embeds[1, -1], _tok_embed(tiny_model, [7])[0])
        torch.testing.assert_close(sp.inputs_embeds[0, 1 : 1 + T], image_embeds[0])


def test_splice_rejects_mismatched_inputs(tiny_model):
    rows = _embeds(tiny_model, 1)
    with pytest.raises(ValueError, match="only 1 image rows"):
        tiny_model.splice([[IMG, 1], [IMG, 2]], rows)
    with pytest.raises(ValueError, match="1 image rows given but the batch has 0"):
        tiny_model.splice([[1, 2]], rows)
    with pytest.raises(ValueError, match="sample 0: 2 input ids but 1 labels"):
        tiny_model.splice([[1, 2]], None, labels=[[1]])
    with pytest.raises(ValueError, match="unknown padding_side 'middle'; valid: right, left"):
        tiny_model.splice([[1, 2]], None, padding_side="middle")


def test_loss_equals_hand_computed_cross_entropy(tiny_model):
    ids = [[5, IMG, 6, 7, 8]]
    labels = [[IGN, IGN, IGN, 7, 8]]
    features = torch.randn(1, tiny_model.num_image_tokens, 32)
    with torch.no_grad():
        out = tiny_model(ids, image_features=features, labels=labels)
        T = tiny_model.num_image_tokens
        # Full sequence: 5, image x T, 6, 7, 8. Token 7 sits at 2 + T, token 8 at 3 + T.
        logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        expected = -(logp[1 + T, 7] + logp[2 + T, 8]) / 2
    assert out.logits.shape == (1, 4 + T, 600)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0


def test_padded_batch_matches_single_samples(tiny_model):
    ids = [[5, IMG, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    labels = [[IGN, IGN, 6, 7], [IGN, IGN, IGN, IGN, 12, 13, 14, 15]]
    features = torch.randn(1, tiny_model.num_image_tokens, 32)
    with torch.no_grad():
        batch = tiny_model(ids, image_features=features, labels=labels)
        first = tiny_model(ids[:1], image_features=features, labels=labels[:1])
        second = tiny_model(ids[1:], labels=labels[1:])
    n = first.logits.shape[1]
    torch.testing.assert_close(batch.logits[0, :n], first.logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch.logits[1], second.logits[0], rtol=1e-4, atol=1e-4)
    # Batch loss is the mean over all 6 supervised tokens (2 in the first, 4 in the second).
    expected = (2 * first.loss + 4 * second.loss) / 6
    assert batch.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_no_supervised_tokens_gives_zero_loss(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    out = model([[5, IMG, 6]], image_features=torch.randn(1, 4, 32), labels=[[IGN, IGN, IGN]])
    assert out.loss.item() == 0.0 and out.loss.requires_grad


def test_pixels_go_through_the_frozen_tower(tiny_model):
    pixels = _pixels(1)
    ids = [[5, IMG, 6]]
    with torch.no_grad():
        a = tiny_model(ids, pixel_values=pixels).logits
        b = tiny_model(ids, image_features=tiny_model.image_features(pixels)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        tiny_model(ids, image_features=torch.zeros(1, 4, 32), pixel_values=pixels)


def test_projector_gets_gradient_and_tower_does_not(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    assert not model.vision.training
    out = model([[5, IMG, 6, 7]], pixel_values=_pixels(1), labels=[[IGN, IGN, 6, 7]])
    out.loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


@pytest.mark.parametrize("tower", ["tiny_dinov2_dir", "tiny_siglip_dir"])
@pytest.mark.parametrize("projector, select", [("linear", "patch"), ("mlp2x_gelu", "cls_patch")])
def test_any_tower_with_llama(request, tower, projector, select, tiny_llm_dir):
    if tower == "tiny_siglip_dir" and select == "cls_patch":
        select = "patch"  # SigLIP has no CLS (tested in test_vision)
    config = ModelConfig(image_size=TINY_IMAGE_SIZE, projector=projector, vision_select=select)
    model = LlavaModel.from_parts(request.getfixturevalue(tower), tiny_llm_dir, config)
    T = 5 if select == "cls_patch" else 4
    assert model.num_image_tokens == T
    with torch.no_grad():
        features = model.image_features(_pixels(2))
        out = model([[IMG, 5], [6, IMG, 7]], image_features=features)
    assert features.shape == (2, T, 32)
    assert out.logits.shape == (2, T + 2, 600)


def test_projector_is_seeded_and_leaves_global_rng_alone(tiny_clip_dir, tiny_llm_dir):
    config = ModelConfig(image_size=TINY_IMAGE_SIZE)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = LlavaModel.from_parts(tiny_clip_dir, tiny_llm_dir, config, seed=0)
    after = torch.rand(1)
    b = LlavaModel.from_parts(tiny_clip_dir, tiny_llm_dir, config, seed=0)
    c = LlavaModel.from_parts(tiny_clip_dir, tiny_llm_dir, config, seed=1)
    assert torch.equal(before, after)
    assert torch.equal(a.projector[0].weight, b.projector[0].weight)
    assert not torch.equal(a.projector[0].weight, c.projector[0].weight)

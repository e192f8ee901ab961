"""The training step splices like LlavaModel.splice and its loss equals the model's."""

from __future__ import annotations

import copy

import torch

from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.model.splice import splice
from vistune.train.step import TrainStep

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


def test_training_splice_equals_model_splice(tiny_model):
    """The step's options (a sparse embedding gradient, lengths rounded up) change no value:
    the same inputs as LlavaModel.splice, then padding."""
    torch.manual_seed(0)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    embed = tiny_model.llm.get_input_embeddings()
    with torch.no_grad():
        embeds = tiny_model.project(feats)
        ref = tiny_model.splice(IDS, embeds, LABELS, padding_side="right")
        exact = splice(IDS, embeds, embed, LABELS, sparse=True)
        rounded = splice(IDS, embeds, embed, LABELS, multiple=16, sparse=True)
    assert ref.inputs_embeds.shape == (3, 10, tiny_model.llm_hidden_size)
    for got in (exact, rounded):
        n = ref.inputs_embeds.shape[1]
        torch.testing.assert_close(got.inputs_embeds[:, :n], ref.inputs_embeds, rtol=0, atol=0)
        assert torch.equal(got.attention_mask[:, :n], ref.attention_mask)
        assert torch.equal(got.labels[:, :n], ref.labels)
        assert torch.equal(got.position_ids[:, :n], ref.position_ids)
    assert rounded.inputs_embeds.shape[1] == 16
    assert (
        rounded.inputs_embeds[:, 10:].abs().sum() == 0 and rounded.attention_mask[:, 10:].sum() == 0
    )
    assert (rounded.labels[:, 10:] == IGNORE_INDEX).all()


def test_step_loss_is_the_models_summed_token_loss(tiny_model):
    torch.manual_seed(1)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    with torch.no_grad():
        total = TrainStep(tiny_model)(IDS, LABELS, feats)
        mean = tiny_model(IDS, image_features=feats, labels=LABELS).loss
    count = sum(sum(lab != IGNORE_INDEX for lab in labs[1:]) for labs in LABELS)
    torch.testing.assert_close(total / count, mean, rtol=1e-5, atol=1e-6)


def test_supervised_logits_only_match_the_full_path(tiny_model):
    """Without the CPU kernels the step runs the LM head only at the positions that predict
    a supervised token, with the full path's (LlavaModel.forward's) loss and gradients."""
    img, ign = IMAGE_TOKEN_ID, IGNORE_INDEX
    ids = [[5, img, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    labels = [[ign, ign, 6, 7], [ign, ign, ign, ign, 12, 13, 14, 15]]
    features = torch.randn(1, tiny_model.num_image_tokens, 32)
    model = copy.deepcopy(tiny_model).train()
    full = model(ids, image_features=features, labels=labels)
    full.loss.backward()
    full_grads = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad()
    head_rows = []
    hook = model.llm.lm_head.register_forward_hook(lambda _m, _i, out: head_rows.append(out))
    try:
        total = TrainStep(model, fast=False)(ids, labels, features)
    finally:
        hook.remove()
    fast = total / 6
    fast.backward()
    # 6 supervised tokens -> 6 rows of logits, and the same loss and gradients.
    assert [tuple(rows.shape) for rows in head_rows] == [(6, 600)]
    torch.testing.assert_close(fast, full.loss, rtol=1e-5, atol=1e-6)
    for got, want in zip([p.grad for p in model.projector.parameters()], full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sample_losses_are_each_samples_own_loss_on_both_paths(tiny_model):
    """`sample_ce` (what the loop splits by response type) is each sample's CE as if it ran
    alone, and sums to the step's loss, through the CPU kernels and through transformers."""
    torch.manual_seed(2)
    feats = torch.randn(2, tiny_model.num_image_tokens, tiny_model.vision.hidden_size)
    with_image = {0: feats[:1], 1: feats[:0], 2: feats[1:]}
    for fast in (True, False):
        step = TrainStep(tiny_model, fast=fast)
        with torch.no_grad():
            total = step(IDS, LABELS, feats)
            per_sample = step.sample_ce.clone()
            alone = [float(step([IDS[i]], [LABELS[i]], with_image[i])) for i in range(3)]
        assert per_sample.shape == (3,)
        torch.testing.assert_close(per_sample.sum(), total, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_sample, torch.tensor(alone), rtol=1e-4, atol=1e-4)

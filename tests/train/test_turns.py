"""Turns apart in the training step: one packed sample trains exactly as its turns would one
by one, on the CPU kernels and on transformers' modules (loss and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch

from vistune.data.conversation import IGNORE_INDEX as IGN
from vistune.data.conversation import IMAGE_TOKEN_ID as IMG
from vistune.model.splice import splice, turn_mask
from vistune.train.step import TrainStep

# prefix [5, 6, IMG], turn 1 [7, 8, 9], turn 2 [10, 11, 12, 13]
PACKED = [5, 6, IMG, 7, 8, 9, 10, 11, 12, 13]
PACKED_LABELS = [IGN, IGN, IGN, IGN, 8, 9, IGN, 11, 12, 13]
PACKED_TURNS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
ONE = ([5, 6, IMG, 7, 8, 9], [IGN, IGN, IGN, IGN, 8, 9])
TWO = ([5, 6, IMG, 10, 11, 12, 13], [IGN, IGN, IGN, IGN, 11, 12, 13])
PLAIN = ([20, IMG, 21, 22], [IGN, IGN, 21, 22])  # one causal sequence in the same batch


def _grads(step: TrainStep) -> list[torch.Tensor]:
    return [p.grad.clone() for p in step.model.projector.parameters()] + [
        step.model.llm.get_input_embeddings().weight.grad.to_dense().clone()
    ]


def _run(model, ids, labels, feats, turns, fast):
    step = TrainStep(copy.deepcopy(model).train(), fast=fast)
    total = step(ids, labels, feats, turns)
    total.backward()
    return total.detach(), step.sample_ce.clone(), _grads(step)


@pytest.mark.parametrize("fast", [True, False], ids=["cpu_kernels", "transformers"])
def test_packed_turns_train_as_the_turns_one_by_one(tiny_model, fast):
    torch.manual_seed(0)
    t = tiny_model.num_image_tokens
    f1, f2 = torch.randn(1, t, 32), torch.randn(1, t, 32)
    packed = _run(
        tiny_model, [PACKED, PLAIN[0]], [PACKED_LABELS, PLAIN[1]], torch.cat([f1, f2]),
        [PACKED_TURNS, None], fast,
    )  # fmt: skip
    apart = _run(
        tiny_model, [ONE[0], TWO[0], PLAIN[0]], [ONE[1], TWO[1], PLAIN[1]],
        torch.cat([f1, f1, f2]), None, fast,
    )  # fmt: skip
    torch.testing.assert_close(packed[0], apart[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], torch.stack([apart[1][0] + apart[1][1], apart[1][2]]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    for got, want in zip(packed[2], apart[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_turns_differ_from_one_causal_sequence(tiny_model):
    """The mask is what makes the difference: the same ids read causally give another loss."""
    feats = torch.randn(1, tiny_model.num_image_tokens, 32)
    with torch.no_grad():
        step = TrainStep(tiny_model)
        apart = step([PACKED], [PACKED_LABELS], feats, [PACKED_TURNS])
        causal = step([PACKED], [PACKED_LABELS], feats)
    assert abs(float(apart) - float(causal)) > 1e-3


def test_the_cpu_kernels_equal_transformers_with_turns_apart(tiny_model):
    torch.manual_seed(2)
    feats = torch.randn(2, tiny_model.num_image_tokens, 32)
    args = ([PACKED, PLAIN[0]], [PACKED_LABELS, PLAIN[1]], feats, [PACKED_TURNS, None])
    fast, slow = _run(tiny_model, *args, True), _run(tiny_model, *args, False)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(fast[2], slow[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_turn_layout_positions_and_mask(tiny_model):
    t = tiny_model.num_image_tokens
    embed = tiny_model.llm.get_input_embeddings()
    with torch.no_grad():
        out = splice([PACKED], torch.zeros(1, t, tiny_model.llm_hidden_size), embed,
                     [PACKED_LABELS], multiple=16, turns=[PACKED_TURNS])  # fmt: skip
    p = 2 + t  # the prefix: two text tokens and the image's rows
    assert out.turns[0, : p + 7].tolist() == [0] * p + [1] * 3 + [2] * 4
    assert (out.turns[0, p + 7 :] == -1).all()
    assert out.position_ids[0, : p + 7].tolist() == [*range(p), *range(p, p + 3), *range(p, p + 4)]
    allowed = turn_mask(out.turns)[0]
    first_of_two = p + 3
    assert allowed[first_of_two, :p].all() and not allowed[first_of_two, p : p + 3].any()
    assert allowed[first_of_two, first_of_two] and not allowed[p, p + 1]
    with pytest.raises(ValueError, match="never going back"):
        splice([PACKED], torch.zeros(1, t, tiny_model.llm_hidden_size), embed,
               turns=[[0, 0, 0, 2, 2, 2, 1, 1, 1, 1]])  # fmt: skip

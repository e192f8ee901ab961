"""The supervised-token loss: which positions predict a label, and their summed CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vistune.data.conversation import IGNORE_INDEX
from vistune.model.loss import supervised, token_loss

IGN = IGNORE_INDEX


def test_supervised_positions_predict_the_next_label():
    labels = torch.tensor([[IGN, IGN, 7, 8], [IGN, 9, IGN, IGN]])
    keep, targets = supervised(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [7, 8, 9]


def test_token_loss_is_the_summed_cross_entropy_of_the_kept_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10).to(torch.bfloat16)
    labels = torch.tensor([[IGN, IGN, 7, 8], [IGN, 9, IGN, IGN]])
    keep, targets = supervised(labels)
    got = token_loss(logits[keep], targets)
    assert got.dtype == torch.float32
    flat = logits[:, :-1].reshape(-1, 10).float()
    want = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=IGN, reduction="sum")
    torch.testing.assert_close(got, want)


def test_no_supervised_tokens_gives_zero_loss():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    keep, targets = supervised(torch.full((2, 4), IGN))
    loss = token_loss(logits[keep], targets)
    assert loss.item() == 0.0 and loss.requires_grad

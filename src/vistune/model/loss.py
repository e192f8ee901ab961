"""The training objective: next-token cross entropy on the supervised tokens (paper eq. 3).

LLaVA trains the LLM's own auto-regressive loss on the assistant's answers only (Table 2);
every other position (image rows, prompts, padding) is labelled IGNORE_INDEX. Token t's
label is predicted from position t-1, so only the positions in front of a supervised
token need the LM head at all. `token_loss` is that cross entropy, the one definition:
LlavaModel.forward and the training step (vistune.train.step) call it, and
vistune.train.llama_cpu computes the same sum fused with the final norm and the LM head
(tested equal to it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vistune.data.conversation import IGNORE_INDEX


def supervised(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) labels -> the positions that predict a supervised token (B, L) bool (the last
    position never does) and those tokens (N,), in the order `x[keep]` takes rows."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of logits rows (N, V) against their tokens (N,), in fp32.

    With no rows it is 0, still attached to the graph: a step on it is a no-op, not a
    crash. The mean over a batch divides by N (the caller's, across micro-batches)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")

"""The image gain: how much the model reads from the picture (issue 16's measure).

The loss of held-out samples with their own images, against the same samples with the
images swapped among them (each sample gets the next one's image: a derangement). A model
that answers from the picture has a lower loss with its own image; a model that learned
only the wording (the failure docs/LEARNING.md records) has the same loss either way.
Reported in nats per supervised token.

    gain = image_gain(step_module, ids, labels, features)   # {"own", "swapped", "gain"}
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from vistune.data.conversation import IGNORE_INDEX


@torch.no_grad()
def image_gain(
    step_module: torch.nn.Module,
    input_ids: Sequence[list[int]],
    labels: Sequence[list[int]],
    features: torch.Tensor,
    batch: int = 8,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean CE per supervised token with own and with swapped images, and their gap.

    `step_module`: a vistune.train.step.TrainStep (summed CE of a micro-batch); one image
    per sample, `features` (N, T, Dv) in sample order. Needs at least two samples."""
    n = len(input_ids)
    if n < 2 or features.shape[0] != n or len(labels) != n:
        raise ValueError(
            f"the image gain needs two or more samples with one image each, got {n} samples, "
            f"{len(labels)} label rows and {features.shape[0]} images"
        )
    swapped = torch.cat([features[1:], features[:1]])  # sample i gets image i+1
    count = sum(sum(1 for t in row[1:] if t != IGNORE_INDEX) for row in labels)
    if count == 0:
        raise ValueError("the image gain needs supervised tokens")
    was_training = step_module.training
    step_module.eval()
    amp = (
        torch.autocast(features.device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    totals = []
    try:
        with amp:
            for images in (features, swapped):
                total = 0.0
                for start in range(0, n, batch):
                    part = slice(start, start + batch)
                    total += float(
                        step_module(list(input_ids[part]), list(labels[part]), images[part])
                    )
                totals.append(total / count)
    finally:
        step_module.train(was_training)
    own, other = totals
    return {"own": own, "swapped": other, "gain": other - own}

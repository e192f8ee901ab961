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
import random
from collections.abc import Sequence
from typing import Any

import torch

from vistune.data.conversation import IGNORE_INDEX
from vistune.data.dataset import Sample


@torch.no_grad()
def image_gain(
    step_module: torch.nn.Module,
    input_ids: Sequence[list[int]],
    labels: Sequence[list[int]],
    features: torch.Tensor,
    batch: int = 8,
    autocast: torch.dtype | None = None,
    turns: Sequence[list[int] | None] | None = None,
) -> dict[str, float]:
    """Mean CE per supervised token with own and with swapped images, and their gap.

    `step_module`: a vistune.train.step.TrainStep (summed CE of a micro-batch); one image
    per sample, `features` (N, T, Dv) in sample order; `turns`: each sample's turns apart
    (or None). Needs at least two samples."""
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
                    parts = None if turns is None else list(turns[part])
                    total += float(
                        step_module(list(input_ids[part]), list(labels[part]), images[part], parts)
                    )
                totals.append(total / count)
    finally:
        step_module.train(was_training)
    own, other = totals
    return {"own": own, "swapped": other, "gain": other - own}


def hold_out(samples: list[Sample], count: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, `count` held-out samples with an image), picked by `seed`; none
    held out when fewer than 4 x count samples have an image (a small run keeps its data)."""
    with_image = [i for i, s in enumerate(samples) if s.image is not None]
    if count < 2 or len(with_image) < 4 * count:
        return samples, []
    picked = set(random.Random(f"vistune-gain:{seed}").sample(with_image, count))
    return ([s for i, s in enumerate(samples) if i not in picked],
            [s for i, s in enumerate(samples) if i in picked])  # fmt: skip


def held_out_gain(
    step_module: Any, store: Any, held: list[Sample], precision: str
) -> dict[str, float]:
    """`image_gain` of the held-out samples as a training log records it (every rank runs
    it; no collective beyond what the module's own forward does)."""
    features = store.get([s.image for s in held]).to(step_module.model.device)
    autocast = torch.bfloat16 if precision == "bf16" else None
    turns = [s.turns for s in held] if any(s.turns for s in held) else None
    gain = image_gain(step_module, [s.input_ids for s in held], [s.labels for s in held],
                      features, autocast=autocast, turns=turns)  # fmt: skip
    step_module.weights_changed()  # the eval-mode forward may have cached weight casts
    return {"image_gain": gain["gain"], "held_loss": gain["own"],
            "held_loss_swapped": gain["swapped"]}  # fmt: skip

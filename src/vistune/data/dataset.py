"""Training samples: LLaVA JSON rows -> checked, tokenised, truncated samples; batching.

Paper §4.2: each sample is one (multi-turn) conversation about one image, the image in
the first instruction before or after the question at random (eq. 2), only the answers
supervised (Table 2). Rows that cannot be trained on are skipped and counted by reason
(`strict` turns the first one into a DataError naming the sample), so a bad row never
stops an epoch half-way.

Lengths count the image as the model sees it: the one IMAGE_TOKEN_ID becomes
`image_tokens` rows. Truncation cuts text from the end and never the image; a sample
whose image + prompt alone reach the limit (nothing left to supervise) is skipped.

Batching groups by length as HF's `group_by_length` does (`get_length_grouped_indices`):
the epoch's shuffled order is cut into mega-batches of `length_group` global batches (16 by
default; HF uses 50), each sorted by length and cut into global batches, so every batch
holds similar lengths and little padding. `length_group 1` is LLaVA's own sampler
(llava/train/llava_trainer.py): each global batch is the shuffled order's next samples,
only sorted inside. Either way the global batch - hence the update - does not depend on
how many processes share it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vistune.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    tokenize_conversation,
    tokenize_turns_apart,
)
from vistune.data.formats import SAMPLE_PROBLEMS, BadSample, check_llava_sample
from vistune.errors import DataError, TemplateMismatchError

SKIP_REASONS = (
    *SAMPLE_PROBLEMS,
    "missing_image",
    "bad_image",
    "template_mismatch",
    "too_long",
    "plain_multi_turn",
)


@dataclass(frozen=True)
class Sample:
    """One tokenised training sample."""

    id: str
    image: Path | None
    input_ids: list[int]
    labels: list[int]
    length: int
    """Sequence length the LLM sees (the image placeholder counted as its image tokens)."""
    targets: int
    """Supervised next-token targets (labels[1:] that are not IGNORE_INDEX)."""
    truncated: bool = False
    """Text was cut from the end to fit model_max_length (kept, and counted in reports)."""
    turns: list[int] | None = None
    """Turns trained apart: each token's turn, 0 for the shared prefix
    (vistune.data.conversation.tokenize_turns_apart); None for one causal sequence."""


class SkipError(DataError):
    """A row that cannot be trained on; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_row(row: Any, index: int) -> tuple[str, str | None, list[dict]]:
    """(id, image or None, conversations) of a row, or SkipError: the rule is
    `vistune.data.formats.check_llava_sample`'s, its reasons the skip reasons."""
    try:
        check_llava_sample(row, index)
    except BadSample as err:
        raise SkipError(err.reason, str(err)) from None
    return str(row["id"]), row.get("image"), row["conversations"]


def truncate(
    input_ids: list[int], labels: list[int], image_tokens: int, max_length: int, where: str
) -> tuple[list[int], list[int]]:
    """Cut text from the end so the sequence (image counted as `image_tokens`) fits.

    Raises SkipError("too_long") when the image and the prompt alone fill the limit.
    """
    extra = image_tokens - 1 if IMAGE_TOKEN_ID in input_ids else 0
    keep = max_length - extra
    if len(input_ids) <= keep:
        return input_ids, labels
    first_target = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
    if first_target >= keep:
        raise SkipError(
            "too_long",
            f"{where}: image ({image_tokens} tokens) + prompt exceed model_max_length {max_length}",
        )
    return input_ids[:keep], labels[:keep]


def build_samples(
    rows: list[Any],
    tokenizer: Any,
    template: str,
    image_root: Path,
    image_tokens: int,
    max_length: int,
    seed: int = 0,
    strict: bool = False,
    turns_apart: bool = False,
) -> tuple[list[Sample], Counter]:
    """Tokenise rows into Samples; returns (samples, Counter of skip reasons).

    `turns_apart`: multi-turn samples with an image train each turn apart, seeing only the
    image and its own question (vistune.data.conversation.tokenize_turns_apart).

    The first-turn image placement (paper eq. 2) is drawn from a generator seeded by
    (seed, sample id), so it is the same on every process and after a resume.
    """
    samples: list[Sample] = []
    skipped: Counter = Counter()
    for index, row in enumerate(rows):
        try:
            sample_id, image, turns = _check_row(row, index)
            where = f"sample {sample_id}"
            path = None
            if image is not None:
                path = Path(image) if Path(image).is_absolute() else image_root / image
                try:
                    found = path.is_file()
                except OSError as err:  # a name too long, a folder we may not read
                    raise SkipError(
                        "missing_image", f"{where}: image {path} cannot be read ({err.strerror})"
                    ) from err
                if not found:
                    raise SkipError("missing_image", f"{where}: image {path} not found")
            if template == "plain" and len(turns) > 2:  # as LLaVA's preprocess_plain asserts
                raise SkipError(
                    "plain_multi_turn",
                    f"{where}: the plain template (stage 1) takes one exchange, an image and its "
                    f"caption; this one has {len(turns)} turns",
                )
            rng = random.Random(f"{seed}:{sample_id}")
            tokenize = tokenize_turns_apart if turns_apart else tokenize_conversation
            try:
                tok = tokenize(turns, tokenizer, template, sample_id, rng)
            except TemplateMismatchError as err:
                raise SkipError("template_mismatch", str(err)) from err
            except DataError as err:
                raise SkipError("malformed", str(err)) from err
            ids, labels = truncate(tok.input_ids, tok.labels, image_tokens, max_length, where)
            targets = sum(lab != IGNORE_INDEX for lab in labels[1:])
            if targets == 0:
                raise SkipError("too_long", f"{where}: nothing left to supervise")
            length = len(ids) + (image_tokens - 1 if path is not None else 0)
            cut = len(ids) < len(tok.input_ids)
            parts = None if tok.turns is None else tok.turns[: len(ids)]
            samples.append(Sample(sample_id, path, ids, labels, length, targets, cut, parts))
        except SkipError as err:
            if strict:
                raise DataError(f"{err} (reason {err.reason}; drop --strict to skip)") from err
            skipped[err.reason] += 1
    return samples, skipped


def drop_samples(samples: list[Sample], bad_images: set[Path]) -> tuple[list[Sample], int]:
    """Samples whose image is not in `bad_images` (unreadable files), and how many went."""
    kept = [s for s in samples if s.image is None or s.image not in bad_images]
    return kept, len(samples) - len(kept)


def global_batches(
    lengths: list[int],
    global_batch: int,
    epoch: int,
    seed: int,
    group_by_length: bool = True,
    mega: int = 16,
) -> list[list[int]]:
    """The epoch's global batches of sample indices (the last incomplete one is dropped).

    The shuffle depends on (seed, epoch) only, so resuming at (epoch, step) needs no state.
    With grouping (HF's get_length_grouped_indices, mega-batch of `mega` global batches):
    the shuffled order is cut into mega-batches, each sorted by length and cut into global
    batches of similar lengths, which are then shuffled; each global batch is sorted
    longest first for its micro-batches. As there, the batch holding the epoch's longest
    sample then swaps places with the first: a run that runs out of memory does so at its
    first step, not hours in. None of this depends on the number of processes.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    usable = len(order) - len(order) % global_batch
    if not group_by_length:
        return [order[i : i + global_batch] for i in range(0, usable, global_batch)]
    batches: list[list[int]] = []
    span = global_batch * max(1, mega)
    for start in range(0, usable, span):
        chunk = sorted(order[start : min(start + span, usable)], key=lambda i: (-lengths[i], i))
        batches += [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    batches = [batches[i] for i in shuffle]
    if batches:  # each batch is sorted longest first
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def micro_batches(batch: list[int], per_device: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch, in accumulation order.

    The global batch is cut into world x accumulation consecutive micro-batches; step a of
    rank r takes micro-batch a * world + r, so the ranks of one step hold similar lengths.
    """
    cuts = [batch[i : i + per_device] for i in range(0, len(batch), per_device)]
    return cuts[rank::world]


def padding_share(lengths: list[list[int]]) -> tuple[int, int]:
    """(padded tokens, total tokens) when each inner list is padded to its longest."""
    total = sum(max(group) * len(group) for group in lengths if group)
    real = sum(sum(group) for group in lengths)
    return total - real, total

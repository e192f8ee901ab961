"""Image rows spliced into the text: the LLM's inputs for a batch (paper §4.1, eq. 1).

Follows LLaVA's `prepare_inputs_labels_for_multimodal` (llava/model/llava_arch.py): per
sample, the text embeddings around each image placeholder (IMAGE_TOKEN_ID), the image's T
projected rows in its place with labels IGNORE_INDEX, then padding (right for training,
left for generation). One function for training (vistune.train.step), generation
(vistune.serve.engine, through LlavaModel.splice) and LlavaModel.forward.

The whole batch takes one embedding lookup and one gather: embedding each sample on its
own made every embedding call's backward zero-fill a dense vocabulary x width gradient on
the CPU (8 samples: 8 x 113 MB for SmolLM2), about 12% of a training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID

PADDING_SIDES = ("right", "left")


@dataclass
class Spliced:
    """LLM inputs with the image tokens in place, padded to one length L."""

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) 1 = real token, 0 = padding
    labels: torch.Tensor | None  # (B, L) IGNORE_INDEX on image tokens, padding, prompts
    position_ids: torch.Tensor  # (B, L) 0.. from each sample's first real token
    turns: torch.Tensor | None = None
    """(B, L) with turns apart: each position's turn (0: the shared prefix, the image's rows
    included; -1: padding); positions then restart after the prefix in every turn. None:
    each sample is one causal sequence."""


def splice(
    input_ids: list[list[int]],
    image_embeds: torch.Tensor | None,
    embed: nn.Module,
    labels: list[list[int]] | None = None,
    padding_side: str = "right",
    multiple: int = 1,
    sparse: bool = False,
    turns: list[list[int] | None] | None = None,
) -> Spliced:
    """Token ids (IMAGE_TOKEN_ID where images go) + image rows (M, T, D) -> LLM inputs.

    Each IMAGE_TOKEN_ID, in batch order, takes the next image's T rows; samples without one
    take none, and every image must be used exactly once. Padding (zero embeddings, mask 0,
    label IGNORE_INDEX) goes on `padding_side`, up to the longest sample rounded up to a
    multiple of `multiple`. `embed`: the LLM's input embedding; `sparse`: its gradient comes
    back as the looked-up rows only (a plain nn.Embedding's weight is used directly).
    `turns`: per sample, each token's turn (vistune.data.conversation.tokenize_turns_apart;
    None for a sample that is one sequence); attend with `turn_mask(spliced.turns)`.
    """
    _check(input_ids, labels, padding_side)
    if turns is not None and all(t is None for t in turns):
        turns = None
    if turns is not None and (padding_side != "right" or len(turns) != len(input_ids)):
        raise ValueError("turns apart need right padding and one turn list (or None) a sample")
    weight = embed.weight
    device = weight.device
    flat = [t for ids in input_ids for t in ids if t != IMAGE_TOKEN_ID]
    ids = torch.tensor(flat, dtype=torch.long, device=device)
    if sparse:
        text = F.embedding(ids, weight, embed.padding_idx, sparse=True)  # (N, D)
    else:
        text = embed(ids)  # (N, D)
    images = 0 if image_embeds is None else image_embeds.shape[0]
    rows = [text]
    if images:
        rows.append(image_embeds.reshape(-1, text.shape[-1]).to(device, text.dtype))  # (M*T, D)
    rows.append(text.new_zeros(1, text.shape[-1]))  # padding
    table = torch.cat(rows)  # (N + M*T + 1, D)
    tokens = image_embeds.shape[1] if images else 0
    index, target, mask = _layout(input_ids, labels, images, tokens, padding_side, multiple)
    mask_t = torch.from_numpy(mask).to(device)  # (B, L)
    parts = None
    if turns is None:
        positions = (mask_t.cumsum(-1) - 1).clamp(min=0).masked_fill(mask_t == 0, 0)  # (B, L)
    else:
        part, where = _turn_layout(input_ids, turns, tokens, mask.shape[1])
        positions, parts = torch.from_numpy(where).to(device), torch.from_numpy(part).to(device)
    return Spliced(
        inputs_embeds=table[torch.from_numpy(index).to(device)],  # (B, L, D)
        attention_mask=mask_t,
        labels=None if labels is None else torch.from_numpy(target).to(device),
        position_ids=positions,
        turns=parts,
    )


def turn_mask(turns: torch.Tensor) -> torch.Tensor:
    """(B, L, L) True where query i may attend to key j: j <= i, and j in the shared prefix
    (turn 0) or in i's own turn. `turns`: Spliced.turns."""
    length = turns.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=turns.device).tril_()
    own = (turns[:, None, :] == 0) | (turns[:, None, :] == turns[:, :, None])
    return own & causal


def _turn_layout(
    input_ids: list[list[int]], turns: list[list[int] | None], tokens: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each position's turn (-1: padding) and its position id: the prefix counts from 0,
    every turn from the prefix's length, as if it were the only one. # (B, L) x2"""
    part = np.full((len(input_ids), length), -1, dtype=np.int64)
    where = np.zeros((len(input_ids), length), dtype=np.int64)
    for b, ids in enumerate(input_ids):
        own = np.zeros(len(ids), dtype=np.int64) if turns[b] is None else np.asarray(turns[b])
        if own.shape != (len(ids),) or (own.size and (own[0] != 0 or (np.diff(own) < 0).any())):
            raise ValueError(
                f"sample {b}: turns must give each of its {len(ids)} tokens a turn, starting "
                "with the shared prefix (0) and never going back"
            )
        width = np.where(np.asarray(ids, dtype=np.int64) == IMAGE_TOKEN_ID, tokens, 1)
        row = np.repeat(own, width)  # (n,) each position's turn
        at = np.arange(row.size)
        first = np.searchsorted(row, row, side="left")  # where each position's turn starts
        part[b, : row.size] = row
        where[b, : row.size] = np.where(row == 0, at, (row == 0).sum() + at - first)
    return part, where


def _check(input_ids: list[list[int]], labels: list[list[int]] | None, side: str) -> None:
    if side not in PADDING_SIDES:
        raise ValueError(f"unknown padding_side {side!r}; valid: {', '.join(PADDING_SIDES)}")
    if labels is not None and len(labels) != len(input_ids):
        raise ValueError(f"{len(input_ids)} input_ids sequences but {len(labels)} label sequences")
    if not input_ids:
        raise ValueError("empty batch")
    for i, ids in enumerate(input_ids):
        if not ids:
            raise ValueError(f"sample {i} has no tokens")
        if labels is not None and len(labels[i]) != len(ids):
            raise ValueError(f"sample {i}: {len(ids)} input ids but {len(labels[i])} labels")


def _layout(
    input_ids: list[list[int]],
    labels: list[list[int]] | None,
    images: int,
    tokens: int,
    side: str,
    multiple: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which row of the table (text rows, then the images' T rows each, then a zero row)
    each position takes, its label and its mask. # (B, L) x3"""
    num_text = sum(len(ids) for ids in input_ids) - sum(
        ids.count(IMAGE_TOKEN_ID) for ids in input_ids
    )
    sizes = [len(ids) + ids.count(IMAGE_TOKEN_ID) * (tokens - 1) for ids in input_ids]
    batch, length = len(input_ids), -(-max(sizes) // multiple) * multiple
    index = np.full((batch, length), num_text + images * tokens, dtype=np.int64)
    target = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    text_at = image_at = 0  # text rows and images used so far
    for b, ids in enumerate(input_ids):
        is_image = np.asarray(ids, dtype=np.int64) == IMAGE_TOKEN_ID  # (n,)
        count = int(is_image.sum())
        if image_at + count > images:
            raise ValueError(
                f"sample {b} has an image placeholder but only {images} image rows were given"
            )
        offset = length - sizes[b] if side == "left" else 0
        mask[b, offset : offset + sizes[b]] = 1
        width = np.where(is_image, tokens, 1)
        starts = offset + np.cumsum(width) - width  # (n,) where each input token lands
        at_text = starts[~is_image]
        index[b, at_text] = text_at + np.arange(at_text.size)
        if labels is not None:
            target[b, at_text] = np.asarray(labels[b], dtype=np.int64)[~is_image]
        at_image = starts[is_image][:, None] + np.arange(tokens)  # (count, T)
        index[b, at_image] = (
            num_text + image_at * tokens + np.arange(count * tokens).reshape(count, tokens)
        )
        text_at, image_at = text_at + at_text.size, image_at + count
    if image_at != images:
        raise ValueError(
            f"{images} image rows given but the batch has {image_at} image placeholders"
        )
    return index, target, mask

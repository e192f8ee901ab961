"""One training micro-batch as a module: cached features -> projector -> LLM -> token CE.

This is what DDP / FSDP wrap, so every parameter is reached through the wrapper's hooks.
It follows LlavaModel.splice (LLaVA's prepare_inputs_labels_for_multimodal) but builds the
whole batch with one embedding lookup and one gather: LlavaModel.splice embeds each sample
on its own, and on the CPU every embedding call's backward zero-fills a dense
vocabulary x width gradient (8 samples: 8 x 113 MB for SmolLM2), about 12% of a step.
Logits are computed only where a label is supervised: the LM head is the largest matmul
per position and most positions (image, prompt, padding) carry no loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.train import llama_cpu


def batch_inputs(
    input_ids: list[list[int]],
    labels: list[list[int]],
    image_embeds: torch.Tensor | None,
    embed: nn.Embedding,
    sparse: bool = False,
    multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (inputs_embeds (B, L, D), attention_mask, labels, position_ids (B, L)).

    Same result as LlavaModel.splice(..., padding_side="right"): IMAGE_TOKEN_ID takes the
    next image's T rows (label IGNORE_INDEX), padding is zeros with label IGNORE_INDEX.
    """
    weight = embed.weight
    flat = [t for ids in input_ids for t in ids if t != IMAGE_TOKEN_ID]
    ids = torch.tensor(flat, dtype=torch.long, device=weight.device)
    text = F.embedding(ids, weight, embed.padding_idx, sparse=sparse)  # (N, D)
    rows = [text]
    tokens = 0
    if image_embeds is not None and image_embeds.shape[0]:
        tokens = image_embeds.shape[1]
        rows.append(image_embeds.reshape(-1, text.shape[-1]).to(text.dtype))  # (M*T, D)
    rows.append(text.new_zeros(1, text.shape[-1]))
    table = torch.cat(rows)  # (N + M*T + 1, D)
    sizes = [len(ids) + ids.count(IMAGE_TOKEN_ID) * (tokens - 1) for ids in input_ids]
    batch, length = len(input_ids), -(-max(sizes) // multiple) * multiple
    index = np.full((batch, length), table.shape[0] - 1, dtype=np.int64)
    target = np.full((batch, length), IGNORE_INDEX, dtype=np.int64)
    text_at, image_at = 0, len(flat)
    for b, (ids, labs) in enumerate(zip(input_ids, labels, strict=True)):
        pos = 0
        for tok, lab in zip(ids, labs, strict=True):
            if tok == IMAGE_TOKEN_ID:
                if image_at + tokens > table.shape[0] - 1 or tokens == 0:
                    raise ValueError(f"sample {b} has an image placeholder but no image rows left")
                index[b, pos : pos + tokens] = np.arange(image_at, image_at + tokens)
                image_at, pos = image_at + tokens, pos + tokens
            else:
                index[b, pos], target[b, pos] = text_at, lab
                text_at, pos = text_at + 1, pos + 1
    if image_at != table.shape[0] - 1:
        raise ValueError("more image rows than image placeholders in the batch")
    device = weight.device
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    for b, size in enumerate(sizes):
        mask[b, :size] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)  # (B, L)
    inputs = table[torch.from_numpy(index).to(device)]  # (B, L, D)
    return inputs, mask, torch.from_numpy(target).to(device), positions


class TrainStep(nn.Module):
    """Summed token cross entropy of one micro-batch (the caller divides by the count)."""

    def __init__(self, model: Any, fast: bool | None = None) -> None:
        """`fast`: run the LLM through vistune.train.llama_cpu (None: wherever it can)."""
        super().__init__()
        self.model = model
        if fast is None:
            fast = llama_cpu.usable(model.llm, model.device)
        self.fast = fast
        # Tied LM head: the embedding's rows can come back as a sparse gradient, which the
        # autograd engine adds into the head's dense one (no second vocab x width buffer).
        head = model.llm.get_output_embeddings()
        self.sparse = fast and head is not None and head.weight is self.embed_weight
        self.weights = llama_cpu.WeightCache()

    @property
    def length_multiple(self) -> int:
        """Each micro-batch is padded to a multiple of this length (shapes that repeat)."""
        return llama_cpu.LENGTH_MULTIPLE if self.fast else 1

    def weights_changed(self) -> None:
        """Call after each optimizer step: the LLM's cached weight copies are stale."""
        self.weights.invalidate()

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.llm.get_input_embeddings().weight

    def forward(
        self, input_ids: list[list[int]], labels: list[list[int]], features: torch.Tensor | None
    ) -> torch.Tensor:
        model = self.model
        anchor = None
        if features is not None and features.shape[0]:
            embeds = model.project(features)  # (M, T, D)
        else:  # keep the projector in the graph so DDP sees its (zero) gradient
            embeds = None
            probe = torch.zeros(1, 1, model.vision.hidden_size, device=model.device)
            anchor = model.project(probe).sum() * 0.0
        llm = model.llm
        inputs, mask, targets, positions = batch_inputs(
            input_ids,
            labels,
            embeds,
            llm.get_input_embeddings(),
            self.sparse,
            self.length_multiple,
        )
        if self.fast:
            dtype = (
                torch.get_autocast_dtype("cpu")
                if torch.is_autocast_enabled("cpu")
                else torch.float32
            )
            ce = llama_cpu.decoder_loss(llm, inputs, positions, targets, dtype, self.weights)
            return ce if anchor is None else ce + anchor
        hidden = llm.get_decoder()(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, D)
        shifted = targets[:, 1:]  # (B, L-1)
        keep = shifted != IGNORE_INDEX
        logits = llm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        ce = F.cross_entropy(logits.float(), shifted[keep], reduction="sum")
        return ce if anchor is None else ce + anchor

"""One training micro-batch as a module: cached features -> projector -> LLM -> token CE.

This is what DDP / FSDP wrap, so every parameter is reached through the wrapper's hooks.
The batch is spliced by vistune.model.splice (padded to a multiple of the fast path's
length) and the loss is vistune.model.loss's, computed only where a label is supervised:
the LM head is the largest matmul per position and most positions (image, prompt,
padding) carry no loss. Plain Llama-family LLMs on the CPU run through
vistune.train.llama_cpu (vistune.model.llama.trains), the rest through transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vistune.model import llama
from vistune.model.loss import supervised, token_loss
from vistune.model.splice import splice, turn_mask
from vistune.train import llama_cpu


class TrainStep(nn.Module):
    """Summed token cross entropy of one micro-batch (the caller divides by the count).

    After each forward, `sample_ce` holds each sample's own summed CE (B,), detached: what
    the loop splits by response type for the loss curves."""

    def __init__(self, model: Any, fast: bool | None = None) -> None:
        """`fast`: run the LLM through vistune.train.llama_cpu (None: wherever it can)."""
        super().__init__()
        self.model = model
        if fast is None:
            fast = llama.trains(model.llm, model.device)
        self.fast = fast
        # Tied LM head: the embedding's rows can come back as a sparse gradient, which the
        # autograd engine adds into the head's dense one (no second vocab x width buffer).
        head = model.llm.get_output_embeddings()
        self.sparse = fast and head is not None and head.weight is self.embed_weight
        self.weights = llama_cpu.WeightCache()
        self.sample_ce = torch.zeros(0)

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
        self,
        input_ids: list[list[int]],
        labels: list[list[int]],
        features: torch.Tensor | None,
        turns: list[list[int] | None] | None = None,
    ) -> torch.Tensor:
        """`turns`: each sample's turns apart (vistune.data.dataset.Sample.turns) or None."""
        model = self.model
        anchor = None
        if features is not None and features.shape[0]:
            embeds = model.project(features)  # (M, T, D)
        else:  # keep the projector in the graph so DDP sees its (zero) gradient
            embeds = None
            probe = torch.zeros(1, 1, model.vision.hidden_size, device=model.device)
            anchor = model.project(probe).sum() * 0.0
        llm = model.llm
        batch = splice(
            input_ids,
            embeds,
            llm.get_input_embeddings(),
            labels,
            multiple=self.length_multiple,
            sparse=self.sparse,
            turns=turns,
        )
        allowed = None if batch.turns is None else turn_mask(batch.turns)  # (B, L, L)
        if self.fast:
            dtype = (
                torch.get_autocast_dtype("cpu")
                if torch.is_autocast_enabled("cpu")
                else torch.float32
            )
            rows: list[torch.Tensor] = []
            ce = llama_cpu.decoder_loss(
                llm, batch.inputs_embeds, batch.position_ids, batch.labels, dtype, self.weights,
                sink=rows, allowed=allowed,
            )  # fmt: skip
            self.sample_ce = _per_sample(batch.labels, rows[0])
            return ce if anchor is None else ce + anchor
        attention = batch.attention_mask
        if allowed is not None:  # a 4D mask goes to the attention kernels as it is
            low = torch.finfo(batch.inputs_embeds.dtype).min
            attention = torch.zeros(allowed.shape, dtype=batch.inputs_embeds.dtype,
                                    device=allowed.device).masked_fill_(~allowed, low)[:, None]  # fmt: skip
        hidden = llm.get_decoder()(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=attention,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, D)
        keep, targets = supervised(batch.labels)  # (B, L), (N,)
        logits = llm.get_output_embeddings()(hidden[keep])
        ce = token_loss(logits, targets)
        with torch.no_grad():
            rows = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        self.sample_ce = _per_sample(batch.labels, rows)
        return ce if anchor is None else ce + anchor


def _per_sample(labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-token CE (N,) in `supervised(labels)` order -> each sample's sum (B,)."""
    keep, _ = supervised(labels)
    owner = keep.nonzero()[:, 0]  # row-major: the order `x[keep]` takes rows
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=rows.device)
    return out.index_add_(0, owner, rows.detach().float())

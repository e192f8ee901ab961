"""LLaVA: a frozen vision tower g, a projector W and a causal LM f_phi (paper §4.1, Fig. 1).

The three parts are held, not subclassed: the LLM is any Hugging Face causal LM, fed
`inputs_embeds` in which each image placeholder (IMAGE_TOKEN_ID) is replaced by the T
projected image tokens H_v = W · g(X_v) (eq. 1). The loss is the LLM's own auto-regressive
objective on the supervised (assistant) tokens only (eq. 3, Table 2): shifted cross
entropy, averaged over the supervised tokens of the batch.

    model = LlavaModel.from_parts(vision_dir, llm_dir, ModelConfig())
    out = model(input_ids=[[...]], pixel_values=pixels, labels=[[...]])  # out.loss, out.logits

Splicing follows LLaVA's `prepare_inputs_labels_for_multimodal` (llava/model/llava_arch.py):
per sample, text embeddings around the placeholder, image rows in its place, labels
IGNORE_INDEX over the image, then padding (right for training, left for generation).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vistune.config import ModelConfig
from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.data.image import ImageProcessor
from vistune.errors import ModelDirError
from vistune.model import checkpoint
from vistune.model.projector import build_projector
from vistune.model.vision import VisionTower

PADDING_SIDES = ("right", "left")


@dataclass
class Spliced:
    """LLM inputs with the image tokens in place, padded to one length L."""

    inputs_embeds: torch.Tensor  # (B, L, D)
    attention_mask: torch.Tensor  # (B, L) 1 = real token, 0 = padding
    labels: torch.Tensor | None  # (B, L) IGNORE_INDEX on image tokens, padding, prompts
    position_ids: torch.Tensor  # (B, L) 0.. from each sample's first real token


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None  # () mean CE over supervised tokens; None without labels
    logits: torch.Tensor  # (B, L, V)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over supervised positions: logits (B, L, V), labels (B, L).

    Token t's label is predicted from position t-1. With no supervised token the loss is
    0 (still attached to the graph, so a step on it is a no-op rather than a crash).
    """
    targets = labels[:, 1:].reshape(-1)  # (B*(L-1),)
    count = (targets != IGNORE_INDEX).sum()
    if count == 0:
        return logits.sum() * 0.0
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(L-1), V)
    total = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / count


class LlavaModel(nn.Module):
    """Vision tower + projector + causal LM, composed.

    `projector_trained` says whether the projector has been trained (False for a fresh
    `from_parts`; trainers set it True before `save`); the chat CLI reports it. `adapter`:
    a LoRA adapter folder (peft's layout) over `llm` that `save` writes beside it (LoRA
    training without merging); `load` merges it into the LLM. `llm_source`: the HF folder
    whose weights `llm` was loaded from, as stored there (None when `load` merged an
    adapter into them); `save(..., frozen_llm=True)` keeps that folder's files.
    """

    def __init__(
        self,
        vision: VisionTower,
        projector: nn.Module,
        llm: PreTrainedModel,
        tokenizer: Any,
        image_processor: ImageProcessor,
        config: ModelConfig,
        projector_trained: bool = False,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.projector_trained = projector_trained
        self.adapter: Path | None = None
        self.llm_source: Path | None = None
        self.llm_stamp: list = []
        """`llm_source`'s weight files as they were when loaded (checkpoint.weight_stamp)."""

    @classmethod
    def from_parts(
        cls,
        vision_dir: str | Path,
        llm_dir: str | Path,
        config: ModelConfig = ModelConfig(),  # noqa: B008 (frozen dataclass)
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        meta_llm: bool = False,
    ) -> LlavaModel:
        """A HF vision dir + a HF causal LM dir + a fresh projector seeded with `seed`.

        `meta_llm`: build the LLM's modules on the meta device from its config alone, its
        weights never read (FSDP ranks other than 0 take rank 0's once sharded).
        """
        vision_dir, llm_dir = Path(vision_dir), Path(llm_dir)
        vision = VisionTower.from_pretrained(
            vision_dir, layer=config.vision_layer, select=config.vision_select, dtype=dtype
        )
        checkpoint.check_hf_dir(llm_dir, "LLM", tokenizer=True)
        if meta_llm:
            llm = _meta_llm(llm_dir, dtype)
        else:
            llm = checkpoint.load_hf_model(AutoModelForCausalLM, llm_dir, "LLM", dtype=dtype)
        tokenizer = checkpoint.load_tokenizer(llm_dir)
        llm_hidden = llm.get_input_embeddings().embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tokens = vision.num_tokens(config.image_size)
            projector = build_projector(config.projector, vision.hidden_size, llm_hidden, tokens)
        try:
            image_processor = ImageProcessor.from_vision_dir(
                vision_dir, size=config.image_size, aspect=config.image_aspect
            )
        except (ValueError, TypeError) as exc:  # e.g. two mean values, or one that is text
            raise ModelDirError(f"{vision_dir / 'preprocessor_config.json'}: {exc}") from exc
        model = cls(vision, projector.to(dtype), llm, tokenizer, image_processor, config)
        model.llm_source = llm_dir.absolute()  # saved from wherever the cwd is then
        model.llm_stamp = checkpoint.weight_stamp(model.llm_source)
        return model

    @classmethod
    def load(
        cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, meta_llm: bool = False
    ) -> LlavaModel:
        """Load a model directory written by `save` (never runs code from it).

        `meta_llm` as in `from_parts`; a LoRA adapter is then not merged: merging keeps the
        base LLM's modules, and the merged weights come from the rank that read them.
        """
        info = checkpoint.read_model_dir(model_dir)
        model = cls.from_parts(
            info.vision_dir, info.llm_dir, info.config, dtype=dtype, meta_llm=meta_llm
        )
        if info.adapter_dir is not None:
            model.llm_source = None  # llm/ plus the adapter: not llm/'s weights alone
            if not meta_llm:
                model.llm = checkpoint.merge_adapter(model.llm, info.adapter_dir)
        checkpoint.load_projector(
            model.projector, info.projector_path, model.vision.hidden_size, model.llm_hidden_size
        )
        model.projector_trained = info.projector_trained
        return model.eval()

    def save(self, model_dir: str | Path, frozen_llm: bool = False) -> Path:
        """Write config.json + projector.safetensors + vision/ + llm/ atomically.

        `frozen_llm`: `llm` is unchanged since it was loaded, so llm/ gets `llm_source`'s
        files as they are stored there (their dtype, hard-linked where possible) rather than
        the fp32 weights in memory (stage 1: a 13B fp16 LLM stays 26 GB, not 52 GB).
        """
        if not frozen_llm:
            return checkpoint.save_model(self, model_dir)
        if self.llm_source is None:
            raise ValueError("frozen_llm: this LLM was not loaded from one folder alone")
        now = checkpoint.weight_stamp(self.llm_source)  # []: unlistable, which save names
        if now and now != self.llm_stamp:
            raise ModelDirError(
                f"{self.llm_source}: the LLM's weight files changed since they were loaded, so "
                "the model directory would pair the trained projector with other weights; put "
                "them back as they were and run again with --resume to write it"
            )
        return checkpoint.save_model(self, model_dir, llm_source=self.llm_source)

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image becomes at config.image_size."""
        return self.vision.num_tokens(self.config.image_size)

    @property
    def llm_hidden_size(self) -> int:
        return self.llm.get_input_embeddings().embedding_dim

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, T, Dv) from the frozen tower (no grad)."""
        return self.vision(pixel_values)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, T, Dv) -> (N, T, D) in the LLM's embedding space (eq. 1)."""
        weight = next(self.projector.parameters())
        return self.projector(features.to(device=weight.device, dtype=weight.dtype))

    def splice(
        self,
        input_ids: list[list[int]],
        image_embeds: torch.Tensor | None,
        labels: list[list[int]] | None = None,
        padding_side: str = "right",
    ) -> Spliced:
        """Token ids (IMAGE_TOKEN_ID where images go) + image rows (M, T, D) -> LLM inputs.

        Each IMAGE_TOKEN_ID, in batch order, takes the next row of `image_embeds`; samples
        without one take none. Every row must be used exactly once.
        """
        if padding_side not in PADDING_SIDES:
            raise ValueError(
                f"unknown padding_side {padding_side!r}; valid: {', '.join(PADDING_SIDES)}"
            )
        if labels is not None and len(labels) != len(input_ids):
            raise ValueError(
                f"{len(input_ids)} input_ids sequences but {len(labels)} label sequences"
            )
        if not input_ids:
            raise ValueError("empty batch")
        embed = self.llm.get_input_embeddings()
        device, dtype = embed.weight.device, embed.weight.dtype
        num_rows = 0 if image_embeds is None else image_embeds.shape[0]
        used = 0
        seq_embeds: list[torch.Tensor] = []
        seq_labels: list[torch.Tensor] = []
        for i, ids in enumerate(input_ids):
            if not ids:
                raise ValueError(f"sample {i} has no tokens")
            ids_t = torch.tensor(ids, dtype=torch.long, device=device)  # (n,)
            lab_t = ids_t.new_full(ids_t.shape, IGNORE_INDEX)
            if labels is not None:
                if len(labels[i]) != len(ids):
                    raise ValueError(
                        f"sample {i}: {len(ids)} input ids but {len(labels[i])} labels"
                    )
                lab_t = torch.tensor(labels[i], dtype=torch.long, device=device)
            is_image = ids_t == IMAGE_TOKEN_ID
            text = embed(ids_t.masked_fill(is_image, 0))  # (n, D)
            pieces, lab_pieces, start = [], [], 0
            for pos in is_image.nonzero().flatten().tolist():
                if used >= num_rows:
                    raise ValueError(
                        f"sample {i} has an image placeholder but only {num_rows} image rows were given"
                    )
                rows = image_embeds[used].to(device=device, dtype=dtype)  # (T, D)
                pieces += [text[start:pos], rows]
                lab_pieces += [lab_t[start:pos], lab_t.new_full((rows.shape[0],), IGNORE_INDEX)]
                used, start = used + 1, pos + 1
            seq_embeds.append(torch.cat([*pieces, text[start:]]))  # (n', D)
            seq_labels.append(torch.cat([*lab_pieces, lab_t[start:]]))  # (n',)
        if used != num_rows:
            raise ValueError(
                f"{num_rows} image rows given but the batch has {used} image placeholders"
            )
        return _pad(seq_embeds, seq_labels if labels is not None else None, padding_side)

    def forward(
        self,
        input_ids: list[list[int]],
        image_features: torch.Tensor | None = None,
        labels: list[list[int]] | None = None,
        pixel_values: torch.Tensor | None = None,
        supervised_logits_only: bool = False,
    ) -> LlavaOutput:
        """Logits (B, L, V) for a right-padded batch; loss when `labels` are given.

        Images come either as tower features (N, T, Dv) (e.g. from the feature store) or as
        pixels (N, 3, S, S) run through the frozen tower here.

        With `supervised_logits_only` (training), the LM head runs only at the positions
        that predict a supervised token, and `logits` is (N_supervised, V): the image and
        prompt tokens, most of a stage-1 sequence, never touch the vocabulary matrix.
        The loss is the same as the full path's.
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give image_features or pixel_values, not both")
            image_features = self.image_features(pixel_values)
        image_embeds = None if image_features is None else self.project(image_features)
        spliced = self.splice(input_ids, image_embeds, labels, padding_side="right")
        if supervised_logits_only and spliced.labels is not None and self._keeps_logits:
            return self._supervised_forward(spliced)
        out = self.llm(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=False,
        )
        logits = out.logits  # (B, L, V)
        loss = None if spliced.labels is None else causal_lm_loss(logits, spliced.labels)
        return LlavaOutput(loss=loss, logits=logits)

    @property
    def _keeps_logits(self) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (transformers >= 4.50 models)."""
        return "logits_to_keep" in inspect.signature(self.llm.forward).parameters

    def _supervised_forward(self, spliced: Spliced) -> LlavaOutput:
        labels = spliced.labels  # (B, L)
        keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, L) positions that predict
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        out = self.llm(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = out.logits  # (N_supervised, V)
        if logits.shape[0] == 0:
            return LlavaOutput(loss=spliced.inputs_embeds.sum() * 0.0, logits=logits)
        targets = labels[:, 1:][keep[:, :-1]]  # (N_supervised,)
        loss = F.cross_entropy(logits.float(), targets)
        return LlavaOutput(loss=loss, logits=logits)


def _meta_llm(llm_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM of `llm_dir` on the meta device: its config read, no weights."""
    try:
        with checkpoint.quiet_transformers():
            config = AutoConfig.from_pretrained(
                llm_dir, local_files_only=True, trust_remote_code=False
            )
            with torch.device("meta"):
                llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelDirError(f"{llm_dir}: cannot build the LLM: {exc}") from exc
    return llm.eval()


def _pad(embeds: list[torch.Tensor], labels: list[torch.Tensor] | None, side: str) -> Spliced:
    """Pad per-sample (n_i, D) embeddings (and (n_i,) labels) to (B, L, D) on `side`."""
    length = max(e.shape[0] for e in embeds)

    def amount(n: int) -> tuple[int, int]:
        return (0, length - n) if side == "right" else (length - n, 0)

    inputs_embeds = torch.stack([F.pad(e, (0, 0, *amount(e.shape[0]))) for e in embeds])
    device = inputs_embeds.device
    mask = torch.stack(
        [
            F.pad(torch.ones(e.shape[0], dtype=torch.long, device=device), amount(e.shape[0]))
            for e in embeds
        ]
    )  # (B, L)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0).masked_fill(mask == 0, 0)  # (B, L)
    padded_labels = None
    if labels is not None:
        padded_labels = torch.stack(
            [F.pad(lab, amount(lab.shape[0]), value=IGNORE_INDEX) for lab in labels]
        )  # (B, L)
    return Spliced(inputs_embeds, mask, padded_labels, position_ids)

"""LLaVA: a frozen vision tower g, a projector W and a causal LM f_phi (paper §4.1, Fig. 1).

The three parts are held, not subclassed: the LLM is any Hugging Face causal LM, fed
`inputs_embeds` in which each image placeholder (IMAGE_TOKEN_ID) is replaced by the T
projected image tokens H_v = W · g(X_v) (eq. 1). The loss is the LLM's own auto-regressive
objective on the supervised (assistant) tokens only (eq. 3, Table 2; vistune.model.loss),
averaged over the supervised tokens of the batch.

    model = LlavaModel.from_parts(vision_dir, llm_dir, ModelConfig())
    out = model(input_ids=[[...]], pixel_values=pixels, labels=[[...]])  # out.loss, out.logits

`forward` is the plain reference path (transformers' forward, logits at every position):
training runs vistune.train.step, generation vistune.serve.engine; all three splice with
vistune.model.splice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from vistune.config import ModelConfig
from vistune.data.image import ImageProcessor
from vistune.errors import ModelDirError
from vistune.model import checkpoint
from vistune.model.loss import supervised, token_loss
from vistune.model.projector import build_projector
from vistune.model.splice import Spliced, splice
from vistune.model.vision import VisionTower


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None  # () mean CE over supervised tokens; None without labels
    logits: torch.Tensor  # (B, L, V)


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
        """Token ids (IMAGE_TOKEN_ID where images go) + image rows (M, T, D) -> LLM inputs
        (vistune.model.splice.splice with this LLM's input embedding)."""
        return splice(
            input_ids, image_embeds, self.llm.get_input_embeddings(), labels, padding_side
        )

    def forward(
        self,
        input_ids: list[list[int]],
        image_features: torch.Tensor | None = None,
        labels: list[list[int]] | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> LlavaOutput:
        """Logits (B, L, V) for a right-padded batch; the mean token loss when `labels` are
        given (0, still attached to the graph, when none is supervised).

        Images come either as tower features (N, T, Dv) (e.g. from the feature store) or as
        pixels (N, 3, S, S) run through the frozen tower here.
        """
        if pixel_values is not None:
            if image_features is not None:
                raise ValueError("give image_features or pixel_values, not both")
            image_features = self.image_features(pixel_values)
        image_embeds = None if image_features is None else self.project(image_features)
        spliced = self.splice(input_ids, image_embeds, labels, padding_side="right")
        out = self.llm(
            inputs_embeds=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids,
            use_cache=False,
        )
        logits = out.logits  # (B, L, V)
        loss = None
        if spliced.labels is not None:
            keep, targets = supervised(spliced.labels)  # (B, L), (N,)
            loss = token_loss(logits[keep], targets) / max(targets.numel(), 1)
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

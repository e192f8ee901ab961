"""The frozen vision tower g (paper §4.1, eq. 1): Z_v = g(X_v).

Loads any supported Hugging Face vision model directory (CLIP ViT-L/14 as in the paper,
SigLIP, DINOv2 with or without registers) and returns the grid features of one hidden
layer (the paper uses the one before the last, §5.2 / Table 8). The model class is chosen
by the config's `model_type` through the explicit dict `VISION_MODELS`, never by the
folder name. The tower is always frozen: no gradients, always in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vistune.config import FEATURE_SELECTS
from vistune.errors import ModelDirError
from vistune.files import read_json_if_present
from vistune.model.checkpoint import check_hf_dir, load_hf_model

# model_type in config.json -> (config class, model class). The config classes of the
# vision parts read `vision_config` out of a full CLIP/SigLIP config.json themselves.
VISION_MODELS: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
    "dinov2": (Dinov2Config, Dinov2Model),
    "dinov2_with_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel),
}

# Towers whose sequence starts with a CLS token; SigLIP has none (its patches are all).
_HAS_CLS = {"clip", "dinov2"}
# Towers that take a different input size only when told to interpolate positions.
_FIXED_POSITIONS = {"clip", "siglip"}


def _family(model_type: str) -> str:
    return model_type.removesuffix("_vision_model").removesuffix("_with_registers")


class VisionTower(nn.Module):
    """A frozen HF vision model that returns the tokens of one hidden layer.

    Sequence layouts (T_all = what the HF model returns, G = (S / patch)^2 grid tokens):
    CLIP and DINOv2 `[CLS, grid]`; DINOv2 with registers `[CLS, reg x R, grid]`;
    SigLIP `[grid]`. `patch` keeps the grid only; `cls_patch` keeps `[CLS, grid]`
    (registers are always dropped).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        model_type: str,
        layer: int = -2,
        select: str = "patch",
        preprocessor_config: dict | None = None,
    ) -> None:
        super().__init__()
        if model_type not in VISION_MODELS:
            raise ValueError(
                f"unknown vision model_type {model_type!r}; valid: {', '.join(VISION_MODELS)}"
            )
        if select not in FEATURE_SELECTS:
            raise ValueError(
                f"unknown vision select {select!r}; valid: {', '.join(FEATURE_SELECTS)}"
            )
        self.family = _family(model_type)
        if select == "cls_patch" and self.family not in _HAS_CLS:
            raise ValueError(f"{model_type} has no CLS token; use vision_select 'patch'")
        num_layers = model.config.num_hidden_layers
        # hidden_states holds the embeddings and then every layer: num_layers + 1 entries.
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"vision layer {layer} out of range for a {num_layers}-layer tower "
                f"(valid: {-(num_layers + 1)}..{num_layers})"
            )
        self.model = model
        self.model_type = model_type
        self.layer = layer
        self.select = select
        self.preprocessor_config = preprocessor_config
        self.hidden_size: int = model.config.hidden_size
        self.patch_size: int = model.config.patch_size
        self.image_size: int = model.config.image_size
        self.num_registers: int = getattr(model.config, "num_register_tokens", 0)
        self.requires_grad_(False)
        self.train(False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        layer: int = -2,
        select: str = "patch",
        dtype: torch.dtype = torch.float32,
    ) -> VisionTower:
        """Load a HF vision model dir (model class chosen by config.json's model_type)."""
        path = Path(path)
        raw = check_hf_dir(path, "vision tower")
        model_type = raw.get("model_type")
        if model_type not in VISION_MODELS:
            raise ModelDirError(
                f"{path / 'config.json'}: vision model_type {model_type!r} is not supported; "
                f"supported: {', '.join(VISION_MODELS)}"
            )
        config_class, model_class = VISION_MODELS[model_type]
        try:
            config = config_class.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
            raise ModelDirError(
                f"{path / 'config.json'}: not a valid {model_type} config: {exc}"
            ) from exc
        model = load_hf_model(model_class, path, "vision tower", dtype=dtype, config=config)
        pre_path = path / "preprocessor_config.json"
        pre = read_json_if_present(pre_path, "vision preprocessor config")
        return cls(model, model_type, layer=layer, select=select, preprocessor_config=pre)

    def train(self, mode: bool = True) -> VisionTower:
        """Stay in eval mode whatever the caller asks (the tower is frozen, paper §4.2)."""
        return super().train(False)

    @property
    def fixed_positions(self) -> bool:
        """Whether an input size other than `image_size` runs on interpolated position
        embeddings (CLIP, SigLIP); DINOv2 interpolates at every size it is not 518 px."""
        return self.family in _FIXED_POSITIONS

    def num_tokens(self, image_size: int) -> int:
        """Tokens per image at `image_size` (grid, plus CLS for `cls_patch`)."""
        grid = (image_size // self.patch_size) ** 2
        return grid + (1 if self.select == "cls_patch" else 0)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised pixels -> (N, T, Dv) features of the chosen layer."""
        pixel_values = pixel_values.to(self.model.dtype)
        kwargs = {}
        if self.fixed_positions and pixel_values.shape[-1] != self.image_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[self.layer]  # (N, T_all, Dv)
        if self.family not in _HAS_CLS:
            return hidden
        grid = hidden[:, 1 + self.num_registers :]  # (N, G, Dv)
        if self.select == "patch":
            return grid
        return torch.cat([hidden[:, :1], grid], dim=1)  # (N, 1 + G, Dv)

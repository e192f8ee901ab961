"""Import a Hugging Face Llava folder (`vistune import --from hf SRC --out DIR`).

Loads the folder as transformers does (`LlavaForConditionalGeneration.from_pretrained`,
safetensors only, no custom code, every tensor required: today's names or llava-hf's
pre-4.52 ones), and reads the tokenizer and the image processor settings
(processor_config.json, else preprocessor_config.json). The LLM's base model and head go
back into its own causal-LM class, the tower and the projector into vistune's. Each setting maps to vistune's or
is refused (vistune.interop.hf_layout.UnmappableError):

    vision_feature_layer (one int)             -> vision_layer
    vision_feature_select_strategy             -> vision_select (default: patch; full:
                                                  cls_patch, or patch on SigLIP)
    projector_hidden_act "gelu"                -> the mlp2x_gelu projector (no bias: zeros)
    do_pad / size / do_center_crop / crop_size -> image_aspect pad | resize | crop, image_size

The conversation template: the one a vistune export recorded (`vistune.json`), else the
one asked for, else `chat_template` when the tokenizer has one (and `vicuna_v0` when not).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, LlavaForConditionalGeneration

from vistune.config import ModelConfig
from vistune.errors import ModelDirError
from vistune.files import read_json
from vistune.interop import hf_layout
from vistune.interop.assemble import causal_lm, write_model_dir
from vistune.interop.hf_export import EXPORT_FORMAT, SIDECAR
from vistune.interop.hf_layout import UnmappableError
from vistune.model.checkpoint import (
    check_hf_dir,
    load_hf_model,
    load_tokenizer,
    quiet_transformers,
)

SUPPORTED = "llava (LlavaForConditionalGeneration)"


def _config(src: Path):
    raw = read_json(src / "config.json", "Llava config")
    if raw.get("model_type") != "llava":
        raise UnmappableError(
            f"{src / 'config.json'}: model_type {raw.get('model_type')!r} is not supported; "
            f"supported: {SUPPORTED}"
        )
    if "auto_map" in raw:
        raise ModelDirError(f"{src / 'config.json'}: declares custom code (auto_map); not loaded")
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(f"{src / 'config.json'}: not a valid Llava config: {exc}") from exc


def image_settings(src: Path) -> dict:
    """The image processor's settings: processor_config.json's, else preprocessor_config's."""
    processor = src / "processor_config.json"
    if processor.is_file():
        settings = read_json(processor, "processor config").get("image_processor")
        if isinstance(settings, dict):
            return settings
    pre = src / "preprocessor_config.json"
    if not pre.is_file():
        raise ModelDirError(
            f"{src}: missing the image processor settings (processor_config.json with an "
            "image_processor, or preprocessor_config.json)"
        )
    return read_json(pre, "image processor config")


def _template(src: Path, asked: str | None, sidecar: dict | None) -> str:
    if asked:
        return asked
    if sidecar is not None:
        return sidecar["model"]["template"]
    return "chat_template" if getattr(load_tokenizer(src), "chat_template", None) else "vicuna_v0"


def _sidecar(src: Path) -> dict | None:
    path = src / SIDECAR
    if not path.is_file():
        return None
    data = read_json(path, "vistune export settings")
    if data.get("format") != EXPORT_FORMAT or not isinstance(data.get("model"), dict):
        raise ModelDirError(f"{path}: not a vistune export's settings")
    return data


def model_config(src: Path, config, template: str | None = None) -> ModelConfig:
    """The vistune ModelConfig of a Llava folder (see the module docstring)."""
    family = hf_layout.tower_family(config.vision_config.model_type)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnmappableError(
            f"{src / 'config.json'}: vision_feature_layer {layer} concatenates several layers; "
            "vistune takes one"
        )
    if config.projector_hidden_act != hf_layout.GELU:
        raise UnmappableError(
            f"{src / 'config.json'}: projector_hidden_act {config.projector_hidden_act!r}; "
            f"vistune's mlp2x_gelu uses {hf_layout.GELU!r} (exact GELU)"
        )
    aspect, size = hf_layout.aspect_and_size(image_settings(src))
    sidecar = _sidecar(src)
    return ModelConfig(
        projector="mlp2x_gelu",
        vision_layer=layer,
        vision_select=hf_layout.vision_select(family, config.vision_feature_select_strategy),
        image_aspect=aspect,
        image_size=size,
        template=_template(src, template, sidecar),
    )


def import_hf(src: str | Path, out: str | Path, template: str | None = None) -> Path:
    """Write the vistune model directory of the Llava folder `src` at `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ModelDirError(f"{src}: Llava folder not found")
    config = _config(src)
    settings = model_config(src, config, template)
    pre = image_settings(src)
    mean, std = tuple(pre.get("image_mean", ())), tuple(pre.get("image_std", ()))
    if len(mean) != 3 or len(std) != 3:
        raise UnmappableError(f"{src}: image_mean / image_std must have 3 values each")
    check_hf_dir(src, "Llava model", tokenizer=True)
    # mismatched shapes come back as a list that load_hf_model names, not as a traceback
    hf = load_hf_model(LlavaForConditionalGeneration, src, "Llava model", dtype="auto",
                       ignore_mismatched_sizes=True)  # fmt: skip
    llm = causal_lm(config.text_config, hf.model.language_model, hf.lm_head, src)
    llm.generation_config = hf.generation_config
    layers = hf.model.multi_modal_projector.state_dict()
    projector = {ours: layers[theirs] for ours, theirs in hf_layout.PROJECTOR_NAMES.items()
                 if theirs in layers}  # fmt: skip
    if not config.multimodal_projector_bias:  # a bias-free Linear is one with zero bias
        for layer in ("0", "2"):
            weight = projector[f"{layer}.weight"]
            projector[f"{layer}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    vision = hf.model.vision_tower
    return write_model_dir(out, vision, llm, src, projector, settings, mean, std, src)

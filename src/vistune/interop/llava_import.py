"""Import an official LLaVA checkpoint (haotian-liu/LLaVA's layout; `vistune import --from
llava SRC --out DIR`).

That layout is one causal-LM folder (`LlavaLlamaForCausalLM`): the LLM's own tensors
(`model.*`, `lm_head.weight`), the projector as `model.mm_projector.*` (llava/model/
multimodal_projector/builder.py: `linear` is one nn.Linear, `mlp2x_gelu` is
Sequential(Linear, GELU, Linear), vistune's own names), the tokenizer, and in config.json
the multimodal settings, mapped here one to one (LLaVA's llava_arch.py, clip_encoder.py):

    mm_vision_tower            -> the vision tower folder (a local path; --vision-tower wins)
    mm_projector_type          -> projector (linear, the default, or mlp2x_gelu)
    mm_vision_select_layer     -> vision_layer
    mm_vision_select_feature   -> vision_select (patch, the default, or cls_patch)
    image_aspect_ratio         -> image_aspect (pad; square or absent: CLIP's resize + crop)
    the tower's image size     -> image_size

Refused, each with a reason: another model_type than llava_llama, `mm_use_im_start_end` or
`mm_use_im_patch_token` (extra image tokens vistune does not write), `anyres` images,
projectors other than those two, and pickled `.bin` weights (never unpickled: convert them
to safetensors first). Tower tensors in the checkpoint (`model.vision_tower.vision_tower.*`,
a tuned tower) replace the folder's, as LLaVA's own loading does.

The conversation template is not in the checkpoint (LLaVA picks it by the model's name);
`--template` sets it, `vicuna_v0` by default (the paper's; LLaVA-1.5 was tuned with
`vicuna_v1`, which vistune does not have).
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from vistune.config import ModelConfig
from vistune.data.image import ImageProcessor
from vistune.errors import ModelDirError
from vistune.files import read_json
from vistune.interop.assemble import read_tensors, write_model_dir
from vistune.interop.hf_layout import UnmappableError
from vistune.model.checkpoint import check_hf_dir, load_hf_model
from vistune.model.vision import VisionTower

TEXT_MODELS = {"llava_llama": ("llama", LlamaConfig, LlamaForCausalLM)}
"""Official LLaVA model_type -> (the LLM's model_type, config class, causal-LM class)."""
PROJECTORS = {"linear": "linear", "mlp2x_gelu": "mlp2x_gelu"}
"""mm_projector_type -> vistune projector (the same modules, the same tensor names)."""
ASPECTS = {"pad": "pad", "square": "crop", None: "crop"}
"""image_aspect_ratio -> vistune image_aspect (LLaVA's `square` runs CLIP's own preprocess)."""
SELECTS = ("patch", "cls_patch")
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower.vision_tower."
DEFAULT_TEMPLATE = "vicuna_v0"


def _tower_dir(src: Path, raw: dict, given: str | Path | None) -> Path:
    if given is not None:
        path = Path(given)
    else:
        named = raw.get("mm_vision_tower") or raw.get("vision_tower")
        if not isinstance(named, str):
            raise ModelDirError(
                f"{src / 'config.json'}: no mm_vision_tower; give --vision-tower DIR"
            )
        path = Path(named).expanduser()
        if not path.is_absolute() and (src / path).is_dir():
            path = src / path
    if not path.is_dir():
        raise ModelDirError(
            f"{src / 'config.json'}: vision tower {str(path)!r} is not a local folder; give "
            "--vision-tower DIR (a Hugging Face CLIP/SigLIP/DINOv2 folder with safetensors)"
        )
    return path


def _checked(src: Path, raw: dict) -> None:
    problems = []
    if raw.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end (<im_start>/<im_end> around the image)")
    if raw.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_patch_token (<im_patch> tokens)")
    if raw.get("image_aspect_ratio") not in ASPECTS:
        problems.append(
            f"image_aspect_ratio {raw.get('image_aspect_ratio')!r} (supported: pad, square)"
        )
    projector = raw.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        problems.append(f"mm_projector_type {projector!r} (supported: {', '.join(PROJECTORS)})")
    if raw.get("mm_vision_select_feature", "patch") not in SELECTS:
        problems.append(
            f"mm_vision_select_feature {raw.get('mm_vision_select_feature')!r} (supported: "
            f"{', '.join(SELECTS)})"
        )
    if not isinstance(raw.get("mm_vision_select_layer"), int):
        problems.append("mm_vision_select_layer missing or not one integer")
    if problems:
        raise UnmappableError(f"{src / 'config.json'}: not supported: {'; '.join(problems)}")


def _text_config(raw: dict):
    """The LLM's config: config.json without LLaVA's own keys, as the LLM's model_type."""
    llm_type, config_class, _ = TEXT_MODELS[raw["model_type"]]
    keep = {
        k: v for k, v in raw.items()
        if not k.startswith(("mm_", "tune_mm", "freeze_mm", "unfreeze_mm"))
        and k not in ("model_type", "architectures", "image_aspect_ratio", "image_grid_pinpoints",
                      "mm_vision_tower", "vision_tower", "use_mm_proj", "tokenizer_padding_side",
                      "tokenizer_model_max_length", "auto_map")
    }  # fmt: skip
    return config_class.from_dict({**keep, "model_type": llm_type})


def import_llava(
    src: str | Path,
    out: str | Path,
    vision_tower: str | Path | None = None,
    template: str | None = None,
) -> Path:
    """Write the vistune model directory of the official LLaVA checkpoint `src` at `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ModelDirError(f"{src}: LLaVA checkpoint folder not found")
    raw = read_json(src / "config.json", "LLaVA config")
    if raw.get("model_type") not in TEXT_MODELS:
        raise UnmappableError(
            f"{src / 'config.json'}: model_type {raw.get('model_type')!r} is not supported; "
            f"supported: {', '.join(TEXT_MODELS)} (LlavaLlamaForCausalLM)"
        )
    _checked(src, raw)
    tower_dir = _tower_dir(src, raw, vision_tower)
    check_hf_dir(src, "LLaVA checkpoint", tokenizer=True)
    select = raw.get("mm_vision_select_feature", "patch")
    tower = VisionTower.from_pretrained(tower_dir, raw["mm_vision_select_layer"], select)
    _take_tuned_tower(tower.model, read_tensors(src, "LLaVA", TOWER_PREFIX), src)
    projector = read_tensors(src, "LLaVA", PROJECTOR_PREFIX)
    if not projector:
        raise ModelDirError(f"{src}: no {PROJECTOR_PREFIX}* tensors (the projector)")
    text_config = _text_config(raw)
    llm = load_hf_model(text_config_class(raw), src, "LLM", dtype="auto", config=text_config)
    pre = ImageProcessor.from_vision_dir(tower_dir, size=tower.image_size)
    settings = ModelConfig(
        projector=PROJECTORS[raw.get("mm_projector_type", "linear")],
        vision_layer=raw["mm_vision_select_layer"],
        vision_select=select,
        image_aspect=ASPECTS[raw.get("image_aspect_ratio")],
        image_size=tower.image_size,
        template=template or DEFAULT_TEMPLATE,
    )
    return write_model_dir(out, tower.model, llm, src, projector, settings, pre.mean, pre.std, src)


def text_config_class(raw: dict):
    """The causal-LM class of an official checkpoint's LLM (LlamaForCausalLM, ...)."""
    return TEXT_MODELS[raw["model_type"]][2]


def _take_tuned_tower(model, tensors: dict, src: Path) -> None:
    """Put a checkpoint's own tower tensors (a tuned tower) over the folder's: LLaVA's
    names (`vision_model.*`, pre-5 CLIP) or the module's own."""
    if not tensors:
        return
    own = model.state_dict()
    renamed = {}
    for key, value in tensors.items():
        name = key if key in own else key.removeprefix("vision_model.")
        if name not in own or own[name].shape != value.shape:
            raise ModelDirError(
                f"{src}: tower tensor {TOWER_PREFIX}{key} does not fit the vision tower "
                f"{type(model).__name__}"
            )
        renamed[name] = value
    model.load_state_dict(renamed, strict=False)

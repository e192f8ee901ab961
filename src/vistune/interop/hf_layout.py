"""What a vistune model is in the Hugging Face Llava layout, and back: the explicit names.

transformers 5's `LlavaForConditionalGeneration` (models/llava/modeling_llava.py) holds

    model.vision_tower.*            AutoModel of `vision_config` (CLIPVisionModel, ...)
    model.multi_modal_projector.*   linear_1, act (`projector_hidden_act`), linear_2
    model.language_model.*          AutoModel of `text_config` (the LLM without its head)
    lm_head.weight                  Linear(hidden, vocab, bias=False)

and picks image features as `hidden_states[vision_feature_layer]`, dropping the first token
when `vision_feature_select_strategy` is "default" and keeping all of them when "full".
llava-hf's llava-1.5 releases were written before 4.52 with the older names
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`); the importer reads through transformers' own loading, whose
conversion_mapping.py renames them (one copy of that knowledge, theirs).

Settings map one to one or are refused (`UnmappableError`), never approximated: a choice
with no place in the layout would give another model under the same name.
"""

from __future__ import annotations

from collections.abc import Mapping

from vistune.errors import ModelDirError

VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."
LLM_PREFIX = "model.language_model."
HEAD_PREFIX = "lm_head."

PROJECTOR_NAMES: dict[str, str] = {
    "0.weight": "linear_1.weight",
    "0.bias": "linear_1.bias",
    "2.weight": "linear_2.weight",
    "2.bias": "linear_2.bias",
}
"""vistune's mlp2x_gelu (nn.Sequential: Linear, GELU, Linear) -> the HF projector's names."""

SUPPORTED_TOWERS = ("clip", "siglip", "dinov2")
"""Tower families whose token layout HF Llava's feature selection reproduces."""
_HAS_CLS = {"clip": True, "siglip": False, "dinov2": True}
GELU = "gelu"
"""transformers' ACT2FN["gelu"] is the exact (erf) GELU, as torch.nn.GELU() in mlp2x_gelu."""


class UnmappableError(ModelDirError):
    """A setting with no faithful place in the other layout."""


def tower_family(model_type: str) -> str:
    """clip / siglip / dinov2 for a vision config's model_type; UnmappableError otherwise
    (DINOv2 with registers: HF Llava's "default" drops only the CLS token, so the registers
    would reach the projector, which vistune never feeds them)."""
    family = model_type.removesuffix("_vision_model")
    if family not in SUPPORTED_TOWERS:
        raise UnmappableError(
            f"vision tower {model_type!r} has no HF Llava mapping; supported: "
            f"{', '.join(SUPPORTED_TOWERS)} (DINOv2 with registers: HF Llava would feed the "
            "register tokens to the projector)"
        )
    return family


def select_strategy(family: str, select: str) -> str:
    """vistune's `vision_select` -> LlavaConfig.vision_feature_select_strategy."""
    if select == "patch":
        return "default" if _HAS_CLS[family] else "full"  # SigLIP: every token is a patch
    if select == "cls_patch" and _HAS_CLS[family]:
        return "full"
    raise UnmappableError(f"vision_select {select!r} on a {family} tower has no HF Llava mapping")


def vision_select(family: str, strategy: str) -> str:
    """LlavaConfig.vision_feature_select_strategy -> vistune's `vision_select`."""
    if strategy == "default" and _HAS_CLS[family]:
        return "patch"
    if strategy == "full":
        return "cls_patch" if _HAS_CLS[family] else "patch"
    raise UnmappableError(
        f"vision_feature_select_strategy {strategy!r} on a {family} tower drops a patch token; "
        "supported: 'default' on CLIP/DINOv2, 'full' on any"
    )


def image_processor_settings(size: int, aspect: str, mean, std) -> dict:
    """LlavaImageProcessor settings that give vistune's ImageProcessor's pixels exactly:
    `pad` (LLaVA's expand2square with the mean colour, then a bicubic resize), `resize`
    (squash) or `crop` (shorter side, then the centre square)."""
    common = {
        "image_mean": list(mean),
        "image_std": list(std),
        "resample": 3,  # PIL bicubic, as vistune.data.image
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_resize": True,
    }
    square = {"height": size, "width": size}
    if aspect == "crop":
        return {**common, "do_pad": False, "size": {"shortest_edge": size},
                "do_center_crop": True, "crop_size": square}  # fmt: skip
    return {**common, "do_pad": aspect == "pad", "size": square, "do_center_crop": False,
            "crop_size": square}  # fmt: skip


def aspect_and_size(settings: Mapping) -> tuple[str, int]:
    """(vistune image_aspect, image_size) of a LlavaImageProcessor / CLIPImageProcessor
    config; UnmappableError for settings vistune's ImageProcessor does not reproduce."""

    def side(value) -> int | None:
        if isinstance(value, int):
            return value
        if isinstance(value, Mapping):
            h, w = value.get("height"), value.get("width")
            return h if h is not None and h == w else None
        return None

    size, crop = settings.get("size", {}), settings.get("crop_size")
    resample = settings.get("resample", 3)
    problems = []
    if resample != 3:
        problems.append(f"resample {resample} (vistune resizes bicubic, 3)")
    if not settings.get("do_resize", True) or not settings.get("do_normalize", True):
        problems.append("no resize or no normalisation")
    if abs(settings.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        problems.append(f"rescale_factor {settings.get('rescale_factor')}")
    shortest = size.get("shortest_edge") if isinstance(size, Mapping) else None
    if settings.get("do_center_crop", False):
        aspect, image_size = "crop", side(crop)
        if shortest is None or shortest != image_size:
            problems.append(f"size {size} with a centre crop of {crop} (crop needs them equal)")
        if settings.get("do_pad"):
            aspect = "pad"  # a square padded image: shorter side = crop = a plain resize
    else:
        aspect, image_size = ("pad" if settings.get("do_pad") else "resize"), side(size)
    if image_size is None:
        problems.append(f"a non-square size {size}")
    if problems:
        raise UnmappableError(
            f"image processor settings vistune cannot reproduce: {'; '.join(problems)}"
        )
    return aspect, int(image_size)

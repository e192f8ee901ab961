"""The LLaVA model (paper §4.1): frozen vision tower, projector, causal LM, composed.

    from vistune.model import load_model
    model = load_model("default")        # packaged DINOv2 ViT-S/14 + SmolLM2-135M, fresh projector
    model = load_model("runs/finetune/model")  # a model directory written by LlavaModel.save
    model = load_model("runs/finetune")  # or the training output that holds it in model/

Parts: `vision.VisionTower`, `projector.build_projector`, `llava.LlavaModel`;
`checkpoint` reads and writes model directories.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from vistune.model.llava import LlavaModel

DEFAULT_SPEC = "default"
DEFAULT_TEMPLATE = "chat_template"
"""The packaged LLM is an instruct model: its own chat template suits it before any tuning."""


def model_dir_of(path: str | Path) -> Path:
    """A model directory, or a training output holding one in `model/`."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def model_notes(model: LlavaModel, spec: str | Path, template: str | None = None) -> list[str]:
    """What a user asking `model` (loaded from `spec`) questions should know first: an
    untrained projector ignores the image; the plain template (stage 1) shows the model
    the image only, never the question. `template`: the one used instead of the model's."""
    notes = []
    if not getattr(model, "projector_trained", True):
        which = "the packaged base model" if str(spec) == DEFAULT_SPEC else str(spec)
        notes.append(f"{which} has an untrained projector, so its answers ignore the image")
    if (template or model.config.template) == "plain":
        notes.append(
            "the plain template (a stage-1 model) renders only the image, so the model "
            "captions it and the question is not shown to it"
        )
    return notes


def load_model(spec: str | Path, dtype: torch.dtype | None = None) -> LlavaModel:
    """A model from a directory (or a training output holding one in `model/`), or
    "default": the packaged weights with a fresh projector.

    The default model's projector is untrained (`model.projector_trained` is False): its
    image tokens carry no meaning to the LLM until stage 1 has run.
    """
    import torch

    from vistune.config import ModelConfig
    from vistune.model.llava import LlavaModel

    dtype = torch.float32 if dtype is None else dtype
    if str(spec) == DEFAULT_SPEC:
        from vistune.weights import ensure_default_weights

        weights = ensure_default_weights()
        config = ModelConfig(template=DEFAULT_TEMPLATE)
        return LlavaModel.from_parts(
            weights.vision_dir, weights.llm_dir, config, seed=0, dtype=dtype
        ).eval()
    return LlavaModel.load(model_dir_of(spec), dtype=dtype)


__all__ = ["DEFAULT_SPEC", "load_model", "model_dir_of", "model_notes"]

"""Fixtures for the interop tests: tiny vistune model directories on each tower, and the
helpers that run one prompt through vistune and through transformers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

QUESTION = "What is in the image?"


@pytest.fixture(scope="session")
def tiny_towers(tiny_clip_dir, tiny_siglip_dir, tiny_dinov2_dir) -> dict[str, Path]:
    return {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir, "dinov2": tiny_dinov2_dir}


@pytest.fixture(scope="session")
def make_model_dir(tiny_towers, tiny_llm_dir, tmp_path_factory):
    """(tower, **ModelConfig fields) -> a saved tiny model directory (cached per settings)."""
    from vistune.config import ModelConfig
    from vistune.model.llava import LlavaModel

    made: dict[tuple, Path] = {}

    def make(tower: str = "clip", seed: int = 0, **settings) -> Path:
        key = (tower, seed, tuple(sorted(settings.items())))
        if key not in made:
            config = ModelConfig(**{"image_size": 28, "template": "chat_template", **settings})
            model = LlavaModel.from_parts(tiny_towers[tower], tiny_llm_dir, config, seed=seed)
            with torch.no_grad():  # a trained-looking position table, not zeros
                for p in model.projector.parameters():
                    if p.dim() == 2 and p.shape[0] == model.num_image_tokens:
                        p.normal_()
            model.projector_trained = True
            made[key] = model.save(tmp_path_factory.mktemp(f"md_{tower}") / "model")
        return made[key]

    return make


def make_image(width: int = 41, height: int = 23, seed: int = 0) -> Image.Image:
    """A random non-square RGB image (padding and resizing both show)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_messages(question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def hf_inputs(processor, image: Image.Image, question: str = QUESTION) -> dict:
    """The processor's inputs for one image and question, through its chat template."""
    prompt = processor.apply_chat_template(hf_messages(question), add_generation_prompt=True)
    return processor(images=[image], text=prompt, return_tensors="pt")


def vistune_ids(model, image: Image.Image, question: str = QUESTION) -> list[int]:
    """The prompt ids `vistune chat` builds (IMAGE_TOKEN_ID where the image goes)."""
    from vistune.data.conversation import tokenize_prompt
    from vistune.serve.engine import with_image

    messages = with_image([{"role": "user", "content": question}], image)
    return tokenize_prompt(messages, model.tokenizer, model.config.template)


@torch.no_grad()
def vistune_logits(model, image: Image.Image, question: str = QUESTION) -> torch.Tensor:
    """vistune's logits (1, L, V) for the prompt `vistune chat` builds."""
    ids = vistune_ids(model, image, question)
    return model(input_ids=[ids], pixel_values=model.image_processor([image])).logits


def load_hf(out: Path):
    """(LlavaForConditionalGeneration, processor) from `out`, as a user loads them."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(out)


@pytest.fixture(scope="session")
def interop() -> SimpleNamespace:
    """The helpers above (pytest's importlib mode makes conftest unimportable):
    `make_image`, `hf_messages`, `hf_inputs`, `vistune_ids`, `vistune_logits`, `load_hf`, `QUESTION`."""
    return SimpleNamespace(
        make_image=make_image,
        hf_messages=hf_messages,
        hf_inputs=hf_inputs,
        vistune_ids=vistune_ids,
        vistune_logits=vistune_logits,
        load_hf=load_hf,
        QUESTION=QUESTION,
    )

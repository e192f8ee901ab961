"""Shared fixtures. Tests run on the CPU with tiny models built from configs; the few that
need the packaged default weights use `default_weights` (converted once per machine into
VISTUNE_HOME, then reused).

Tiny fixtures (session-scoped, built in a few seconds, saved as real HF directories):

| fixture          | what                                                              |
| ---------------- | ----------------------------------------------------------------- |
| `tiny_llm_dir`   | LlamaForCausalLM: hidden 32, 2 layers, 4 heads (2 KV), MLP 64,    |
|                  | vocab = the tiny byte-level BPE tokenizer (~600 ids), tied        |
|                  | embeddings, max 512 positions; ChatML chat_template;              |
|                  | eos `<|im_end|>`, pad `<pad>`                                     |
| `tiny_clip_dir`  | CLIPVisionModel: image 28, patch 14 (2x2 = 4 patches + CLS),      |
|                  | hidden 32, 2 layers, 4 heads; OpenAI CLIP mean/std                |
| `tiny_dinov2_dir`| Dinov2Model: image 28, patch 14 (4 patches + CLS), hidden 32,     |
|                  | 2 layers, 4 heads; ImageNet mean/std                              |
| `tiny_siglip_dir`| SiglipVisionModel: image 28, patch 14 (4 patches, no CLS),        |
|                  | hidden 32, 2 layers, 4 heads; mean/std 0.5                        |
| `tiny_model`     | LlavaModel.from_parts(tiny_clip_dir, tiny_llm_dir,                |
|                  | ModelConfig(image_size=28)): 4 image tokens, mlp2x_gelu 32->32    |
| `tiny_builders`  | the builder functions above, for variants (other sizes, kinds)    |

Every tiny tower has a preprocessor_config.json (image_mean, image_std, size). The tiny
models are random (seeded, deterministic) and say nothing sensible; use them for shapes,
equalities and plumbing. Treat the session fixtures as read-only (save copies elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(2)

TINY_IMAGE_SIZE = 28
"""Side of the tiny towers' images: 28 / patch 14 -> a 2x2 grid, 4 patch tokens."""

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "### Human: What is in the image? ### Assistant: A red circle on a white background.",
    "Describe the image concisely. A cat sits on a wooden table next to a cup of coffee.",
    "What color is the square? The square is blue. Where is the triangle? On the left.",
    "How many objects are there? There are three objects: a circle, a square and a star.",
    "The astronaut stands in front of the flag. The rocket is on the launch pad.",
    "Give a short caption. A man rides a motorcycle down a road on a sunny day.",
    "Question: Which of these states is farthest north? Answer: The answer is A.",
    "Reasoning: the picture shows a green triangle above a yellow square, so yes.",
    "system user assistant Human Assistant image picture photo scene object colour",
    "0 1 2 3 4 5 6 7 8 9 10 100 left right top bottom middle large small big tiny",
]


def build_bpe_tokenizer(corpus: list[str], vocab_size: int, specials: list[str], **fast):
    """A deterministic byte-level BPE tokenizer trained on `corpus`; `fast`: the
    PreTrainedTokenizerFast arguments (eos_token, pad_token, chat_template, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **fast)


def build_tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer (~600 ids) with ChatML special tokens."""
    return build_bpe_tokenizer(
        _CORPUS * 4,
        600,
        _SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=_CHATML_TEMPLATE,
        model_max_length=512,
    )


def build_tiny_llm(path: Path) -> Path:
    """Save a tiny random LlamaForCausalLM + the tiny tokenizer at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Larger than the usual 0.02 so a random model's logits are not near ties.
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_TOWER_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def write_preprocessor_config(path: Path, mean: list[float], std: list[float], size: int) -> None:
    config = {
        "image_mean": mean,
        "image_std": std,
        "size": {"height": size, "width": size},
        "crop_size": {"height": size, "width": size},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_tower(kind: str, path: Path, size: int = TINY_IMAGE_SIZE) -> Path:
    """Save a tiny random vision tower ("clip", "dinov2", "siglip") at `path`."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(1)
    if kind == "clip":
        config = CLIPVisionConfig(image_size=size, patch_size=14, projection_dim=32, **_TOWER_SIZES)
        model, mean, std = CLIPVisionModel(config), _CLIP_MEAN, _CLIP_STD
    elif kind == "dinov2":
        config = Dinov2Config(image_size=size, patch_size=14, mlp_ratio=2, **_TOWER_SIZES)
        model, mean, std = Dinov2Model(config), _IMAGENET_MEAN, _IMAGENET_STD
    elif kind == "siglip":
        config = SiglipVisionConfig(image_size=size, patch_size=14, **_TOWER_SIZES)
        model, mean, std = SiglipVisionModel(config), [0.5] * 3, [0.5] * 3
    else:
        raise ValueError(f"unknown tiny tower {kind!r}; valid: clip, dinov2, siglip")
    model.eval().save_pretrained(path)
    write_preprocessor_config(path, mean, std, size)
    return path


@pytest.fixture(scope="session")
def default_weights():
    """Paths of the converted packaged weights (SmolLM2-135M-Instruct, DINOv2 ViT-S/14)."""
    from vistune.weights import ensure_default_weights

    return ensure_default_weights()


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """Tiny LlamaForCausalLM dir (hidden 32, 2 layers, ~600-token BPE, ChatML template)."""
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """Tiny CLIPVisionModel dir (image 28, patch 14, hidden 32, 2 layers): 4 patches + CLS."""
    return build_tiny_tower("clip", tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """Tiny Dinov2Model dir (image 28, patch 14, hidden 32, 2 layers): 4 patches + CLS."""
    return build_tiny_tower("dinov2", tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> Path:
    """Tiny SiglipVisionModel dir (image 28, patch 14, hidden 32, 2 layers): 4 patches."""
    return build_tiny_tower("siglip", tmp_path_factory.mktemp("tiny_siglip"))


@pytest.fixture(scope="session")
def tiny_model(tiny_clip_dir, tiny_llm_dir):
    """LlavaModel on the tiny CLIP + tiny Llama (4 image tokens, mlp2x_gelu, seed 0), eval mode.

    Session-scoped: tests that train or change it must work on a copy
    (`copy.deepcopy(tiny_model)`).
    """
    from vistune.config import ModelConfig
    from vistune.model.llava import LlavaModel

    return LlavaModel.from_parts(
        tiny_clip_dir, tiny_llm_dir, ModelConfig(image_size=TINY_IMAGE_SIZE)
    ).eval()


@pytest.fixture(scope="session")
def tiny_builders() -> SimpleNamespace:
    """The builders behind the tiny fixtures, for tests that need variants (pytest runs in
    importlib mode, so conftest is not importable): `build_tiny_tokenizer()`,
    `build_tiny_llm(path)`, `build_tiny_tower(kind, path, size=28)`,
    `write_preprocessor_config(path, mean, std, size)`, and `image_size` (28)."""
    return SimpleNamespace(
        build_tiny_tokenizer=build_tiny_tokenizer,
        build_tiny_llm=build_tiny_llm,
        build_tiny_tower=build_tiny_tower,
        write_preprocessor_config=write_preprocessor_config,
        image_size=TINY_IMAGE_SIZE,
    )

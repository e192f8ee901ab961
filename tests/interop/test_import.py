"""`import_hf` and `import_llava`: checkpoints built here in each foreign layout become
vistune model directories that compute the source's logits, and that chat and training
accept."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vistune.data.conversation import IMAGE_TOKEN_ID
from vistune.interop.hf_import import import_hf
from vistune.interop.llava_import import import_llava
from vistune.model.llava import LlavaModel


def build_hf_llava(path: Path, tiny_builders, legacy: bool = False) -> Path:
    """A tiny random LlavaForConditionalGeneration folder as llava-hf's releases lay it out:
    CLIP tower, untied Llama, `<image>` added to the tokenizer, CLIP's resize + centre crop
    processor; with `legacy`, the pre-4.52 tensor names."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tokenizer = tiny_builders.build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer) + 7, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, initializer_range=0.1,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=600,
                         image_seq_length=4, vision_feature_layer=-2)  # fmt: skip
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path)
    images = LlavaImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True
    )
    LlavaProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)  # fmt: skip
    if legacy:
        renames = [("model.language_model.", "language_model.model."),
                   ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower.vision_model."),
                   ("model.multi_modal_projector.", "multi_modal_projector.")]  # fmt: skip
        tensors = load_file(str(path / "model.safetensors"))
        old = {}
        for key, value in tensors.items():
            new = next((o + key[len(n) :] for n, o in renames if key.startswith(n)), key)
            old[new] = value
        save_file(old, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def collapse(ids: list[int], image_id: int) -> list[int]:
    """HF ids with a run of image tokens -> vistune ids with one IMAGE_TOKEN_ID."""
    out: list[int] = []
    for i in ids:
        if i == image_id:
            if not out or out[-1] != IMAGE_TOKEN_ID:
                out.append(IMAGE_TOKEN_ID)
        else:
            out.append(i)
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_import_hf_gives_the_sources_logits(legacy, tiny_builders, interop, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src = build_hf_llava(tmp_path / "src", tiny_builders, legacy=legacy)
    out = import_hf(src, tmp_path / "model")
    model = LlavaModel.load(out)
    assert model.config.projector == "mlp2x_gelu"
    assert (model.config.vision_layer, model.config.vision_select) == (-2, "patch")
    assert (model.config.image_aspect, model.config.image_size) == ("crop", 28)
    assert model.config.template == "chat_template"  # the tokenizer has one
    hf = LlavaForConditionalGeneration.from_pretrained(src).eval()
    processor = AutoProcessor.from_pretrained(src)
    image = interop.make_image()
    inputs = processor(images=[image], text="<image>\nWhat is it?", return_tensors="pt")
    ids = collapse(inputs["input_ids"][0].tolist(), 600)
    torch.testing.assert_close(model.image_processor([image]), inputs["pixel_values"],
                               atol=1e-6, rtol=0)  # fmt: skip
    with torch.no_grad():
        theirs = hf(**inputs).logits
        ours = model(input_ids=[ids], pixel_values=inputs["pixel_values"]).logits
    assert ours.shape == theirs.shape  # the whole vocabulary, <image> and padding rows too
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_imported_model_chats_and_trains_from(tiny_builders, interop, tmp_path, capsys):
    from tests.train.conftest import tiny_args, write_dataset
    from vistune.cli import main
    from vistune.train.config import TrainConfig
    from vistune.train.loop import train

    out = import_hf(build_hf_llava(tmp_path / "src", tiny_builders), tmp_path / "model")
    interop.make_image().save(tmp_path / "x.png")
    code = main(["chat", "--model", str(out), "--image", str(tmp_path / "x.png"),
                 "--prompt", "What is it?", "--max-tokens", "4", "--dtype", "fp32"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.strip()
    data = write_dataset(tmp_path / "data", n=8)
    cfg = TrainConfig(**tiny_args(data, tmp_path / "run", tmp_path / "feats", out, max_steps=1))
    assert train(cfg).steps == 1
    trained, imported = (LlavaModel.load(p).config for p in (tmp_path / "run" / "model", out))
    assert trained == replace(imported, template="plain")  # stage 1 trains under plain


def build_official(path: Path, tower: Path, tiny_builders, **settings) -> Path:
    """A tiny official-layout LLaVA folder: a Llama's tensors + `model.mm_projector.*`,
    the multimodal settings in config.json, the tower named by path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_builders.build_tiny_tokenizer()
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, initializer_range=0.1)  # fmt: skip
    torch.manual_seed(5)
    llm = LlamaForCausalLM(text)
    tensors = {k: v.contiguous() for k, v in llm.state_dict().items()}
    projector = settings.get("mm_projector_type", "mlp2x_gelu")
    if projector == "linear":
        layers = {"weight": torch.randn(48, 32) * 0.2, "bias": torch.randn(48) * 0.2}
    else:
        layers = {"0.weight": torch.randn(48, 32) * 0.2, "0.bias": torch.randn(48) * 0.2,
                  "2.weight": torch.randn(48, 48) * 0.2, "2.bias": torch.randn(48) * 0.2}  # fmt: skip
    tensors.update({f"model.mm_projector.{k}": v for k, v in layers.items()})
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {**text.to_dict(), "model_type": "llava_llama",
              "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": str(tower),
              "mm_projector_type": projector, "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False, **settings}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def official_logits(src: Path, tower: Path, ids: list[int], pixels: torch.Tensor, select: str):
    """LLaVA's own forward, written out: CLIP hidden_states[layer] (patches, or CLS too),
    mm_projector, the image rows in place of the placeholder, the LLM on embeddings."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    raw = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in raw.items() if not k.startswith("mm_")
                                          and k != "model_type"})).eval()  # fmt: skip
    llm.load_state_dict({k: v for k, v in tensors.items() if "mm_projector" not in k})
    feats = CLIPVisionModel.from_pretrained(tower)(pixels, output_hidden_states=True)
    feats = feats.hidden_states[raw["mm_vision_select_layer"]]
    feats = feats[:, 1:] if select == "patch" else feats
    p = {k[len("model.mm_projector.") :]: v for k, v in tensors.items() if "mm_projector" in k}
    if "weight" in p:
        rows = feats @ p["weight"].T + p["bias"]
    else:
        hidden = torch.nn.functional.gelu(feats @ p["0.weight"].T + p["0.bias"])
        rows = hidden @ p["2.weight"].T + p["2.bias"]
    at = ids.index(IMAGE_TOKEN_ID)
    embed = llm.get_input_embeddings()
    pieces = [embed(torch.tensor(ids[:at])), rows[0], embed(torch.tensor(ids[at + 1 :]))]
    return llm(inputs_embeds=torch.cat(pieces)[None]).logits


@pytest.mark.parametrize(
    ("projector", "select"), [("mlp2x_gelu", "patch"), ("linear", "cls_patch")]
)
def test_import_llava_gives_the_official_forwards_logits(
    projector, select, tiny_clip_dir, tiny_builders, tmp_path
):
    src = build_official(tmp_path / "src", tiny_clip_dir, tiny_builders,
                         mm_projector_type=projector, mm_vision_select_feature=select)  # fmt: skip
    out = import_llava(src, tmp_path / "model")
    model = LlavaModel.load(out)
    assert model.config.projector == projector and model.config.vision_select == select
    assert (model.config.image_aspect, model.config.image_size) == ("pad", 28)
    ids = model.tokenizer("What is", add_special_tokens=False)["input_ids"]
    ids = [ids[0], IMAGE_TOKEN_ID, *ids[1:]]
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        ours = model(input_ids=[ids], pixel_values=pixels).logits
    theirs = official_logits(src, tiny_clip_dir, ids, pixels, select)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_import_llava_takes_the_tower_flag_and_a_tuned_tower(
    tiny_clip_dir, tiny_builders, tmp_path
):
    src = build_official(tmp_path / "src", tmp_path / "nowhere", tiny_builders)
    tuned = load_file(str(tiny_clip_dir / "model.safetensors"))["post_layernorm.weight"] + 1
    tensors = load_file(str(src / "model.safetensors"))
    # LLaVA's names: its CLIPVisionTower holds the CLIPVisionModel as `vision_tower`
    tensors["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = tuned
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = import_llava(src, tmp_path / "model", vision_tower=tiny_clip_dir)
    model = LlavaModel.load(out)
    torch.testing.assert_close(model.vision.model.state_dict()["post_layernorm.weight"], tuned)

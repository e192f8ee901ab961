"""Export a vistune model directory to the Hugging Face Llava layout (`vistune export`).

    export_hf("runs/finetune/model", "exports/llava-hf")
    LlavaForConditionalGeneration.from_pretrained("exports/llava-hf")  # no custom code
    AutoProcessor.from_pretrained("exports/llava-hf")                  # LlavaProcessor

The folder holds the Llava weights and config (names: vistune.interop.hf_layout), the
processor (the tokenizer with an `<image>` token added, a LlavaImageProcessor whose pixels
equal vistune's, the chat template vistune trained with: vistune.interop.chat_template),
a generation config, `vistune.json` (the vistune settings, read back by `vistune import`)
and a model card (vistune.interop.model_card).

`<image>` needs an id: the tokenizer's next one. Where that is past the LLM's embedding
rows, one zero row is added to the embedding (and head): the row is never read as input
(image features replace it) and `generation_config.suppress_tokens` keeps `generate` from
emitting it, so text logits and greedy answers are vistune's.

Before the folder is put in place the export checks itself: on a probe image and question,
the processor's token ids and pixels and the Llava model's logits must equal vistune's
(`verify`). What fails, or what has no place in the layout (a `linear` or
`mlp2x_gelu_pos` projector, DINOv2 registers, a CLIP/SigLIP tower run at another size than
its own), is refused with one message; nothing is left at `out` (vistune.files.staged_dir).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import vistune
from vistune.data.conversation import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    tokenize_prompt,
)
from vistune.errors import ModelDirError
from vistune.files import read_json, staged_dir
from vistune.interop import hf_layout
from vistune.interop.chat_template import processor_chat_template
from vistune.interop.hf_layout import UnmappableError
from vistune.interop.model_card import model_card
from vistune.model import model_dir_of
from vistune.model.checkpoint import (
    load_tokenizer,
    quiet_transformers,
    read_model_dir,
)
from vistune.model.llava import LlavaModel

EXPORT_FORMAT = "vistune-hf-export"
SIDECAR = "vistune.json"
EXPORT_PROJECTORS = ("mlp2x_gelu",)
PROJECTOR_REFUSALS = {
    "linear": "the HF Llava projector is always two layers with an activation between "
    "(linear_1, act, linear_2), and a `linear` projector is one layer",
    "mlp2x_gelu_pos": "its learned position table is added after the MLP, and the HF "
    "Llava projector (linear_1, act, linear_2) has no place for it",
}
LOGIT_TOLERANCE = 1e-4
"""Largest |vistune - transformers| logit the export accepts (fp32)."""
PIXEL_TOLERANCE = 1e-6
PROBE_QUESTION = "What is in the image?"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _refuse_projector(name: str) -> None:
    if name not in EXPORT_PROJECTORS:
        raise UnmappableError(
            f"projector {name!r} cannot be exported to the HF Llava layout: "
            f"{PROJECTOR_REFUSALS.get(name, 'unknown projector')}; supported: "
            f"{', '.join(EXPORT_PROJECTORS)}"
        )


def _check_out(out: Path) -> None:
    """`out` may be new, empty, or an earlier export (replaced whole); nothing else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelDirError(f"{out}: exists and is not a directory; not overwriting it")
    if any(out.iterdir()):
        try:
            ours = json.loads((out / SIDECAR).read_text(encoding="utf-8"))["format"]
        except (OSError, ValueError, KeyError, TypeError):
            ours = None
        if ours != EXPORT_FORMAT:
            raise ModelDirError(f"{out}: exists and is not a vistune HF export; not overwriting it")


def _image_token(tokenizer) -> int:
    """The id of `<image>` in `tokenizer`, added as a special token when absent."""
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def _weight_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The state-dict name of `module.weight` inside `model` (a tied head keeps its own)."""
    return next(
        f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is module
    )


def llm_tensors(llm, vocab: int) -> dict[str, torch.Tensor]:
    """The causal LM's tensors under HF Llava names, embedding and head padded with zero
    rows to `vocab`; UnmappableError for an LLM that is not base model + bias-free head."""
    base = llm.base_model_prefix + "."
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UnmappableError(
            f"LLM {type(llm).__name__} has no bias-free output head; HF Llava's lm_head is "
            "Linear(hidden, vocab, bias=False)"
        )
    head_name, embed_name = _weight_name(llm, head), _weight_name(llm, embed)
    padded: dict[int, torch.Tensor] = {}

    def pad(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in padded:  # a tied head and embedding stay one tensor
            extra = t.new_zeros(vocab - t.shape[0], t.shape[1])
            padded[id(t)] = torch.cat([t.detach(), extra]) if len(extra) else t.detach()
        return padded[id(t)]

    out, foreign = {}, []
    for name, tensor in llm.state_dict(keep_vars=True).items():
        value = pad(tensor) if name in (head_name, embed_name) else tensor.detach()
        if name == head_name:
            out[hf_layout.HEAD_PREFIX + "weight"] = value
        elif name.startswith(base):
            out[hf_layout.LLM_PREFIX + name[len(base) :]] = value
        else:
            foreign.append(name)
    if foreign:
        raise UnmappableError(
            f"LLM {type(llm).__name__} has tensors outside its base model and head "
            f"({', '.join(foreign[:3])}); HF Llava holds only those two"
        )
    return out


def hf_tensors(model: LlavaModel, vocab: int) -> dict[str, torch.Tensor]:
    """Every tensor of `model` under its HF Llava name (the explicit maps of hf_layout)."""
    out = {hf_layout.VISION_PREFIX + k: v for k, v in model.vision.model.state_dict().items()}
    for ours, theirs in hf_layout.PROJECTOR_NAMES.items():
        out[hf_layout.PROJECTOR_PREFIX + theirs] = model.projector.state_dict()[ours]
    out.update(llm_tensors(model.llm, vocab))
    return out


def _take_buffers(hf, model: LlavaModel) -> None:
    """Give the meta-built model the buffers no state dict holds (CLIP's position ids,
    RoPE's inv_freq), from the vistune model's same modules."""
    base = model.llm.base_model_prefix + "."
    sources = {hf_layout.VISION_PREFIX + n: b for n, b in model.vision.model.named_buffers()}
    sources.update(
        {hf_layout.LLM_PREFIX + n[len(base) :]: b
         for n, b in model.llm.named_buffers() if n.startswith(base)}
    )  # fmt: skip
    for name, buffer in list(hf.named_buffers()):
        if buffer.is_meta:
            if name not in sources:
                raise UnmappableError(f"HF Llava buffer {name} has no counterpart in the model")
            owner, _, leaf = name.rpartition(".")
            hf.get_submodule(owner)._buffers[leaf] = sources[name]


def llava_config(model: LlavaModel, strategy: str, image_id: int, vocab: int) -> LlavaConfig:
    text = model.llm.config.to_dict()
    text["vocab_size"] = vocab
    return LlavaConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=text,
        image_token_index=image_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=hf_layout.GELU,
        vision_feature_layer=model.config.vision_layer,
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
    )


def build_hf_model(model: LlavaModel, config: LlavaConfig, vocab: int):
    """LlavaForConditionalGeneration holding `model`'s own tensors (built on the meta
    device, then given them: no second copy of the weights)."""
    tensors = hf_tensors(model, vocab)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    expected = set(hf.state_dict())
    if config.tie_word_embeddings:
        tensors.pop(hf_layout.HEAD_PREFIX + "weight", None)
        expected.discard(hf_layout.HEAD_PREFIX + "weight")
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise UnmappableError(
            f"the model's tensors do not fill HF Llava's: missing {missing[:3]}, "
            f"left over {extra[:3]}"
        )
    hf.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        hf.tie_weights()
    _take_buffers(hf, model)
    hf.generation_config = model.llm.generation_config
    return hf.eval()


def build_processor(model: LlavaModel, tokenizer, strategy: str, family: str) -> LlavaProcessor:
    proc = model.image_processor
    settings = hf_layout.image_processor_settings(proc.size, proc.aspect, proc.mean, proc.std)
    template = processor_chat_template(
        model.config.template, getattr(tokenizer, "chat_template", None)
    )
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**settings),
        tokenizer=tokenizer,
        patch_size=model.vision.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if family != "siglip" else 0,
        chat_template=template,
    )


def probe_image() -> Image.Image:
    """A non-square RGB gradient (so padding, resizing and cropping all show)."""
    y, x = np.mgrid[0:23, 0:37]
    pixels = np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 5 % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@torch.no_grad()
def verify(model: LlavaModel, hf, processor, image_id: int) -> float:
    """Check the export against `model` on a probe: the processor's ids and pixels, then
    the logits (max |diff| returned). UnmappableError saying what differs."""
    image = probe_image()
    ours = tokenize_prompt(
        [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{PROBE_QUESTION}"}],
        model.tokenizer,
        model.config.template,
    )
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": PROBE_QUESTION}]}]  # fmt: skip
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    expanded = []
    for i in ours:
        expanded += [image_id] * model.num_image_tokens if i == IMAGE_TOKEN_ID else [i]
    theirs = inputs["input_ids"][0].tolist()
    if theirs != expanded:
        raise UnmappableError(
            f"the exported processor tokenises the prompt differently from vistune "
            f"(template {model.config.template}): {theirs[:12]}... against {expanded[:12]}..."
        )
    pixels = model.image_processor([image])
    if (inputs["pixel_values"] - pixels).abs().max() > PIXEL_TOLERANCE:
        raise UnmappableError("the exported image processor's pixels differ from vistune's")
    logits = model(input_ids=[ours], pixel_values=pixels).logits  # (1, L, V)
    hf_logits = hf(**inputs).logits[..., : logits.shape[-1]]
    diff = float((logits - hf_logits.to(logits.dtype)).abs().max())
    if not diff <= LOGIT_TOLERANCE:
        raise UnmappableError(
            f"transformers' Llava gives other logits than vistune (max |diff| {diff:.2e} > "
            f"{LOGIT_TOLERANCE}); the LLM {type(model.llm).__name__} does something past "
            "its base model and head that HF Llava does not"
        )
    return diff


def _check_model(model: LlavaModel, family: str) -> None:
    if model.vision.fixed_positions and model.config.image_size != model.vision.image_size:
        raise UnmappableError(
            f"image_size {model.config.image_size} differs from the {family} tower's own "
            f"{model.vision.image_size}; HF Llava runs CLIP/SigLIP towers at their own size "
            "(no position interpolation)"
        )


def export_hf(
    model_dir: str | Path,
    out: str | Path,
    evals: list[Path] | None = None,
    dtype: str = "fp32",
) -> dict:
    """Write the HF Llava folder of `model_dir` at `out` (see the module docstring);
    returns what was written: {"out", "image_token_id", "max_logit_diff", ...}."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    out = Path(out)
    info = read_model_dir(model_dir_of(model_dir))
    _refuse_projector(info.config.projector)
    vision_type = read_json(info.vision_dir / "config.json", "vision config").get("model_type")
    family = hf_layout.tower_family(str(vision_type))
    strategy = hf_layout.select_strategy(family, info.config.vision_select)
    _check_out(out)
    evals = [Path(e) for e in evals or []]
    for folder in evals:
        if not (folder / "report.md").is_file():
            raise ModelDirError(f"{folder / 'report.md'}: missing (--eval names a run folder)")

    model = LlavaModel.load(info.path, dtype=torch.float32)
    _check_model(model, family)
    tokenizer = load_tokenizer(info.llm_dir)
    image_id = _image_token(tokenizer)
    vocab = max(model.llm.get_input_embeddings().num_embeddings, image_id + 1)
    config = llava_config(model, strategy, image_id, vocab)
    hf = build_hf_model(model, config, vocab)
    hf.generation_config.suppress_tokens = [image_id]
    processor = build_processor(model, tokenizer, strategy, family)
    settings = {
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": strategy,
        "projector_hidden_act": config.projector_hidden_act,
        "image_token_index": image_id,
        "image_seq_length": config.image_seq_length,
        "image processor": f"{model.config.image_aspect}, {model.config.image_size} px",
        "chat template": model.config.template,
        "dtype": dtype,
    }
    with staged_dir(out) as tmp, quiet_transformers():
        processor.save_pretrained(tmp)
        loaded = AutoProcessor.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
        diff = verify(model, hf, loaded, image_id)
        hf.to(DTYPES[dtype]).save_pretrained(tmp)
        sidecar = {
            "format": EXPORT_FORMAT,
            "format_version": 1,
            "vistune_version": vistune.__version__,
            "model": model.config.to_dict(),
            "projector_trained": bool(model.projector_trained),
            "image_token_id": image_id,
            "source_vocab_size": model.llm.get_input_embeddings().num_embeddings,
            "max_logit_diff": diff,
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        card = model_card(info.path, info.raw, evals, settings)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return {"out": out, "image_token_id": image_id, "max_logit_diff": diff, **settings}

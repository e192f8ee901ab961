"""Foreign weights -> a vistune model directory: the part both importers share.

An importer reads a checkpoint's settings and tensors and names them by part (vision
tower, projector, LLM base, LLM head); this module checks every name and shape against
the modules they fill, builds a `LlavaModel` from them and writes it with
`vistune.model.checkpoint.save_model` (atomic: nothing is left at `out` on an error). The
result is an ordinary model directory: chat, serve, eval and `train --init` load it.

Reading is safetensors only (a single file or an index with its shards); pickled `.bin`
checkpoints are refused, never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from vistune.config import ModelConfig
from vistune.data.conversation import get_template
from vistune.data.image import ImageProcessor
from vistune.errors import ModelDirError
from vistune.model.checkpoint import (
    check_hf_dir,
    hf_weight_files,
    load_tokenizer,
    quiet_transformers,
    save_model,
)
from vistune.model.llava import LlavaModel
from vistune.model.projector import build_projector
from vistune.model.vision import VISION_MODELS, VisionTower


def read_tensors(folder: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors (or its index and shards)."""
    check_hf_dir(folder, what)
    tensors: dict[str, torch.Tensor] = {}
    for name in hf_weight_files(folder):
        if not name.endswith(".safetensors"):
            continue
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
        except (OSError, SafetensorError) as exc:
            raise ModelDirError(f"{path}: not a readable safetensors file: {exc}") from exc
    return tensors


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, where: Path,
          tied: set[str] = frozenset()) -> None:  # fmt: skip
    """Load `tensors` into `module` (built on the meta device), every name and shape checked."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors) - tied)
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelDirError(
            f"{where}: the {what} tensors do not match its config: missing "
            f"{', '.join(missing[:4]) or 'none'}; unexpected {', '.join(extra[:4]) or 'none'}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ModelDirError(
                f"{where}: {what} tensor {key!r} has shape {tuple(value.shape)}, its config "
                f"needs {tuple(expected[key].shape)}"
            )
    module.load_state_dict(tensors, strict=False, assign=True)


def build_vision(
    config: PretrainedConfig, tensors: dict[str, torch.Tensor], where: Path
) -> PreTrainedModel:
    """The tower of `config` (a VISION_MODELS type) holding `tensors`."""
    model_type = config.model_type
    if model_type not in VISION_MODELS:
        raise ModelDirError(
            f"{where}: vision tower {model_type!r} is not supported; supported: "
            f"{', '.join(VISION_MODELS)}"
        )
    model_class = VISION_MODELS[model_type][1]
    with torch.device("meta"):
        model = model_class(config)
    _fill(model, tensors, "vision tower", where)
    _real_buffers(model, model_class, config)
    return model.eval()


def build_llm(
    config: PretrainedConfig,
    base: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    where: Path,
) -> PreTrainedModel:
    """The causal LM of `config` holding `base` (its base model's tensors, e.g. Llama's
    `model.*` without the prefix) and `head` (the output head's, e.g. {"weight": ...})."""
    try:
        with quiet_transformers(), torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelDirError(
            f"{where}: no causal LM for text config {config.model_type!r}: {exc}"
        ) from exc
    head_name = next(n for n, m in llm.named_modules() if m is llm.get_output_embeddings())
    tensors = {f"{llm.base_model_prefix}.{k}": v for k, v in base.items()}
    tensors.update({f"{head_name}.{k}": v for k, v in head.items()})
    tied = {head_name + ".weight"} if getattr(config, "tie_word_embeddings", False) else set()
    _fill(llm, tensors, "LLM", where, tied)
    if tied:
        llm.tie_weights()
    _real_buffers(llm, type(llm), config)
    return llm.eval()


def _real_buffers(model: torch.nn.Module, model_class, config: PretrainedConfig) -> None:
    """Compute the buffers no checkpoint holds (position ids, RoPE's inv_freq) on the CPU:
    a small twin built there from the config, its buffers taken."""
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    small = config.__class__.from_dict(config.to_dict())
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(small, field):
            setattr(small, field, 0)
    with quiet_transformers():
        twin = model_class._from_config(small) if hasattr(model_class, "_from_config") else model_class(small)
    buffers = dict(twin.named_buffers())
    for name in meta:
        if name not in buffers:
            raise ModelDirError(f"cannot compute the buffer {name} of {model_class.__name__}")
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffers[name]


def write_model_dir(
    out: Path,
    vision: PreTrainedModel,
    llm: PreTrainedModel,
    tokenizer_dir: Path,
    projector: dict[str, torch.Tensor],
    config: ModelConfig,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    where: Path,
) -> Path:
    """Check the projector against the tower and LLM it joins, and save the vistune model
    directory at `out` (atomically)."""
    try:
        get_template(config.template)
    except ValueError as exc:
        raise ModelDirError(str(exc)) from exc
    tower = VisionTower(
        vision,
        vision.config.model_type,
        layer=config.vision_layer,
        select=config.vision_select,
        preprocessor_config={"image_mean": list(mean), "image_std": list(std),
                             "size": {"height": config.image_size, "width": config.image_size}},
    )  # fmt: skip
    llm_hidden = llm.get_input_embeddings().embedding_dim
    tokens = tower.num_tokens(config.image_size)
    module = build_projector(config.projector, tower.hidden_size, llm_hidden, tokens)
    try:
        _fill(module, projector, "projector", where)
    except ModelDirError as exc:
        raise ModelDirError(
            f"{exc} (a {config.projector} projector from the vision tower's hidden "
            f"{tower.hidden_size} to the LLM's {llm_hidden})"
        ) from None
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = ImageProcessor(config.image_size, tuple(mean), tuple(std), config.image_aspect)
    model = LlavaModel(tower, module, llm, tokenizer, processor, config, projector_trained=True)
    return save_model(model, out)

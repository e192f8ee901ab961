"""Foreign weights -> a vistune model directory: the part both importers share.

An importer loads the checkpoint's parts through transformers (which also reads older
tensor names) or its raw tensors (the projector); this module checks the projector's
names and shapes against the tower and LLM it joins, puts the LLM's base model and head
back into the LLM's own causal-LM class, builds a `LlavaModel` and writes it with
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
from vistune.model.vision import VisionTower


def read_tensors(folder: Path, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors named `prefix`* of a folder's model.safetensors (or its index and
    shards), the prefix cut off; only those are read."""
    check_hf_dir(folder, what)
    tensors: dict[str, torch.Tensor] = {}
    for name in hf_weight_files(folder):
        if not name.endswith(".safetensors"):
            continue
        path = folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors.update(
                    {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
                )
        except (OSError, SafetensorError) as exc:
            raise ModelDirError(f"{path}: not a readable safetensors file: {exc}") from exc
    return tensors


def fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, where: Path) -> None:
    """Load `tensors` into `module`, every name and shape checked (one message naming them)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelDirError(
            f"{where}: the {what} tensors do not match: missing "
            f"{', '.join(missing[:4]) or 'none'}; unexpected {', '.join(extra[:4]) or 'none'}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ModelDirError(
                f"{where}: {what} tensor {key!r} has shape {tuple(value.shape)}, but "
                f"{tuple(expected[key].shape)} is needed"
            )
    module.load_state_dict(tensors)


def causal_lm(
    config: PretrainedConfig, base: torch.nn.Module, head: torch.nn.Module, where: Path
) -> PreTrainedModel:
    """The causal LM of `config` made of a loaded base model and output head (modules,
    not copies): its own class, as vistune's llm/ holds it."""
    try:
        with quiet_transformers(), torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ModelDirError(
            f"{where}: no causal LM for text config {config.model_type!r}: {exc}"
        ) from exc
    setattr(llm, llm.base_model_prefix, base)
    llm.set_output_embeddings(head)
    left = [n for n, t in (*llm.named_parameters(), *llm.named_buffers()) if t.is_meta]
    if left:
        raise ModelDirError(
            f"{where}: the {type(llm).__name__} holds more than a base model and a head "
            f"({', '.join(left[:3])})"
        )
    return llm.eval()


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
        fill(module, projector, "projector", where)
    except ModelDirError as exc:
        raise ModelDirError(
            f"{exc} (a {config.projector} projector from the vision tower's hidden "
            f"{tower.hidden_size} to the LLM's {llm_hidden})"
        ) from None
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = ImageProcessor(config.image_size, tuple(mean), tuple(std), config.image_aspect)
    model = LlavaModel(tower, module, llm, tokenizer, processor, config, projector_trained=True)
    return save_model(model, out)

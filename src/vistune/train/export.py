"""The trained model as a directory `vistune chat` loads (and stage 2 starts from).

A frozen LLM (stage 1) is written as its source folder stores it: that folder's files,
hard-linked or copied (`LlavaModel.save(..., frozen_llm=True)`), so an fp16 13B Vicuna
stays 26 GB in its own dtype, bit for bit, and no second copy is read or gathered. A
trained LLM (stage 2) is written from its fp32 master weights. LoRA adapters are merged into
the LLM weights (`lora_merge`, default) or written alone in peft's layout to
`<out>/adapter`, and into the model directory beside the base LLM (kept as its source
stores it, as a frozen one: LoRA never changes it), which `LlavaModel.load` merges when it
loads (so `vistune chat` runs the tuned model). Under FSDP the trained
weights are gathered onto rank 0 first, into a copy of the model built with its LLM on the
meta device: a trained LLM takes the gathered tensors themselves, so rank 0 holds one fp32
copy of it, not two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from vistune.files import staged_dir
from vistune.train.distributed import barrier
from vistune.train.setup import apply_stage, build_model
from vistune.train.step import TrainStep


def _take(step: TrainStep, full: dict[str, torch.Tensor], keep_llm: bool) -> None:
    """Put the gathered weights into a model built with its LLM on the meta device.

    A kept LLM stays on the meta device (only its source files are written). A trained one
    takes the gathered tensors themselves (`assign`): copying them into a second model
    would hold two fp32 copies of the LLM on rank 0 (104 GB for 13B, not 52). A tied head
    is tied again (assign gives each name its own tensor); the rotary tables, not in a state
    dict, stay on the meta device: the export only writes the model."""
    if keep_llm:
        step.load_state_dict(full, strict=False)
        return
    llm = step.model.llm
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    step.load_state_dict(full, strict=True, assign=True)
    if tied:
        head.weight = embed.weight


def finalize(
    model: Any, lora: bool, merge: bool, checkpointing: bool, attention: str, out: Path
) -> Any:
    """Undo training-only settings: merge or split off LoRA, checkpointing, attention."""
    model.llm.set_attn_implementation(attention)
    if checkpointing:
        llm = model.llm
        disable = getattr(llm, "activation_checkpointing_disable", None)
        (disable or llm.gradient_checkpointing_disable)()
    if lora:
        if merge:
            model.llm = model.llm.merge_and_unload()
        else:
            with staged_dir(out / "adapter") as folder:  # whole or not at all, as every folder
                model.llm.save_pretrained(folder)
            model.llm = model.llm.unload()
            model.adapter = out / "adapter"
    model.projector_trained = True
    return model.eval()


def export_model(run: Any, say: Any) -> Path:
    """Write `<out>/model` (rank 0) and return its path; every rank calls this."""
    cfg, info = run.cfg, run.info
    out = Path(cfg.out)
    model = run.model
    # The same on every rank (it decides what the ranks gather): an LLM merged with an
    # adapter when loaded has no folder of its own to keep. An unmerged LoRA leaves its base
    # LLM as loaded too (not under FSDP, whose rank-0 rebuild would need the adapters).
    sharded = cfg.fsdp and info.world > 1
    unmerged = cfg.plan["llm"] == "lora" and not cfg.lora_merge and not sharded
    keep_llm = (cfg.plan["llm"] == "frozen" or unmerged) and model.llm_source is not None
    if sharded:
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=keep_llm
        )
        full = get_model_state_dict(run.wrapped, options=options)
        if info.is_main:
            stamp = model.llm_stamp  # the files as this run loaded them, not as they are now
            model = build_model(cfg, say, meta_llm=True)
            model.llm_stamp = stamp
            apply_stage(model, cfg)
            _take(TrainStep(model), full, keep_llm)
    elif info.is_main and not keep_llm and model.llm.dtype != torch.float32:
        # A frozen LLM trained in bf16 with no folder of its own (an adapter merged when
        # loaded): take the exact fp32 one from `init` again.
        trained = {
            n: p.detach().cpu()
            for n, p in run.step_module.named_parameters()
            if n in set(run.trainable)
        }
        model = build_model(cfg, say)
        apply_stage(model, cfg)
        TrainStep(model).load_state_dict(trained, strict=False)

    if info.is_main:
        lora = cfg.plan["llm"] == "lora"
        finalize(model, lora, cfg.lora_merge, cfg.gradient_checkpointing, run.attention, out)
        model.save(out / "model", frozen_llm=keep_llm)
    barrier(info)
    return out / "model"

"""What trains in each stage (paper §4.2), in one place.

Stage 1 ("pretrain", feature alignment): vision tower and LLM frozen, the projector W
trains. Stage 2 ("finetune", end to end): the tower stays frozen, the projector and the
LLM train, either their full weights or LoRA adapters on the LLM (as TinyLLaVA Factory
states per part what is frozen, fully trained or LoRA-trained).
"""

from __future__ import annotations

import torch.nn as nn

MODES = ("frozen", "train", "lora")

# stage -> part -> mode. The vision tower never trains: its features are cached once.
STAGES: dict[str, dict[str, str]] = {
    "pretrain": {"vision": "frozen", "projector": "train", "llm": "frozen"},
    "finetune": {"vision": "frozen", "projector": "train", "llm": "train"},
    "finetune_lora": {"vision": "frozen", "projector": "train", "llm": "lora"},
}

# Paper §5 hyperparameters and LLaVA's templates, used where the config leaves None.
STAGE_DEFAULTS: dict[str, dict[str, object]] = {
    "pretrain": {"lr": 2e-3, "batch_size": 128, "epochs": 1, "template": "plain"},
    "finetune": {"lr": 2e-5, "batch_size": 32, "epochs": 3, "template": "vicuna_v0"},
}


def get_plan(name: str) -> dict[str, str]:
    """The part -> mode dict of a plan name (a key of STAGES)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage plan {name!r}; valid: {', '.join(STAGES)}")
    return STAGES[name]


def apply_plan(parts: dict[str, nn.Module], plan: dict[str, str]) -> None:
    """Set requires_grad per part: `train` -> all True, `frozen` -> all False.

    `lora` parts are frozen here; the LoRA wrapper then marks its adapters trainable.
    """
    for part, module in parts.items():
        mode = plan[part]
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} for {part}; valid: {', '.join(MODES)}")
        for param in module.parameters():
            param.requires_grad_(mode == "train")

"""Resumable training checkpoints: trainable weights, optimizer, RNG and data position.

Layout of `<out>/checkpoints/step-00000123/`:
  trainable.safetensors   the parameters that train (fp32 master weights), by name
  optimizer.safetensors   AdamW moments + step per parameter; optimizer.json: param groups
  rng.safetensors         torch CPU (and CUDA) generator states: rank 0's as `torch`
                          (`cuda`), rank r's as `torch.rank<r>` (each rank draws its own
                          dropout masks, so each resumes its own generators)
  state.json              step, data fingerprint, python/numpy RNG (`rng`: rank 0;
                          `rng_ranks`: ranks 1..), skip counts, ...
A checkpoint is written into a temporary folder, synced and renamed into place
(vistune.files.staged_dir), so a run killed at any moment leaves only whole checkpoints;
the newest `keep_last` are kept.
Frozen weights are not stored: resuming rebuilds them from the run's `init`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vistune.errors import VistuneError
from vistune.files import remove_orphaned_temps, staged_dir
from vistune.train.config import FRESH_MODEL_FIELDS
from vistune.train.optim import save_optimizer

PREFIX = "step-"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch generator states as tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def save_checkpoint(
    out: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict[str, Any],
    keep_last: int,
    rng: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`.
    `rng`: every rank's `rng_state()` in rank order (default: this process's)."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(root, f".tmp-{PREFIX}*", -1)  # a run killed mid-write left them
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    aside = root / f".tmp-{PREFIX}{step:08d}-old-{os.getpid()}"  # the same step written again
    with staged_dir(final, tmp, aside) as folder:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
            str(folder / "trainable.safetensors"),
        )
        save_optimizer(optimizer_state, folder)
        ranks = rng or [rng_state()]
        tensors = {
            name if rank == 0 else f"{name}.rank{rank}": value
            for rank, (_plain, generators) in enumerate(ranks)
            for name, value in generators.items()
        }
        save_file(tensors, str(folder / "rng.safetensors"))
        plains = [plain for plain, _generators in ranks]
        body = json.dumps({**state, "step": step, "rng": plains[0], "rng_ranks": plains[1:]})
        (folder / "state.json").write_text(body, encoding="utf-8")
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary leftovers are ignored)."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(
    path: Path, names_only: bool = False
) -> tuple[dict[str, torch.Tensor | None], dict[str, Any]]:
    """(trainable tensors, state dict) of a checkpoint folder; restores no RNG yet.

    `names_only`: the tensors' names mapped to None, no tensor read (an FSDP rank that
    takes the weights from rank 0)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if names_only:
            with safe_open(str(path / "trainable.safetensors"), framework="pt") as file:
                return dict.fromkeys(file.keys()), state
        trainable = load_file(str(path / "trainable.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        hint = f"; move it away to resume from {older[-1].name}" if older else ""
        raise VistuneError(f"{path}: unreadable checkpoint ({err}){hint}") from err
    return trainable, state


def restore_rng(path: Path, state: dict[str, Any], rank: int = 0) -> None:
    """This rank's generators as the checkpoint saved them (rank 0's when it holds none for
    this rank: a checkpoint of fewer processes)."""
    tensors = load_file(str(path / "rng.safetensors"))
    others = state.get("rng_ranks", [])
    if 0 < rank <= len(others):
        suffix = f".rank{rank}"
        own = {k[: -len(suffix)]: v for k, v in tensors.items() if k.endswith(suffix)}
        set_rng_state(others[rank - 1], own)
    else:
        set_rng_state(state["rng"], {k: v for k, v in tensors.items() if "." not in k})


ORDER_FIELDS = ("batch_size", "seed", "group_by_length", "length_group")
"""Settings that decide which samples make each step: a resume must keep them."""
SAMPLE_FIELDS = ("data_format", "scienceqa_split", "scienceqa_answer_format", "template",
                 "model_max_length")  # fmt: skip
"""Settings that decide each sample's tokens (from the same data file): a resume must keep
them."""
MODEL_FIELDS = ("stage", "init", "vision", "llm", "lora_r", "lora_alpha")
"""Settings that decide what the checkpoint's tensors are and the frozen weights they go
with (rebuilt from `init` on a resume): a resume must keep them."""
CHANGEABLE_FIELDS = ("lr", "warmup_ratio", "epochs", "max_steps", "weight_decay", "max_grad_norm",
                   "precision", "image_folder")  # fmt: skip
"""Settings a resume may change (to train longer, say, or on a CPU after a GPU), with a
warning: the run then differs from an uninterrupted one."""


def check_resumed_config(
    now: dict[str, Any], saved: dict[str, Any], latest: Path, say: Callable[[str], None]
) -> None:
    """Refuse a resume whose settings (`now`) would change the model or the data order of
    the checkpoint's (`saved`); say which other settings changed (the run then differs
    from an uninterrupted one)."""

    def changed(fields: tuple[str, ...]) -> list[str]:
        return [
            f"{k} {saved[k]!r} -> {now[k]!r}" for k in fields if k in saved and saved[k] != now[k]
        ]

    model = changed(MODEL_FIELDS)
    if saved.get("init") == "default":
        model += changed(FRESH_MODEL_FIELDS)
    if model:
        raise VistuneError(
            f"{latest}: resuming with {', '.join(model)} would change the model the checkpoint "
            "was training; resume with the checkpoint's settings (train_config.json) or pick a "
            "new --out"
        )
    samples = changed(SAMPLE_FIELDS)
    if samples:
        raise VistuneError(
            f"{latest}: resuming with {', '.join(samples)} would change the samples the "
            "checkpoint was trained on; resume with the checkpoint's settings "
            "(train_config.json) or pick a new --out"
        )
    order = changed(ORDER_FIELDS)
    if order:
        raise VistuneError(
            f"{latest}: resuming with {', '.join(order)} would change which samples make each "
            "step; resume with the checkpoint's settings (train_config.json) or pick a new --out"
        )
    changes = changed(CHANGEABLE_FIELDS)
    if changes:
        say(f"resuming with changed settings: {', '.join(changes)}")

"""Training configuration: one frozen dataclass, read from YAML and overridden by flags.

Paper §4.2 / §5: stage 1 (`pretrain`) trains the projector only with lr 2e-3, batch 128,
1 epoch; stage 2 (`finetune`) trains projector + LLM with lr 2e-5, batch 32, 3 epochs.
Fields left at `None` take the stage's default (see `vistune.train.stages.STAGE_DEFAULTS`),
so the resolved config saved beside the output always holds concrete values.

Every field is also a command-line flag (`--field-name`), generated from this dataclass
by vistune.commands.flags, its help the attribute docstring below; flags override the YAML
file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vistune.config import FEATURE_SELECTS, IMAGE_ASPECTS, PROJECTORS, check_choice
from vistune.data.conversation import TEMPLATES
from vistune.data.scienceqa import ANSWER_FORMATS
from vistune.errors import DataError
from vistune.train.stages import STAGE_DEFAULTS, STAGES

PRECISIONS = ("bf16", "fp32")
DATA_FORMATS = ("llava", "scienceqa")
DEVICES = ("auto", "cpu", "cuda")
ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (paper §4.2, §5; LLaVA's train.py arguments)."""

    stage: str = "pretrain"
    """`pretrain` (projector only, LLM frozen) or `finetune` (projector + LLM, or LoRA)."""
    data: str = ""
    """LLaVA JSON file [{id, image, conversations}] (or a ScienceQA problems.json, see data_format)."""
    data_format: str = "llava"
    """`llava` (LLaVA JSON) or `scienceqa` (problems.json + pid_splits.json beside it)."""
    scienceqa_split: str = "train"
    """ScienceQA split to train on (data_format scienceqa)."""
    scienceqa_answer_format: str = "reasoning-first"
    """ScienceQA answer layout: `reasoning-first` or `answer-first` (paper Table 8)."""
    image_folder: str = ""
    """Root for relative image paths in the data; empty means the data file's folder."""
    out: str = ""
    """Output directory: the model (loadable by `vistune chat`), log, curve, checkpoints."""
    init: str = "default"
    """Model to start from: a model directory (e.g. the pretrain output) or `default`. A model directory keeps its own projector, vision layer and select, image size and aspect: values given for those must equal its."""
    vision: str = ""
    """Vision tower directory for a fresh model (init `default` only; empty: packaged DINOv2)."""
    llm: str = ""
    """Causal LM directory for a fresh model (init `default` only; empty: packaged SmolLM2)."""
    projector: str = "mlp2x_gelu"
    """Projector of a fresh model: `linear` (paper), `mlp2x_gelu` (LLaVA-1.5) or `mlp2x_gelu_pos` (it plus a learned position row per image token; vistune.model.projector)."""
    vision_layer: int = -2
    """Tower hidden layer for a fresh model (paper: the one before the last)."""
    vision_select: str = "patch"
    """Tower tokens for a fresh model: `patch` or `cls_patch`."""
    image_size: int = 224
    """Square image side for a fresh model (224 with a /14 patch gives 256 image tokens)."""
    image_aspect: str = "pad"
    """How a fresh model squares images: `pad` (LLaVA-1.5), `resize` (squash) or `crop` (CLIP's resize + centre crop, the paper's)."""
    template: str | None = None
    """Conversation template; None: `plain` for pretrain (LLaVA's code: the caption alone; the paper's §4.2 keeps the instruction, `vicuna_v0`), `vicuna_v0` for finetune (paper)."""
    ground: str = ""
    """Grounded projector alignment before stage 1's caption steps (vistune.train.ground, docs/LEARNING.md): a COCO-layout folder whose instances give each training image's boxes; the projector first learns to map each grid cell to the words of the object there. Empty: the paper's stage 1, captions only."""
    ground_split: str = "train"
    """Split of `ground` whose boxes are read; its images are `<split>/<file_name>` under image_folder, as `vistune datagen` writes them."""
    ground_steps: int = 600
    """Minibatches of 128 images for the grounded alignment."""
    ground_lr: float = 1e-3
    """Peak learning rate of the grounded alignment (decays linearly to 0)."""
    ground_where: bool = False
    """Also align an object's cells to the words of the third of the picture it is in ("top left")."""
    epochs: int | None = None
    """Passes over the data; None: 1 for pretrain, 3 for finetune (paper §5)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run the epochs); the schedule spans it."""
    lr: float | None = None
    """Peak learning rate; None: 2e-3 for pretrain, 2e-5 for finetune (paper §5)."""
    projector_lr: float | None = None
    """Peak learning rate of the projector, on the same schedule; None: lr. A projector that learns faster than the LLM lets a small model read the picture sooner (nanoVLM trains its projector at 100x the backbones' rate; docs/LEARNING.md)."""
    batch_size: int | None = None
    """Global batch (per_device_batch x accumulation x world); None: 128 / 32 (paper §5)."""
    per_device_batch: int = 8
    """Samples per forward pass on each process; accumulation makes up the global batch."""
    warmup_ratio: float = 0.03
    """Linear warmup share of the steps before the cosine decay (LLaVA's 0.03)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the weight matrices; biases and norms never decay (HF Trainer). LLaVA uses none."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables; HF Trainer's 1.0)."""
    precision: str = "bf16"
    """`bf16` autocast with fp32 master weights, or `fp32` throughout."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward to save memory (slower)."""
    model_max_length: int = 2048
    """Longest sequence counting image tokens; text is cut from the end, never the image."""
    group_by_length: bool = True
    """Batch samples of similar length together (less padding; HF's group_by_length), the
    epoch's longest batch first (out of memory shows at the first step)."""
    length_group: int = 16
    """Global batches per length-sorted mega-batch when grouping (HF uses 50)."""
    lora_r: int = 0
    """LoRA rank for the LLM in finetune (0: train the LLM's full weights)."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_merge: bool = True
    """Merge LoRA into the LLM weights in the saved model; false: the model keeps the base LLM plus the adapter (`model/adapter`, merged when loaded; also in `<out>/adapter`)."""
    gain_samples: int = 32
    """Samples held out of training to measure the image gain (vistune.train.gain: their loss with their own images against swapped ones), logged every gain_every steps and at the end; 0: none held out."""
    gain_every: int = 50
    """Steps between image-gain measurements."""
    save_every: int = 500
    """Write a resumable checkpoint every this many steps (and always at the end)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the newest checkpoint in `out`; with none there yet, start at step 0 and say so (a job that is requeued can always pass it)."""
    seed: int = 0
    """Seeds the data order, the first-turn image placement and torch."""
    strict: bool = False
    """Make bad rows (missing image, empty conversation, ...) errors instead of skips."""
    features: str = ""
    """Frozen feature store directory; empty: $VISTUNE_HOME/features (shared by stages)."""
    feature_batch: int = 16
    """Images per vision-tower batch when filling the feature store."""
    fsdp: bool = False
    """Shard the LLM with FSDP (per decoder layer) instead of DDP under torchrun."""
    device: str = "auto"
    """`auto` (CUDA if present, else CPU), `cpu` or `cuda`."""
    plot: bool = True
    """Write the loss curve PNG at the end."""
    attention: str = "auto"
    """LLM attention kernel: `auto` (eager on CPU, where it is faster for short sequences; sdpa on GPU), `eager`, `sdpa`."""
    threads: int = 0
    """torch CPU threads (0: torch's default); 1 can be much faster on an oversubscribed CPU."""
    cpu_kernels: bool = True
    """On the CPU, train plain Llama-family LLMs through vistune's own forward/backward (train/llama_cpu.py; not with LoRA, FSDP or gradient checkpointing); false: transformers' modules."""

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, tuple(STAGE_DEFAULTS))
        check_choice("data_format", self.data_format, DATA_FORMATS)
        check_choice("projector", self.projector, PROJECTORS)
        check_choice("vision_select", self.vision_select, FEATURE_SELECTS)
        check_choice("image_aspect", self.image_aspect, IMAGE_ASPECTS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        check_choice("attention", self.attention, ATTENTIONS)
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        check_choice("template", self.template, tuple(TEMPLATES))
        check_choice("scienceqa_answer_format", self.scienceqa_answer_format, tuple(ANSWER_FORMATS))
        if self.lora_r and self.stage != "finetune":
            raise ValueError("lora_r applies to the finetune stage only")
        if self.ground and self.stage != "pretrain":
            raise ValueError("ground applies to the pretrain stage only (it sets up the projector)")
        if self.ground_steps < 1:
            raise ValueError(f"ground_steps must be at least 1, got {self.ground_steps}")
        if not 0 < self.ground_lr < math.inf:
            raise ValueError(f"ground_lr must be a positive number, got {self.ground_lr}")
        if (self.vision or self.llm) and self.init != "default":
            raise ValueError("vision/llm build a fresh model: use them with init 'default'")
        positive = ("epochs", "batch_size", "per_device_batch", "model_max_length", "image_size")
        for name in (*positive, "save_every", "keep_last", "feature_batch", "length_group",
                     "gain_every"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.lora_r < 0 or self.threads < 0 or self.gain_samples < 0:
            raise ValueError("max_steps, lora_r, threads and gain_samples must be >= 0")
        if not 0 <= self.seed < 2**63:  # torch generators take 64-bit seeds
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        # written as `not (...)` so that NaN, which fails every comparison, is refused too
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.projector_lr is not None and not 0 < self.projector_lr < math.inf:
            raise ValueError(f"projector_lr must be a positive number, got {self.projector_lr}")
        for name, value in (
            ("warmup_ratio", self.warmup_ratio),
            ("lora_dropout", self.lora_dropout),
        ):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_grad_norm >= 0:  # inf: no clipping, as 0
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")

    @property
    def plan(self) -> dict[str, str]:
        """What each part does in this run: frozen / train / lora (from train.stages)."""
        return STAGES["finetune_lora" if self.lora_r else self.stage]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any) -> Any:
    """YAML reads `2e-3` as a string (YAML 1.1): convert numbers by the field's type."""
    kind = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}[name]
    if value is None and "None" not in kind:  # `key:` with nothing after it
        raise ValueError(f"{name} must be a {kind.split()[0]}, got an empty value (null)")
    if value is None or isinstance(value, bool):
        if isinstance(value, bool) and not kind.startswith("bool"):
            raise ValueError(f"{name} must be a {kind.split()[0]}, got {value!r}")
        return value
    try:
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
    except (TypeError, ValueError) as err:  # TypeError: a list or mapping
        raise ValueError(f"{name} must be a {kind.split()[0]}, got {value!r}") from err
    if kind.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if kind.startswith("bool") and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """YAML file (optional) + overrides (flags; None values ignored) -> TrainConfig.

    Unknown YAML keys and invalid values raise DataError naming the file.
    """
    data: dict[str, Any] = {}
    where = "flags"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise DataError(f"{path}: config file not found") from err
        except yaml.YAMLError as err:
            raise DataError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise DataError(f"{path}: the config must be a mapping of option: value")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise DataError(
                f"{path}: unknown config keys: {', '.join(unknown)} "
                f"(valid: {', '.join(sorted(known))})"
            )
        data.update(loaded)
    from_file = dict(data)
    flagged = {k: v for k, v in overrides.items() if v is not None}
    data.update(flagged)
    try:
        cfg = TrainConfig(**{k: _coerce(k, v) for k, v in data.items()})
    except (TypeError, ValueError) as err:
        raise DataError(f"{_culprit(path, from_file, flagged)}: {err}") from err
    flags = {k for k, v in overrides.items() if v is not None}
    return _with_model_settings(cfg, [k for k in FRESH_MODEL_FIELDS if k in data], where, flags)


def _culprit(path: str | Path | None, from_file: dict[str, Any], flagged: dict[str, Any]) -> str:
    """Where a refused setting came from: the file, one flag, or the two together (a flag's
    mistake named the file, where the user then looked for a typo that was not there)."""
    if path is None:
        return "flags"

    def valid(values: dict[str, Any]) -> bool:
        try:
            TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
        except (TypeError, ValueError):
            return False
        return True

    if not valid(from_file):
        return str(path)
    for key, value in flagged.items():
        if not valid({**from_file, key: value}):
            return f"--{key.replace('_', '-')} {value}"
    return f"{path} with the flags given"


FRESH_MODEL_FIELDS = ("projector", "vision_layer", "vision_select", "image_size", "image_aspect")
"""Settings of a fresh model (`init` default); a model directory keeps its own."""


def _with_model_settings(
    cfg: TrainConfig, given: list[str], where: str, flags: set[str]
) -> TrainConfig:
    """`cfg` holding the settings of the model directory it starts from (`init`).

    Fresh-model settings given with a model-directory `init` that differ from that model's
    are refused: they cannot apply (the model keeps its projector, tower layer and image
    size), and taking them silently would train a model other than the one asked for.
    Settings equal to the model's pass, so a stage-1 config copied for stage 2 still works.
    Settings not given take the model's values, so the resolved config saved beside the
    output (train_config.json) says what was trained and loads again with --config."""
    if cfg.init == "default":
        return cfg
    from vistune.model import model_dir_of
    from vistune.model.checkpoint import ModelDirError, read_model_dir

    try:
        model = read_model_dir(model_dir_of(cfg.init)).config
    except ModelDirError:
        return cfg  # building the model reports the unreadable directory
    differ = [k for k in given if getattr(cfg, k) != getattr(model, k)]
    if differ:
        # name a flag as a flag when a config file was read too: the file is not to blame
        by_flag = where == "flags" or all(k in flags for k in differ)

        def name(k: str) -> str:
            return k if by_flag or k not in flags else "--" + k.replace("_", "-")

        named = [
            f"{name(k)} {getattr(cfg, k)!r} (the model's: {getattr(model, k)!r})" for k in differ
        ]
        raise DataError(
            f"{'flags' if by_flag else where}: {', '.join(named)}: these settings build a fresh "
            f"model (init default) and cannot change the model in {cfg.init}; drop them, or "
            "start from init default"
        )
    return dataclasses.replace(cfg, **{k: getattr(model, k) for k in FRESH_MODEL_FIELDS})

"""Everything a training run prepares before its first step (paper §4.2, §5).

The model to start from (packaged default weights, given parts, or a model directory such
as the stage-1 output), the stage's plan applied to it (what is frozen / trained / LoRA,
from train.stages), the rows read and tokenised into samples, and the frozen vision
features filled into the feature store once (stage 1 and 2 never run the tower in the loop).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vistune.data.dataset import Sample, build_samples, drop_samples
from vistune.data.formats import read_llava_rows
from vistune.errors import DataError, VistuneError
from vistune.features import Encoder, FeatureStore, open_store, tower_features
from vistune.model import model_dir_of
from vistune.model.checkpoint import quiet_transformers
from vistune.train.config import TrainConfig
from vistune.train.stages import apply_plan

Say = Callable[[str], None]


def _default_parts(cfg: TrainConfig, say: Say) -> tuple[Path, Path]:
    vision, llm = cfg.vision, cfg.llm
    if not (vision and llm):
        from vistune.weights import ensure_default_weights

        default = ensure_default_weights(progress=say)
        vision, llm = vision or default.vision_dir, llm or default.llm_dir
    return Path(vision), Path(llm)


@contextlib.contextmanager
def _settings_refused(what: str) -> Iterator[None]:
    """Parts that refuse the run's settings (vision_layer past the tower's depth,
    cls_patch on a tower without a CLS token) are the user's error: one line, not a
    traceback."""
    try:
        yield
    except ValueError as err:
        raise VistuneError(f"cannot build {what}: {err}") from err


def build_encoder(cfg: TrainConfig, say: Say) -> Encoder:
    """The run's vision tower + processor + settings, without loading the LLM."""
    from vistune.data.image import ImageProcessor
    from vistune.model.checkpoint import read_model_dir
    from vistune.model.vision import VisionTower

    if cfg.init == "default":
        vision_dir, config = _default_parts(cfg, say)[0], cfg.model
    else:
        info = read_model_dir(model_dir_of(cfg.init))
        vision_dir, config = info.vision_dir, info.config
    with _settings_refused(f"the vision tower from {vision_dir}"):
        tower = VisionTower.from_pretrained(
            vision_dir, layer=config.vision_layer, select=config.vision_select
        )
    processor = ImageProcessor.from_vision_dir(
        vision_dir, size=config.image_size, aspect=config.image_aspect
    )
    return Encoder(tower, processor, config)


def build_model(cfg: TrainConfig, say: Say, meta_llm: bool = False) -> Any:
    """The LlavaModel a run starts from, fp32, with the run's template in its config.

    `meta_llm`: the LLM on the meta device, its weights not read (FSDP ranks other than 0:
    a 13B LLM is 52 GB of host memory per process otherwise; see distributed.wrap).
    """
    from vistune.model.llava import LlavaModel

    if cfg.init == "default":
        vision, llm = _default_parts(cfg, say)
        with _settings_refused(f"a model from {vision} and {llm}"):
            model = LlavaModel.from_parts(vision, llm, cfg.model, seed=cfg.seed, meta_llm=meta_llm)
    else:
        model = LlavaModel.load(model_dir_of(cfg.init), meta_llm=meta_llm)
        model.config = dataclasses.replace(model.config, template=cfg.model.template)
    return model


def attention_for(cfg: TrainConfig, device: torch.device) -> str:
    """`auto`: eager on the CPU (its backward beats SDPA's ~2x at LLaVA's lengths), sdpa on GPU."""
    if cfg.attention != "auto":
        return cfg.attention
    return "sdpa" if device.type == "cuda" else "eager"


def apply_stage(model: Any, cfg: TrainConfig, device: torch.device | None = None) -> None:
    """Freeze / unfreeze per the stage plan; wrap the LLM in LoRA when the plan says so."""
    plan = cfg.plan
    model.llm.set_attn_implementation(attention_for(cfg, device or torch.device("cpu")))
    apply_plan({"vision": model.vision, "projector": model.projector, "llm": model.llm}, plan)
    if plan["llm"] == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise VistuneError("LoRA needs peft: pip install 'vistune[lora]'") from err
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        with quiet_transformers():
            model.llm = get_peft_model(model.llm, lora)
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model.llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if plan["llm"] != "train":
            model.llm.enable_input_require_grads()
    model.vision.eval()
    model.llm.train()
    model.projector.train()


def encoder_notes(model: Any) -> list[str]:
    """The image size as the tower takes it, where that is not as a user may expect (one
    line each; `model`: a LlavaModel or a features Encoder).

    A CLIP or SigLIP tower at another image size than its own runs on interpolated position
    embeddings (the paper configs say 224: with a 336 px tower that is 256 tokens, not 576);
    an image side that is not a multiple of the patch leaves the remainder unseen. A side
    smaller than one patch gives no image token at all: refused (VistuneError)."""
    notes = []
    tower, size = model.vision, model.config.image_size
    if size < tower.patch_size:
        raise VistuneError(
            f"image_size {size} is smaller than the vision tower's patch {tower.patch_size}: "
            f"no image token; use at least {tower.patch_size} (the tower's own: {tower.image_size})"
        )
    if tower.fixed_positions and size != tower.image_size:
        notes.append(
            f"image_size {size} is not the vision tower's own {tower.image_size}: its position "
            f"embeddings are interpolated ({model.num_image_tokens} image tokens); "
            f"image_size {tower.image_size} runs the tower as it was trained"
        )
    if size % tower.patch_size:
        notes.append(
            f"image_size {size} is not a multiple of the tower's patch {tower.patch_size}: "
            f"the last {size % tower.patch_size} pixels of each side are never seen"
        )
    return notes


def run_notes(model: Any, cfg: TrainConfig, world: int) -> list[str]:
    """Settings that run, but not as a user may expect: one line each for the log
    (`encoder_notes`; FSDP needs several processes; the LLM's positional limit)."""
    notes = encoder_notes(model)
    if cfg.fsdp and world == 1:
        notes.append("--fsdp shards across processes started by torchrun; one process: unsharded")
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit and cfg.model_max_length > limit:
        if learned_positions(model.llm):
            notes.append(
                f"model_max_length {cfg.model_max_length} exceeds the LLM's {limit} learned "
                f"positions: samples are cut to {limit} tokens"
            )
        else:
            notes.append(
                f"model_max_length {cfg.model_max_length} exceeds the LLM's {limit} positions"
            )
    return notes


def learned_positions(llm: Any) -> bool:
    """Whether the LLM looks positions up in a learned table (GPT-2's `wpe`, OPT's
    `embed_positions`): such a table has no row past max_position_embeddings, where rotary
    positions only extrapolate."""
    inputs = llm.get_input_embeddings()
    return any(
        isinstance(module, torch.nn.Embedding)
        and module is not inputs
        and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))
        for name, module in llm.named_modules()
    )


def sample_limit(cfg: TrainConfig, model: Any) -> int:
    """The longest sample in tokens: model_max_length, or the LLM's learned positions."""
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit and cfg.model_max_length > limit and learned_positions(model.llm):
        return int(limit)
    return cfg.model_max_length


def image_root(cfg: TrainConfig) -> Path:
    if cfg.image_folder:
        return Path(cfg.image_folder)
    folder = Path(cfg.data).parent
    if cfg.data_format == "scienceqa" and (folder / "images").is_dir():
        return folder / "images"
    return folder


def check_inputs(cfg: TrainConfig) -> None:
    """The data file and image folder exist: checked before the model loads (minutes for
    a 13B LLM), not after it."""
    if not cfg.data:
        raise DataError("no training data: set `data` (a LLaVA JSON file) or --data")
    if not Path(cfg.data).is_file():
        raise DataError(f"{cfg.data}: training data file not found")
    if cfg.image_folder and not Path(cfg.image_folder).is_dir():
        raise DataError(f"{cfg.image_folder}: image folder not found")
    boxes = Path(cfg.ground) / "annotations" / f"instances_{cfg.ground_split}.json"
    if cfg.ground and not boxes.is_file():
        raise DataError(f"{boxes}: not found; ground needs a COCO folder with its instances")


def load_rows(cfg: TrainConfig, skipped: Counter | None = None) -> list[Any]:
    """The run's samples in LLaVA JSON form (ScienceQA problems are converted, §5.2).
    Malformed ScienceQA problems are counted in `skipped` (an error without it, or with
    `strict`)."""
    check_inputs(cfg)
    if cfg.data_format == "scienceqa":
        from vistune.data.scienceqa import load_scienceqa, to_llava_sample

        problems = Path(cfg.data)
        splits = problems.parent / "pid_splits.json"
        found = load_scienceqa(
            problems,
            splits,
            cfg.scienceqa_split,
            image_root(cfg),
            strict_images=False,
            skipped=None if cfg.strict else skipped,
        )
        return [to_llava_sample(p, cfg.scienceqa_answer_format) for p in found]
    return read_llava_rows(Path(cfg.data))


def run_store(cfg: TrainConfig, model: Any) -> FeatureStore:
    """The run's feature store (a LlavaModel's or an Encoder's); a folder that cannot be
    used is one line, not an OSError."""
    try:
        return open_store(feature_root(cfg), model)
    except OSError as err:
        raise VistuneError(
            f"{feature_root(cfg)}: cannot use the features folder ({err.strerror or err})"
        ) from err


def feature_root(cfg: TrainConfig) -> Path:
    if cfg.features:
        return Path(cfg.features)
    from vistune.weights import vistune_home

    return vistune_home() / "features"


def fill_features(
    model: Any,
    store: FeatureStore,
    paths: list[Path],
    batch: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[Path, str]:
    """Compute missing, stale and corrupt features; returns unreadable images -> reason.
    Corrupt rows are found by their checksums here (a shard's rows checked before, in the
    file as it is now, are not read again: see vistune.features)."""
    todo = store.missing(dict.fromkeys(paths))
    done = 0
    if progress is not None and todo:
        progress(0, len(todo))  # before the first batch, so a bar's clock (rate, ETA) is right

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, len(todo))

    # `ensure` checks `todo` again, with the checksums: without them a corrupt row of an
    # unchanged file would pass and be trained on.
    return store.ensure(todo, lambda p: tower_features(model, p), batch, progress=tick)


def prepare_samples(
    cfg: TrainConfig,
    model: Any,
    rank: int,
    world: int,
    barrier: Callable[[], None],
    progress: Callable[[int, int], None] | None = None,
    say: Say | None = None,
) -> tuple[list[Sample], Counter, FeatureStore]:
    """Rows -> samples (skips counted) with every image's features in the store. Each of
    the `world` processes computes every world-th image's missing features (each writes
    its own shards), so none waits at the barrier for all the others' work. `say` gets the
    first few images the tower could not read, with the reason (they are skipped)."""
    malformed: Counter = Counter()
    rows = load_rows(cfg, malformed)
    samples, skipped = build_samples(
        rows,
        model.tokenizer,
        cfg.model.template,
        image_root(cfg),
        model.num_image_tokens,
        sample_limit(cfg, model),
        seed=cfg.seed,
        strict=cfg.strict,
        turns_apart=cfg.turns_apart,
    )
    skipped.update(malformed)
    store = run_store(cfg, model)
    paths = [s.image for s in samples if s.image is not None]
    if world > 1:
        store.writer = f"rank{rank}"
    mine = list(dict.fromkeys(paths))[rank::world]
    failed = fill_features(model, store, mine, cfg.feature_batch, progress)
    if failed and cfg.strict:
        path, reason = next(iter(failed.items()))
        raise DataError(f"{path}: unreadable image ({reason}; drop --strict to skip)")
    if failed and say is not None:
        for path, reason in list(failed.items())[:5]:
            say(f"unreadable image, skipped: {path}: {reason}")
        if len(failed) > 5:
            say(f"... and {len(failed) - 5} more unreadable images (`vistune features` lists them)")
    barrier()
    store.reload()
    bad = set(store.missing(dict.fromkeys(paths), verify=False))
    samples, dropped = drop_samples(samples, bad)
    if dropped:
        skipped["bad_image"] += dropped
    if not samples:
        raise DataError(f"{cfg.data}: no trainable samples (skipped: {dict(skipped)})")
    return samples, skipped, store


def data_fingerprint(samples: list[Sample]) -> str:
    """Identifies the sample list, so a resume on different data is refused."""
    import hashlib

    digest = hashlib.sha256()
    for s in samples:
        digest.update(f"{s.id}\0{s.length}\0{s.targets}\n".encode())
    return digest.hexdigest()[:16]


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise VistuneError("device cuda requested but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")

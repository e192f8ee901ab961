"""Model directories: save atomically, check and load without running code from them.

A vistune model directory (the issue's item 8):

    config.json              format, vistune version, the ModelConfig, what each part is,
                             whether the projector was trained (JSON only, no pickles)
    projector.safetensors    the projector W (paper §4.1, eq. 1)
    vision/                  HF vision model: config.json, model.safetensors,
                             preprocessor_config.json
    llm/                     HF causal LM: config.json, model.safetensors,
                             generation_config.json, tokenizer files; a frozen LLM's
                             files as its source folder stores them (hard links where
                             the file system allows, else copies: same dtype and bytes)
    adapter/                 optional: a LoRA adapter (peft's adapter_config.json +
                             adapter_model.safetensors) over llm/, merged in when loading
                             (written by LoRA training without `lora_merge`)

The layout is fixed (config.json names no paths). Loading is `trust_remote_code=False`,
`use_safetensors=True`, local files only, and refuses any config that declares custom
code (`auto_map`). Anything missing or mismatched raises ModelDirError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

import vistune
from vistune.config import ModelConfig
from vistune.data.conversation import get_template
from vistune.errors import ModelDirError
from vistune.files import read_json, read_json_if_present, staged_dir

if TYPE_CHECKING:
    from vistune.model.llava import LlavaModel

FORMAT = "vistune-llava"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PROJECTOR_FILE = "projector.safetensors"
VISION_DIR = "vision"
LLM_DIR = "llm"
ADAPTER_DIR = "adapter"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files whose `auto_map` would make transformers import Python code from the directory.
_CODE_DECLARING_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class ModelDirInfo:
    """What a model directory's config.json says, after checking the files are there."""

    path: Path
    config: ModelConfig
    projector_trained: bool
    vision_dir: Path
    llm_dir: Path
    projector_path: Path
    raw: dict[str, Any]
    adapter_dir: Path | None = None


def check_hf_dir(path: Path, what: str, tokenizer: bool = False) -> dict[str, Any]:
    """Check a HF model dir (config, safetensors weights, no custom code); return config.json."""
    if not path.is_dir():
        raise ModelDirError(f"{path}: {what} directory not found")
    config = read_json(path / "config.json", f"{what} config")
    for name in _CODE_DECLARING_FILES:
        file = path / name
        data = config if name == "config.json" else (read_json_if_present(file, what) or {})
        if "auto_map" in data:
            raise ModelDirError(
                f"{file}: declares custom code (auto_map); vistune never runs code from a model directory"
            )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        found = sorted(p.name for p in path.glob("*.bin")) or ["none"]
        raise ModelDirError(
            f"{path}: missing {what} weights (model.safetensors); other weight files: "
            f"{', '.join(found)} (pickle .bin files are never loaded)"
        )
    if tokenizer and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelDirError(f"{path}: missing tokenizer files ({' or '.join(_TOKENIZER_FILES)})")
    return config


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (library code does not print),
    and the deprecation warning peft's PeftModel triggers by reading transformers 5's
    `is_gradient_checkpointing` (a peft/transformers matter no user can act on)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
            )
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# StrictDataclassError: a config.json field of the wrong type (e.g. "hidden_size": "wide").
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError, StrictDataclassError)


def load_hf_model(
    model_class: Any, path: Path, what: str, dtype: torch.dtype, **kwargs: Any
) -> PreTrainedModel:
    """`from_pretrained` that never runs remote code and fails on missing weights."""
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                path,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                output_loading_info=True,
                **kwargs,
            )
    except _LOAD_ERRORS as exc:
        raise ModelDirError(f"{path}: cannot load the {what}: {exc}") from exc
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        detail = ", ".join(missing[:5] + sorted(str(m[0]) for m in mismatched)[:5])
        raise ModelDirError(f"{path}: {what} weights are missing or mismatched: {detail}")
    return model.eval()


def load_tokenizer(path: Path) -> Any:
    """The LLM's tokenizer (local files only, no remote code)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(
                path, trust_remote_code=False, local_files_only=True
            )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(f"{path}: cannot load the tokenizer: {exc}") from exc


def _refuse_training_output(path: Path) -> None:
    """A training output or checkpoint given where a model directory is expected: say what
    it is, and how to get the model (a run killed before its end has only checkpoints)."""
    finish = "`vistune train ... --resume` with the run's settings finishes it"
    if (path / "checkpoints").is_dir():
        raise ModelDirError(
            f"{path}: a training output with no model/ yet (its run stopped before the end; "
            f"{finish}, and writes {path / 'model'})"
        )
    if (path / "state.json").is_file() and (path / "trainable.safetensors").is_file():
        raise ModelDirError(
            f"{path}: a training checkpoint, not a model directory (the run writes its model to "
            f"<out>/model at the end; {finish})"
        )


def read_model_dir(model_dir: str | Path) -> ModelDirInfo:
    """Check a vistune model directory's config.json and files (loads no weights)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"{path}: model directory not found")
    config_path = path / CONFIG_FILE
    if not config_path.exists():
        _refuse_training_output(path)
    raw = read_json(config_path, "vistune model config")
    if raw.get("format") != FORMAT:
        raise ModelDirError(
            f"{config_path}: not a vistune model directory (format {raw.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(
            f"{config_path}: format_version {raw.get('format_version')!r} is not supported "
            f"(this vistune reads {FORMAT_VERSION})"
        )
    try:
        config = ModelConfig.from_dict(raw["model"])
        get_template(config.template)  # ModelConfig does not know the templates
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirError(f"{config_path}: bad 'model' settings: {exc}") from exc
    trained = raw.get("projector_trained")
    if not isinstance(trained, bool):
        raise ModelDirError(f"{config_path}: 'projector_trained' must be true or false")
    projector_path = path / PROJECTOR_FILE
    if not projector_path.is_file():
        raise ModelDirError(f"{projector_path}: missing (projector weights)")
    vision_dir, llm_dir = path / VISION_DIR, path / LLM_DIR
    check_hf_dir(vision_dir, "vision tower")
    check_hf_dir(llm_dir, "LLM", tokenizer=True)
    adapter_dir = path / ADAPTER_DIR
    if adapter_dir.exists():
        absent = [name for name in _ADAPTER_FILES if not (adapter_dir / name).is_file()]
        if absent:  # a pickled adapter_model.bin is never loaded
            raise ModelDirError(f"{adapter_dir}: missing {', '.join(absent)} (LoRA adapter)")
    else:
        adapter_dir = None
    return ModelDirInfo(
        path, config, trained, vision_dir, llm_dir, projector_path, raw, adapter_dir
    )


def merge_adapter(llm: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """The LLM with the LoRA adapter of a model directory merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelDirError(
            f"{adapter_dir}: a LoRA adapter; loading it needs peft (pip install 'vistune[lora]')"
        ) from exc
    try:
        with quiet_transformers():
            adapted = PeftModel.from_pretrained(llm, str(adapter_dir))
        return adapted.merge_and_unload()
    except (*_LOAD_ERRORS, TypeError) as exc:
        raise ModelDirError(f"{adapter_dir}: cannot load the LoRA adapter: {exc}") from exc


def load_projector(projector: nn.Module, path: Path, vision_hidden: int, llm_hidden: int) -> None:
    """Load projector weights, checking names and shapes against the parts they join."""
    expected = projector.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ModelDirError(f"{path}: not a readable safetensors file: {exc}") from exc
    if set(tensors) != set(expected):
        raise ModelDirError(
            f"{path}: projector tensors {sorted(tensors)} do not match the configured projector "
            f"({sorted(expected)})"
        )
    for key in expected:
        tensor = tensors[key]
        if tensor.shape != expected[key].shape:
            raise ModelDirError(
                f"{path}: projector tensor {key!r} has shape {tuple(tensor.shape)}, but the vision "
                f"tower (hidden {vision_hidden}) and the LLM (hidden {llm_hidden}) need "
                f"{tuple(expected[key].shape)}"
            )
    projector.load_state_dict(tensors)


def model_dir_config(model: LlavaModel) -> dict[str, Any]:
    """Everything config.json records about a model (JSON-serialisable)."""
    llm_config = model.llm.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vistune_version": vistune.__version__,
        "model": model.config.to_dict(),
        "projector_trained": bool(model.projector_trained),
        "parts": {
            "vision": {
                "dir": VISION_DIR,
                "model_type": model.vision.model_type,
                "class": type(model.vision.model).__name__,
                "hidden_size": model.vision.hidden_size,
                "patch_size": model.vision.patch_size,
                "num_image_tokens": model.num_image_tokens,
            },
            "projector": {
                "file": PROJECTOR_FILE,
                "name": model.config.projector,
                "in_dim": model.vision.hidden_size,
                "out_dim": llm_config.hidden_size,
            },
            "llm": {
                "dir": LLM_DIR,
                "model_type": llm_config.model_type,
                "class": type(model.llm).__name__,
                "hidden_size": llm_config.hidden_size,
                "vocab_size": llm_config.vocab_size,
            },
        },
    }


def hf_weight_files(path: Path) -> list[str]:
    """The safetensors files `from_pretrained` reads from a HF model dir (checked by
    `check_hf_dir`): model.safetensors, else the index and the shards it names."""
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    index = read_json(path / "model.safetensors.index.json", "LLM weight index")
    shards = index.get("weight_map")
    if not isinstance(shards, dict) or not all(
        isinstance(s, str) and Path(s).name == s for s in shards.values()
    ):
        raise ModelDirError(
            f"{path / 'model.safetensors.index.json'}: weight_map must name files beside it"
        )
    return ["model.safetensors.index.json", *sorted(set(shards.values()))]


def weight_stamp(path: Path) -> list[tuple[str, int, int, int]]:
    """(name, size, mtime_ns, inode) of a HF model dir's safetensors files: what changes
    when they are rewritten or replaced (empty when they cannot be listed)."""
    try:
        names = [n for n in hf_weight_files(path) if n.endswith(".safetensors")]
        stats = [((path / n).resolve().stat(), n) for n in names]
    except (OSError, ModelDirError):
        return []
    return [(n, st.st_size, st.st_mtime_ns, st.st_ino) for st, n in stats]


def link_hf_files(source: Path, out: Path) -> None:
    """Put a HF model dir's config and safetensors weights into `out` as they are stored.

    The weights go as hard links (no disk, no memory), or copies where `out` is on another
    file system; nothing writes into them (safetensors are replaced, never rewritten, and a
    model directory is replaced whole by `save_model`). The small JSON files are copied:
    transformers and editors rewrite those in place, which through a link would change the
    source and every model linked to it."""
    out.mkdir(parents=True, exist_ok=True)
    extra = [n for n in ("generation_config.json",) if (source / n).is_file()]
    for name in ["config.json", *extra, *hf_weight_files(source)]:
        src = (source / name).resolve()  # a HF cache's symlink: the blob it points at
        if not src.is_file():
            raise ModelDirError(f"{source / name}: missing (LLM files to keep)")
        if name.endswith(".safetensors"):
            with contextlib.suppress(OSError):  # another file system, or not ours to link
                os.link(src, out / name)
                continue
        shutil.copy2(src, out / name)


def _write_parts(model: LlavaModel, out: Path, llm_source: Path | None) -> None:
    with quiet_transformers():
        model.vision.model.save_pretrained(out / VISION_DIR)
        if llm_source is None:
            model.llm.save_pretrained(out / LLM_DIR)
    model.tokenizer.save_pretrained(out / LLM_DIR)
    if llm_source is not None:  # after the tokenizer: nothing writes into a linked file
        link_hf_files(llm_source, out / LLM_DIR)
    if model.adapter is not None:
        shutil.copytree(model.adapter, out / ADAPTER_DIR)
    pre = model.vision.preprocessor_config
    if pre is None:
        proc = model.image_processor
        pre = {"image_mean": list(proc.mean), "image_std": list(proc.std)}
    (out / VISION_DIR / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(state, str(out / PROJECTOR_FILE), metadata={"projector": model.config.projector})
    text = json.dumps(model_dir_config(model), indent=2) + "\n"
    (out / CONFIG_FILE).write_text(text, encoding="utf-8")


def _check_overwritable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ModelDirError(f"{path}: exists and is not a directory; not overwriting it")
    if any(path.iterdir()):
        config = path / CONFIG_FILE
        try:
            is_ours = json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            is_ours = False
        if not is_ours:
            raise ModelDirError(
                f"{path}: exists and is not a vistune model directory; not overwriting it"
            )


def save_model(model: LlavaModel, model_dir: str | Path, llm_source: Path | None = None) -> Path:
    """Write the model directory atomically: into a temp dir beside it, synced, then swapped
    in (vistune.files.staged_dir; an old directory stays until the new one is in place).

    `llm_source`: a HF folder holding exactly `model.llm`'s weights (a frozen LLM): llm/
    takes its files as they are (`link_hf_files`) instead of the fp32 ones in memory."""
    path = Path(model_dir)
    _check_overwritable(path)
    with staged_dir(path) as tmp:
        _write_parts(model, tmp, llm_source)
    return path

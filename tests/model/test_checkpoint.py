"""Model directories: layout, exact round trip, atomic save, clear errors, no code run."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch

import vistune
from vistune.config import ModelConfig
from vistune.data.conversation import IMAGE_TOKEN_ID
from vistune.errors import ModelDirError
from vistune.model import checkpoint, load_model
from vistune.model.llava import LlavaModel

TINY_IMAGE_SIZE = 28  # the tiny towers' image side (tests/conftest.py): 4 patch tokens
IDS = [[5, IMAGE_TOKEN_ID, 6, 7], [8, 9]]


def _logits(model: LlavaModel) -> torch.Tensor:
    pixels = torch.randn(
        1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(IDS, pixel_values=pixels).logits


@pytest.fixture(scope="module")
def trained(tiny_model):
    """The tiny model with a changed projector and LLM, marked trained."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in [*model.projector.parameters(), model.llm.get_input_embeddings().weight]:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.projector_trained = True
    return model


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    return trained.save(tmp_path_factory.mktemp("ckpt") / "model")


def _copy(saved, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(saved, dst)
    return dst


def test_round_trip_gives_identical_logits(trained, saved):
    loaded = LlavaModel.load(saved)
    torch.testing.assert_close(_logits(loaded), _logits(trained), rtol=0, atol=0)
    assert loaded.projector_trained is True
    assert loaded.config == trained.config
    assert loaded.num_image_tokens == trained.num_image_tokens
    assert (
        loaded.tokenizer("<|im_end|> hi")["input_ids"]
        == trained.tokenizer("<|im_end|> hi")["input_ids"]
    )
    assert loaded.tokenizer.chat_template == trained.tokenizer.chat_template
    assert loaded.image_processor == trained.image_processor


def test_layout_and_config_json(trained, saved):
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "projector.safetensors",
        "vision/config.json",
        "vision/model.safetensors",
        "vision/preprocessor_config.json",
        "llm/config.json",
        "llm/model.safetensors",
        "llm/tokenizer.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".py"))]
    config = json.loads((saved / "config.json").read_text())
    assert config["format"] == "vistune-llava" and config["vistune_version"] == vistune.__version__
    assert ModelConfig.from_dict(config["model"]) == trained.config
    assert config["projector_trained"] is True
    assert config["parts"]["vision"]["class"] == "CLIPVisionModel"
    assert config["parts"]["llm"]["class"] == "LlamaForCausalLM"
    assert config["parts"]["projector"] == {
        "file": "projector.safetensors",
        "name": "mlp2x_gelu",
        "in_dim": 32,
        "out_dim": 32,
    }
    # Nothing temporary left beside the model directory.
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_save_over_an_existing_model_dir_replaces_it(trained, tiny_model, tmp_path):
    path = tiny_model.save(tmp_path / "m")
    assert LlavaModel.load(path).projector_trained is False
    trained.save(path)
    assert LlavaModel.load(path).projector_trained is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_refuses_to_overwrite_other_dirs(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelDirError, match="not a vistune model directory; not overwriting"):
        tiny_model.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_failed_save_leaves_no_dir_and_keeps_the_old_one(
    trained, tiny_model, tmp_path, monkeypatch
):
    def boom(model, out, llm_source):
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_parts", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = trained.save(tmp_path / "old")
    monkeypatch.setattr(checkpoint, "_write_parts", boom)
    with pytest.raises(OSError):
        tiny_model.save(path)
    assert LlavaModel.load(path).projector_trained is True
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_a_frozen_llm_keeps_its_source_files(tiny_clip_dir, tiny_llm_dir, tmp_path, monkeypatch):
    """A sharded fp16 source: llm/ holds its index and shards as they are (hard links),
    copies where linking fails (another file system), and loads as the model in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "fp16"
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float16)
    llm.save_pretrained(source, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_llm_dir).save_pretrained(source)
    files = sorted(p.name for p in source.glob("model*.safetensors*"))
    assert len(files) > 2 and "model.safetensors" not in files
    model = LlavaModel.from_parts(tiny_clip_dir, source, ModelConfig(image_size=TINY_IMAGE_SIZE))
    assert model.llm_source == source
    linked = model.save(tmp_path / "linked", frozen_llm=True) / "llm"
    assert sorted(p.name for p in linked.glob("model*.safetensors*")) == files
    shards = [n for n in files if n.endswith(".safetensors")]
    assert all((linked / n).stat().st_ino == (source / n).stat().st_ino for n in shards)
    # the JSON files are copies: transformers and editors rewrite them in place, which
    # through a link would change the source LLM and every model linked to it
    for name in ["model.safetensors.index.json", "config.json", "generation_config.json"]:
        assert (linked / name).stat().st_ino != (source / name).stat().st_ino, name
        assert (linked / name).read_bytes() == (source / name).read_bytes(), name
    torch.testing.assert_close(
        _logits(LlavaModel.load(linked.parent)), _logits(model), rtol=0, atol=0
    )

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint.os, "link", cross_device)
    copied = model.save(tmp_path / "copied", frozen_llm=True) / "llm"
    for name in [*files, "config.json", "generation_config.json"]:
        assert (copied / name).stat().st_ino != (source / name).stat().st_ino
        assert (copied / name).read_bytes() == (source / name).read_bytes(), name

    _edit_json(source / "model.safetensors.index.json", weight_map={"a": "../x.safetensors"})
    with pytest.raises(ModelDirError, match="weight_map must name files beside it"):
        model.save(tmp_path / "bad", frozen_llm=True)
    assert not (tmp_path / "bad").exists()


def test_frozen_llm_save_needs_the_folder_it_came_from(tiny_model, tmp_path):
    model = copy.copy(tiny_model)  # shallow: only llm_source changes
    model.llm_source = None  # as after `load` merged an adapter
    with pytest.raises(ValueError, match="not loaded from one folder"):
        model.save(tmp_path / "m", frozen_llm=True)
    assert not (tmp_path / "m").exists()


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_config_json(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ModelDirError, match=r"model/config.json: missing"):
        LlavaModel.load(path)
    with pytest.raises(ModelDirError, match="model directory not found"):
        LlavaModel.load(tmp_path / "nowhere")


def test_a_training_output_without_its_model_says_so(tmp_path):
    """`vistune chat --model runs/x` on a run killed before its end (checkpoints only), or on
    one of its checkpoints, said `config.json: missing (vistune model config)`."""
    out = tmp_path / "run"
    step = out / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (step / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(
        ModelDirError, match=r"run: a training output with no model/ yet .*--resume"
    ):
        load_model(out)
    with pytest.raises(ModelDirError, match=r"step-00000004: a training checkpoint, not a model"):
        LlavaModel.load(step)


def test_bad_json(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match=r"config.json: not valid JSON"):
        LlavaModel.load(path)


def test_not_a_vistune_dir(tmp_path, tiny_llm_dir):
    with pytest.raises(ModelDirError, match="not a vistune model directory"):
        LlavaModel.load(tiny_llm_dir)


def test_bad_model_settings(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["projector"] = "qformer"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="bad 'model' settings: unknown projector 'qformer'"):
        LlavaModel.load(path)


def test_unknown_template_is_a_model_dir_error(saved, tmp_path):
    """A template name no vistune knows fails at load, not later in the chat or the engine."""
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["template"] = "alpaca"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match=r"unknown template 'alpaca'; valid: vicuna_v0"):
        LlavaModel.load(path)


def test_projector_shape_mismatch(saved, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _copy(saved, tmp_path)
    # Swap in an LLM twice as wide (same tokenizer): the saved projector no longer fits.
    wide = LlamaConfig(
        vocab_size=600,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    LlamaForCausalLM(wide).save_pretrained(path / "llm")
    with pytest.raises(
        ModelDirError, match=r"projector tensor '0.weight' has shape \(32, 32\).*LLM \(hidden 64\)"
    ):
        LlavaModel.load(path)


def test_projector_of_another_kind(saved, tmp_path):
    path = _copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model"]["projector"] = "linear"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="do not match the configured projector"):
        LlavaModel.load(path)


def test_missing_llm_weights(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "llm" / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"llm: missing LLM weights \(model.safetensors\)"):
        LlavaModel.load(path)


def test_pickle_weights_are_never_loaded(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "llm" / "model.safetensors").rename(path / "llm" / "pytorch_model.bin")
    with pytest.raises(
        ModelDirError, match=r"pytorch_model.bin \(pickle .bin files are never loaded\)"
    ):
        LlavaModel.load(path)


def test_truncated_llm_weights(saved, tmp_path):
    path = _copy(saved, tmp_path)
    weights = path / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelDirError, match="cannot load the LLM"):
        LlavaModel.load(path)


def test_missing_tensors_are_an_error_not_random_weights(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(saved, tmp_path)
    weights = path / "vision" / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match="vision tower weights are missing or mismatched"):
        LlavaModel.load(path)


@pytest.mark.parametrize(
    "part, file",
    [("llm", "config.json"), ("llm", "tokenizer_config.json"), ("vision", "config.json")],
)
def test_custom_code_is_refused_and_never_run(saved, tmp_path, part, file):
    path = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    (path / part / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_json(
        path / part / file,
        auto_map={"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"},
    )
    with pytest.raises(ModelDirError, match=r"declares custom code \(auto_map\)"):
        LlavaModel.load(path)
    assert not marker.exists()


def test_load_model_from_dir_and_default(saved, tiny_clip_dir, tiny_llm_dir, monkeypatch):
    assert load_model(str(saved)).projector_trained is True
    # a training output folder: its model is in model/, as `train --init` reads it
    from_run = load_model(saved.parent)
    assert from_run.projector_trained is True
    for mine, theirs in zip(
        from_run.projector.parameters(), load_model(saved).projector.parameters(), strict=True
    ):
        assert torch.equal(mine, theirs)

    import vistune.weights

    weights = type("W", (), {"vision_dir": tiny_clip_dir, "llm_dir": tiny_llm_dir})()
    monkeypatch.setattr(vistune.weights, "ensure_default_weights", lambda *a, **k: weights)
    model = load_model("default")
    assert model.projector_trained is False
    assert model.config.template == "chat_template"
    assert model.config.image_size == 224 and model.num_image_tokens == 256
    with pytest.raises(ModelDirError, match="model directory not found"):
        load_model("no/such/dir")


@pytest.mark.parametrize(
    "tower, select, projector",
    [("tiny_dinov2_dir", "cls_patch", "linear"), ("tiny_siglip_dir", "patch", "mlp2x_gelu")],
)
def test_round_trip_other_towers(request, tiny_llm_dir, tmp_path, tower, select, projector):
    config = ModelConfig(
        image_size=TINY_IMAGE_SIZE, vision_select=select, projector=projector, vision_layer=-1
    )
    model = LlavaModel.from_parts(request.getfixturevalue(tower), tiny_llm_dir, config, seed=3)
    loaded = LlavaModel.load(model.save(tmp_path / "m"))
    assert loaded.config == config and loaded.vision.model_type == model.vision.model_type
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_load_in_bfloat16(saved, trained):
    loaded = LlavaModel.load(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.image_features(torch.zeros(1, 3, 28, 28)).dtype == torch.bfloat16
    with torch.no_grad():
        reference = _logits(trained)
        logits = _logits(loaded)
    assert logits.shape == reference.shape
    assert (logits.float() - reference).abs().max() < 0.5


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


@pytest.mark.parametrize(
    "config, weights",
    [
        ("{not json", None),
        ("{}", None),  # no peft_type
        (json.dumps({**LORA, "target_modules": ["no_such_proj"]}), None),
        (json.dumps(LORA), b"\0" * 64),  # not a safetensors file
        (json.dumps({**LORA, "r": 8}), "r4"),  # tensors of another rank
    ],
    ids=["bad json", "no peft_type", "unknown modules", "garbage weights", "wrong shapes"],
)
def test_broken_adapter_is_a_model_dir_error(saved, tmp_path, config, weights):
    from safetensors.torch import save_file

    path = _copy(saved, tmp_path)
    adapter = path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(config)
    if weights == "r4":
        a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        save_file(
            {a: torch.zeros(4, 32), b: torch.zeros(32, 4)}, adapter / "adapter_model.safetensors"
        )
    else:
        (adapter / "adapter_model.safetensors").write_bytes(weights or b"")
    with pytest.raises(ModelDirError, match=r"adapter: cannot load the LoRA adapter"):
        LlavaModel.load(path)


@pytest.mark.parametrize("part", ["llm", "vision"])
def test_wrongly_typed_hf_config_is_a_model_dir_error(saved, tmp_path, part):
    path = _copy(saved, tmp_path)
    _edit_json(path / part / "config.json", hidden_size="wide")
    with pytest.raises(ModelDirError, match=rf"{part}.*hidden_size"):
        LlavaModel.load(path)


def test_bad_preprocessor_config_is_a_model_dir_error(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_json(path / "vision" / "preprocessor_config.json", image_mean=[0.5, 0.5])
    with pytest.raises(ModelDirError, match=r"preprocessor_config.json: mean must have 3 values"):
        LlavaModel.load(path)


def test_a_frozen_llm_whose_files_changed_is_not_linked(tiny_clip_dir, tiny_llm_dir, tmp_path):
    """The source LLM replaced while the run trained (a long stage 1): linking its files now
    would pair the trained projector with other weights, so the save refuses, naming it."""
    source = shutil.copytree(tiny_llm_dir, tmp_path / "llm")
    model = LlavaModel.from_parts(tiny_clip_dir, source, ModelConfig(image_size=TINY_IMAGE_SIZE))
    weights = source / "model.safetensors"
    replaced = tmp_path / "new.safetensors"
    shutil.copy(weights, replaced)
    os.replace(replaced, weights)  # same bytes, another file: as a re-download leaves it
    with pytest.raises(ModelDirError, match="weight files changed since they were loaded"):
        model.save(tmp_path / "out", frozen_llm=True)
    assert not (tmp_path / "out").exists()
    assert model.save(tmp_path / "fp32").is_dir()  # the weights in memory: still writable

"""The model directory a run exports: a frozen LLM (stage 1) as its source stores it.

A 13B Vicuna stored in fp16 is 26 GB; written from the fp32 weights in memory it was 52 GB
in every stage-1 output. These runs start from a tiny Llama stored in fp16 or bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.conftest import tiny_args
from tests.train.test_distributed import _run
from vistune.model.llava import LlavaModel
from vistune.train.config import TrainConfig
from vistune.train.loop import train


@pytest.fixture(scope="module")
def stored_llms(tiny_llm_dir, tmp_path_factory) -> dict[torch.dtype, Path]:
    """The tiny Llama saved in fp16 and in bf16 (weights and config.json's dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    folders = {}
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path_factory.mktemp(f"llm_{dtype}".replace("torch.", ""))
        AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=dtype).save_pretrained(path)
        tokenizer.save_pretrained(path)
        folders[dtype] = path
    return folders


def _stage1(data: Path, out: Path, feats: Path, clip: Path, llm: Path, **extra) -> dict:
    return tiny_args(
        data, out, feats, "default", vision=str(clip), llm=str(llm), image_size=28, **extra
    )


def _assert_kept(model_dir: Path, source: Path, dtype: torch.dtype) -> None:
    """llm/ holds the source's tensors in their dtype, bit for bit, in the same file."""
    stored = load_file(str(source / "model.safetensors"))
    kept = load_file(str(model_dir / "llm" / "model.safetensors"))
    assert kept.keys() == stored.keys()
    for key, value in stored.items():
        assert value.dtype == kept[key].dtype == dtype, key
        assert torch.equal(kept[key], value), key
    config = json.loads((model_dir / "llm" / "config.json").read_text())
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    # a hard link (same file system here): no second copy on disk
    linked = model_dir / "llm" / "model.safetensors"
    assert linked.stat().st_ino == (source / "model.safetensors").stat().st_ino


def _trained_projector(out: Path) -> dict[str, torch.Tensor]:
    """The projector of the run's last checkpoint, named as in projector.safetensors."""
    last = sorted((out / "checkpoints").iterdir())[-1]
    tensors = load_file(str(last / "trainable.safetensors"))
    prefix = "model.projector."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _assert_projector(out: Path) -> None:
    exported = load_file(str(out / "model" / "projector.safetensors"))
    trained = _trained_projector(out)
    assert trained and exported.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.parametrize(
    ("dtype", "precision"), [(torch.float16, "bf16"), (torch.bfloat16, "fp32")]
)
def test_stage1_keeps_the_llm_as_its_source_stores_it(
    stored_llms, tiny_clip_dir, tiny_data, tmp_path, dtype, precision
):
    """fp16 source trained in bf16 (the LLM cast to bf16 in memory) and bf16 in fp32: the
    export takes neither from memory; the model loads and stage 2 starts from it."""
    source, feats = stored_llms[dtype], tmp_path / "feats"
    args = _stage1(
        tiny_data, tmp_path / "pre", feats, tiny_clip_dir, source, max_steps=2, precision=precision
    )
    result = train(TrainConfig.from_settings(args))
    _assert_kept(result.model_dir, source, dtype)
    _assert_projector(tmp_path / "pre")

    loaded = LlavaModel.load(result.model_dir)
    assert loaded.projector_trained and loaded.llm.dtype == torch.float32
    stored = load_file(str(source / "model.safetensors"))
    weights = loaded.llm.state_dict()
    assert all(torch.equal(weights[k], v.float()) for k, v in stored.items())

    fine = tiny_args(
        tiny_data, tmp_path / "fine", feats, tmp_path / "pre", stage="finetune", max_steps=1
    )
    tuned = train(TrainConfig.from_settings({**fine, "lr": 1e-3}))
    # stage 2 trains the LLM's fp32 master weights and writes them as they are
    after = load_file(str(tuned.model_dir / "llm" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[k], v.float()) for k, v in stored.items())


def test_fsdp_stage1_gathers_the_projector_and_keeps_the_llm(
    stored_llms, tiny_clip_dir, tiny_data, tmp_path
):
    """Two FSDP processes: only the trained projector is gathered, rank 0 rebuilds the
    model with its LLM on the meta device and keeps the source's files."""
    source, out = stored_llms[torch.float16], tmp_path / "fsdp"
    args = _stage1(tiny_data, out, tmp_path / "feats", tiny_clip_dir, source, max_steps=2)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(args))
    done = _run(config, 2, "--fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_kept(out / "model", source, torch.float16)
    _assert_projector(out)
    parts = json.loads((out / "model" / "config.json").read_text())["parts"]
    assert parts["llm"]["class"] == "LlamaForCausalLM"
    assert LlavaModel.load(out / "model").projector_trained


def test_an_unmerged_lora_keeps_its_base_llm_as_stored(
    stored_llms, tiny_clip_dir, tiny_data, tmp_path
):
    """LoRA never changes the base LLM: with --no-lora-merge the model directory keeps the
    base's own files beside the adapter (a 13B fp16 base: 26 GB linked, not 52 GB written),
    and loads to the same tuned weights as the merged export."""
    source, feats = stored_llms[torch.float16], tmp_path / "feats"
    stage1 = _stage1(tiny_data, tmp_path / "pre", feats, tiny_clip_dir, source, max_steps=1)
    pre = train(TrainConfig.from_settings(stage1))
    lora = dict(stage="finetune", max_steps=2, lora_r=4, lora_dropout=0.0, lr=1e-2)
    outs = {}
    stale = tmp_path / "lora_merge_False" / "adapter" / "adapter_config.old.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # an earlier run's file: the adapter folder is replaced whole
    for merge in (False, True):
        out = tmp_path / f"lora_merge_{merge}"
        args = tiny_args(tiny_data, out, feats, tmp_path / "pre", **lora, lora_merge=merge)
        outs[merge] = train(TrainConfig.from_settings(args)).model_dir
    _assert_kept(outs[False], pre.model_dir / "llm", torch.float16)
    assert (outs[False] / "adapter" / "adapter_model.safetensors").is_file()
    assert (stale.parent / "adapter_model.safetensors").is_file() and not stale.exists()
    merged = LlavaModel.load(outs[True]).llm.state_dict()
    unmerged = LlavaModel.load(outs[False]).llm.state_dict()
    assert merged.keys() == unmerged.keys()
    changed = 0
    for key, value in merged.items():
        torch.testing.assert_close(unmerged[key], value, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(value.half().float(), value)
    assert changed  # the adapter did move weights off the fp16 grid


def test_fsdp_rank0_rebuild_takes_the_gathered_tensors_without_a_copy(tiny_model_dir):
    """Under FSDP rank 0 rebuilds the model to write it; a trained LLM must take the
    gathered fp32 tensors themselves (a copy held 104 GB for 13B), its head tied again."""
    from vistune.train.export import _take
    from vistune.train.step import TrainStep

    full = TrainStep(LlavaModel.load(tiny_model_dir)).state_dict()
    full = {k: v.clone() for k, v in full.items()}  # as gathered: tensors of their own
    step = TrainStep(LlavaModel.load(tiny_model_dir, meta_llm=True))
    assert step.model.llm.get_input_embeddings().weight.is_meta
    _take(step, full, keep_llm=False)
    head = "model.llm.lm_head.weight"  # tied: the embedding's gathered tensor
    for name, value in step.state_dict().items():
        source = full["model.llm.model.embed_tokens.weight" if name == head else name]
        assert value.data_ptr() == source.data_ptr(), name  # the same storage
    llm = step.model.llm
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert not any(p.is_meta for p in step.parameters())

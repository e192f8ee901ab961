"""Two CPU processes (torchrun, gloo) give the same weights as one with the same global batch.

One process runs batch 4 as 2 micro-batches of 2 (accumulation 2); two processes run one
micro-batch of 2 each. The loss of every micro-batch is divided by the global batch's
count of supervised tokens (times the world size that DDP averages over), so both compute
the gradient of the same global mean token loss; only the summation order differs.

Under FSDP, rank 1 builds the LLM on the meta device and takes rank 0's weights (and
non-persistent buffers such as rotary `inv_freq`) once sharded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.train.conftest import tiny_args
from vistune.errors import ModelDirError
from vistune.train.config import TrainConfig
from vistune.train.loop import train
from vistune.train.setup import build_model

MESSAGE = "FSDP: ranks [1] built the LLM on the meta device"
DDP_MESSAGE = "DDP: only rank 0 read the LLM's weights"

REPO = Path(__file__).resolve().parents[2]


def _run(config: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
    ]
    command = [*launcher, "vistune.cli", "train", "--config", str(config), *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        out, err = proc.communicate()
    # every launch's output kept beside the test's files (pytest keeps the last three
    # sessions' folders), so that a failure that does not come again can still be read
    logs = config.parent / "launches"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.err")))
    (logs / f"{n}.out").write_text(out)
    (logs / f"{n}.err").write_text(err)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "projector.safetensors"))
    tensors.update(load_file(str(model_dir / "llm" / "model.safetensors")))
    return tensors


def test_two_processes_match_one_ddp_and_fsdp(tiny_data, tiny_model_dir, tmp_path):
    feats = tmp_path / "feats"
    common = dict(stage="finetune", epochs=2, lr=1e-3, per_device_batch=2, batch_size=4)
    result = train(
        TrainConfig(**tiny_args(tiny_data, tmp_path / "one", feats, tiny_model_dir, **common))
    )
    assert result.steps == 12
    one = _weights(tmp_path / "one" / "model")
    initial = _weights(tiny_model_dir)
    assert any(not torch.equal(initial[k], one[k]) for k in initial)
    # FSDP trains through transformers' modules (its weights are DTensors), so its
    # one-process reference does too; DDP uses vistune's CPU kernels like `one`.
    plain = dict(common, cpu_kernels=False)
    train(TrainConfig(**tiny_args(tiny_data, tmp_path / "plain", feats, tiny_model_dir, **plain)))
    references = {"ddp": one, "fsdp": _weights(tmp_path / "plain" / "model")}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        config = tmp_path / f"{mode}.yaml"
        config.write_text(
            yaml.safe_dump(tiny_args(tiny_data, out, feats, tiny_model_dir, **common))
        )
        done = _run(config, 2, *(["--fsdp"] if mode == "fsdp" else []))
        assert done.returncode == 0, done.stderr[-3000:]
        two, reference = _weights(out / "model"), references[mode]
        assert two.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(
                two[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{mode} {key}"
            )
        summary = json.loads((out / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["accumulation"] == 1
        assert (MESSAGE in done.stderr) == (mode == "fsdp"), done.stderr[-3000:]
        # under DDP too rank 1 built its LLM empty: equal weights show the broadcast filled it
        assert (DDP_MESSAGE in done.stderr) == (mode == "ddp"), done.stderr[-3000:]


def test_ddp_stage1_in_bf16_matches_one_process(tiny_data, tiny_model_dir, tmp_path):
    """Stage 1 in bf16 casts the frozen LLM to bf16, on rank 1 while it is still on the meta
    device; DDP's broadcast must then fill it with rank 0's bf16 weights."""
    feats = tmp_path / "feats"
    common = dict(stage="pretrain", lr=1e-2, per_device_batch=2, batch_size=4, max_steps=4,
                  precision="bf16")  # fmt: skip
    train(TrainConfig(**tiny_args(tiny_data, tmp_path / "one", feats, tiny_model_dir, **common)))
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(tiny_args(tiny_data, tmp_path / "ddp", feats, tiny_model_dir, **common))
    )
    done = _run(config, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert DDP_MESSAGE in done.stderr, done.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "model" / "projector.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "model" / "projector.safetensors"))
    start = load_file(str(tiny_model_dir / "projector.safetensors"))
    assert any(not torch.equal(start[k], one[k]) for k in start)
    for key in one:  # bf16 products summed in another order: bf16's tolerance
        torch.testing.assert_close(two[key], one[key], rtol=2e-2, atol=2e-3, msg=key)


def test_meta_llm_reads_no_llm_weights(tiny_data, tiny_model_dir, tmp_path):
    """What FSDP ranks other than 0 build: the LLM's modules on the meta device, from its
    config alone. Its weight file here is not safetensors, which a read would refuse."""
    init = Path(shutil.copytree(tiny_model_dir, tmp_path / "init"))
    (init / "llm" / "model.safetensors").write_bytes(b"not weights")
    cfg = TrainConfig(**tiny_args(tiny_data, tmp_path / "out", tmp_path / "feats", init))
    with pytest.raises(ModelDirError, match="cannot load the LLM"):
        build_model(cfg, lambda _m: None)
    model = build_model(cfg, lambda _m: None, meta_llm=True)
    assert all(p.is_meta for p in model.llm.parameters())
    assert all(b.is_meta for b in model.llm.buffers())  # rotary inv_freq: sent by rank 0
    llm = model.llm
    assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    projector = load_file(str(tiny_model_dir / "projector.safetensors"))
    for name, value in model.projector.state_dict().items():
        assert torch.equal(value, projector[name]), name


def test_fsdp_resume_matches_an_uninterrupted_run(tiny_data, tiny_model_dir, tmp_path):
    """Rank 0 loads the checkpoint before sharding and sends it; rank 1 (LLM on meta)
    reads only the checkpoint's names. The resumed run ends where the whole one does."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = tiny_args(tiny_data, whole, tmp_path / "feats", tiny_model_dir, stage="finetune")
    args.update(max_steps=4, save_every=2, lr=1e-3)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(args))
    done = _run(config, 2, "--fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "model")
    done = _run(config, 2, "--fsdp", "--out", str(resumed), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and MESSAGE in done.stderr, done.stderr[-3000:]
    a, b = (load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
            for out in (whole, resumed))  # fmt: skip
    assert a.keys() == b.keys() and any("llm" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    two, one = _weights(resumed / "model"), _weights(whole / "model")
    for key in one:
        assert torch.equal(two[key], one[key]), key


def test_two_processes_resume_each_rank_s_own_dropout_masks(tiny_data, tiny_model_dir, tmp_path):
    """Each rank draws its own dropout masks (LoRA dropout here), so its generator state
    differs from rank 0's: a resume must restore every rank's, not rank 0's everywhere."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = tiny_args(tiny_data, whole, tmp_path / "feats", tiny_model_dir, stage="finetune")
    args.update(lora_r=4, lora_dropout=0.5, max_steps=4, save_every=2, lr=1e-2)
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(args))
    done = _run(config, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks filled the new feature store, each its share of the images
    for rank in (0, 1):
        assert list((tmp_path / "feats").glob(f"*/shard-*-rank{rank}.json")), rank
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "model")
    done = _run(config, 2, "--out", str(resumed), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(str(out / "checkpoints" / "step-00000004" / "trainable.safetensors"))
            for out in (whole, resumed))  # fmt: skip
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _exported(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file the model directory holds (projector, llm/,
    vision/, adapter/), named `<file>:<tensor>`."""
    return {
        f"{path.relative_to(model_dir)}:{name}": tensor
        for path in sorted(model_dir.rglob("*.safetensors"))
        for name, tensor in load_file(str(path)).items()
    }


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_fsdp_lora_two_processes_match_one(merge, tiny_data, tiny_model_dir, tmp_path):
    """LoRA under FSDP: rank 1 builds the LLM on the meta device, so peft puts its adapters
    there too; rank 0's adapters (their random lora_A) and base weights reach it as it
    shards. Two processes end with what one process trains at the same global batch:
    the exported model's projector and LLM, merged with the adapters or beside them."""
    feats = tmp_path / "feats"
    # no LoRA dropout: each rank draws its own masks, which differ with the process count
    common = dict(stage="finetune", lora_r=4, lora_dropout=0.0, lr=1e-2, max_steps=4,
                  per_device_batch=2, batch_size=4, lora_merge=merge)  # fmt: skip
    args = tiny_args(tiny_data, tmp_path / "one", feats, tiny_model_dir, **common)
    assert train(TrainConfig(**args)).steps == 4
    one = _exported(tmp_path / "one" / "model")
    initial = _exported(tiny_model_dir)
    adapter = {k for k in one if k.startswith("adapter/")}
    assert bool(adapter) != merge and any("lora_B" in k for k in adapter) != merge
    assert one.keys() - adapter == initial.keys()
    changed = {k for k in initial if not torch.equal(initial[k], one[k])}
    projector = {k for k in initial if k.startswith("projector.")}
    linear = {k for k in initial if k.startswith("llm/") and k.endswith("_proj.weight")}
    # LoRA (all-linear) moves the LLM's linear weights only, and only when merged
    assert changed == projector | (linear if merge else set()), sorted(changed)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(dict(args, out=str(tmp_path / "fsdp"))))
    done = _run(config, 2, "--fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert MESSAGE in done.stderr, done.stderr[-3000:]
    two = _exported(tmp_path / "fsdp" / "model")
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["accumulation"] == 1


def test_grounding_under_ddp_and_fsdp_matches_one_process(tiny_model_dir, tmp_path):
    """Rank 0 alone grounds the projector (rank 1's LLM is on the meta device, with no
    embeddings to aim at); DDP's broadcast or FSDP's rank-0 load gives rank 1 its result."""
    from tests.train.test_ground import scene_data

    scenes, data = scene_data(tmp_path / "scenes")
    feats = tmp_path / "feats"
    common = dict(stage="pretrain", lr=1e-3, per_device_batch=2, batch_size=4, max_steps=2,
                  ground=str(scenes), ground_steps=20, ground_lr=1e-2,
                  image_folder=str(scenes))  # fmt: skip
    train(TrainConfig(**tiny_args(data, tmp_path / "one", feats, tiny_model_dir, **common)))
    one = load_file(str(tmp_path / "one" / "model" / "projector.safetensors"))
    for mode in ("ddp", "fsdp"):
        config = tmp_path / f"{mode}.yaml"
        args = tiny_args(data, tmp_path / mode, feats, tiny_model_dir, **common)
        config.write_text(yaml.safe_dump(args))
        done = _run(config, 2, *(["--fsdp", "--no-cpu-kernels"] if mode == "fsdp" else []))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("grounded the projector on 10 images") == 1, done.stderr[-3000:]
        two = load_file(str(tmp_path / mode / "model" / "projector.safetensors"))
        for key in one:  # FSDP runs transformers' modules: the same maths in another order
            torch.testing.assert_close(
                two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{mode} {key}"
            )

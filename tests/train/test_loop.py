"""Training loop on the tiny model: stages, outputs, skips, NaN stop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import tiny_args
from vistune.train.config import TrainConfig
from vistune.train.loop import train


def test_pretrain_trains_projector_only(tiny_data, tiny_model_dir, tmp_path):
    cfg = TrainConfig(**tiny_args(tiny_data, tmp_path / "out", tmp_path / "feats", tiny_model_dir))
    result = train(cfg)
    # every third row has two exchanges, which the plain template (stage 1) does not take
    assert result.skipped == {"plain_multi_turn": 8}
    assert result.steps == 4  # 16 samples / batch 4
    model_dir = tmp_path / "out" / "model"
    before = load_file(str(tiny_model_dir / "projector.safetensors"))
    after = load_file(str(model_dir / "projector.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    llm_before = load_file(str(tiny_model_dir / "llm" / "model.safetensors"))
    llm_after = load_file(str(model_dir / "llm" / "model.safetensors"))
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 5))
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "padding_share"} <= set(log[0])
    # the CPU kernels run each micro-batch padded to a multiple of 16: the share counts it
    assert all(r["padded_tokens"] % 16 == 0 and r["padded_tokens"] > r["tokens"] for r in log)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["truncated"] == 0


def test_loss_curve_of_a_single_step_shows_its_point(tmp_path):
    from PIL import Image

    from vistune.train.report import plot_loss

    plot_loss([{"step": 1, "loss": 2.0}], tmp_path / "loss.png")
    pixels = Image.open(tmp_path / "loss.png").convert("RGB").getdata()
    assert sum(p == (31, 119, 180) for p in pixels) > 10  # matplotlib's first colour


def _llm(model_dir):
    return load_file(str(model_dir / "llm" / "model.safetensors"))


def test_bf16_pretrain_then_finetune_from_its_output(tiny_data, tiny_model_dir, tmp_path):
    feats = tmp_path / "feats"
    pre = TrainConfig(
        **tiny_args(tiny_data, tmp_path / "pre", feats, tiny_model_dir, precision="bf16")
    )
    train(pre)
    shards = sorted(p.name for p in feats.rglob("shard-*.npy"))
    assert len(shards) == 1
    # the frozen LLM trained in bf16 but is exported exactly as it came in
    before, after = _llm(tiny_model_dir), _llm(tmp_path / "pre" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((tmp_path / "pre" / "model" / "config.json").read_text())
    assert config["model"]["template"] == "plain" and config["projector_trained"]

    fine = TrainConfig(
        **tiny_args(
            tiny_data, tmp_path / "fine", feats, tmp_path / "pre", stage="finetune", lr=1e-3
        )
    )
    result = train(fine)
    # stage 1's features reused: only the images of the 8 rows it skipped are new
    listings = sorted(feats.rglob("shard-*.json"))
    assert [len(json.loads(p.read_text())) for p in listings] == [16, 8]
    assert [p.with_suffix(".npy").name for p in listings[:1]] == shards
    tuned = _llm(result.model_dir)
    assert any(not torch.equal(before[k], tuned[k]) for k in before)
    from vistune.model.llava import LlavaModel

    loaded = LlavaModel.load(result.model_dir)
    assert loaded.config.template == "vicuna_v0"
    saved = json.loads((tmp_path / "fine" / "train_config.json").read_text())
    assert saved["stage"] == "finetune" and saved["lr"] == 1e-3
    assert (tmp_path / "fine" / "summary.json").is_file()


def test_lora_finetune_merges_into_the_llm(tiny_data, tiny_model_dir, tmp_path):
    from vistune.errors import ModelDirError
    from vistune.model.llava import LlavaModel

    cfg = TrainConfig(
        **tiny_args(
            tiny_data,
            tmp_path / "lora",
            tmp_path / "f",
            tiny_model_dir,
            stage="finetune",
            lora_r=4,
            lr=1e-2,
            max_steps=3,
        )
    )
    result = train(cfg)
    before, after = _llm(tiny_model_dir), _llm(result.model_dir)
    assert set(before) == set(after)  # plain LLM tensors: merged, no lora_A/lora_B left
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)
    split = TrainConfig(
        **tiny_args(
            tiny_data,
            tmp_path / "split",
            tmp_path / "f",
            tiny_model_dir,
            stage="finetune",
            lora_r=4,
            lr=1e-2,
            max_steps=3,
            lora_merge=False,
        )
    )
    train(split)
    assert (tmp_path / "split" / "adapter" / "adapter_config.json").is_file()
    base = _llm(tmp_path / "split" / "model")
    assert all(torch.equal(before[k], base[k]) for k in before)
    # the model directory carries the adapter, and loading it gives the tuned LLM
    assert (tmp_path / "split" / "model" / "adapter" / "adapter_model.safetensors").is_file()
    merged = LlavaModel.load(tmp_path / "split" / "model")
    assert merged.llm_source is None  # llm/ alone is not this LLM: never kept as a frozen one
    loaded = merged.llm.state_dict()
    assert set(after) <= set(loaded)  # the state dict also names the tied lm_head
    for key in after:
        torch.testing.assert_close(loaded[key], after[key], rtol=1e-5, atol=1e-6, msg=key)
    (tmp_path / "split" / "model" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"adapter: missing adapter_model.safetensors"):
        LlavaModel.load(tmp_path / "split" / "model")


def test_lora_wraps_and_loads_without_a_deprecation_warning(tiny_model, tmp_path):
    """peft reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps or
    loads an adapter: every LoRA run (one per rank under torchrun) and every chat on an
    unmerged adapter printed a FutureWarning the user can do nothing about."""
    import copy
    import warnings

    from vistune.model.llava import LlavaModel
    from vistune.train.export import finalize
    from vistune.train.setup import apply_stage

    model = copy.deepcopy(tiny_model)
    cfg = TrainConfig(stage="finetune", lora_r=4, gradient_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_stage(model, cfg)
        finalize(model, True, False, True, "eager", tmp_path)
        model.save(tmp_path / "model")
        LlavaModel.load(tmp_path / "model")
    assert (tmp_path / "model" / "adapter" / "adapter_config.json").is_file()
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_bad_rows_skipped_and_reported_strict_fails(tiny_model_dir, tmp_path):
    from tests.train.conftest import write_dataset
    from tests.train.test_dataset import BAD_ROWS
    from vistune.errors import DataError

    data = write_dataset(tmp_path / "d", n=8, extra_rows=BAD_ROWS)
    corrupt = tmp_path / "d" / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    rows = json.loads(data.read_text())
    rows.append(
        {"id": "corrupt", "image": "corrupt.png", "conversations": rows[0]["conversations"]}
    )
    data.write_text(json.dumps(rows))
    args = tiny_args(
        data,
        tmp_path / "out",
        tmp_path / "f",
        tiny_model_dir,
        model_max_length=128,
        template="vicuna_v0",
    )
    said: list[str] = []
    result = train(TrainConfig.from_settings(args), say=said.append)
    assert result.samples == 8
    # which image and why, not only a count
    assert any(line.startswith(f"unreadable image, skipped: {corrupt}: ") for line in said), said
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {
        "missing_image": 1,
        "empty_conversation": 1,
        "image_without_placeholder": 1,
        "placeholder_without_image": 1,
        "too_long": 1,
        "malformed": 1,
        "bad_image": 1,
    }
    with pytest.raises(DataError, match="sample no-file"):
        train(TrainConfig.from_settings({**args, "out": str(tmp_path / "strict"), "strict": True}))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_step_stops_and_keeps_last_good_checkpoint(
    poison, tiny_data, tiny_model_dir, tmp_path, monkeypatch
):
    """A NaN loss, or an inf gradient under a finite loss, at step 5 stops the run before
    the weights change, naming the last good checkpoint."""
    from vistune.errors import VistuneError
    from vistune.train import loop

    original, calls = loop._micro_step, []

    def poisoned(run, *args, **kwargs):
        value = original(run, *args, **kwargs)
        calls.append(1)
        if poison == "loss" and len(calls) == 9:  # step 5, first micro-batch
            return torch.full_like(value, float("nan"))
        if poison == "gradient" and len(calls) == 10:  # step 5's last: the loss stays finite
            grads = [p.grad for p in run.wrapped.parameters() if p.grad is not None]
            grads[0].view(-1)[0] = float("inf")
        return value

    monkeypatch.setattr(loop, "_micro_step", poisoned)
    args = tiny_args(
        tiny_data, tmp_path / "out", tmp_path / "f", tiny_model_dir, save_every=2, stage="finetune"
    )
    what = "loss is nan" if poison == "loss" else r"gradient norm is inf \(loss .*\)"
    with pytest.raises(VistuneError, match=what + r" at step 5.*step-00000004"):
        train(TrainConfig(**args))
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"]
    assert not (tmp_path / "out" / "model").exists()
    with pytest.raises(VistuneError, match="already has checkpoints; add --resume"):
        train(TrainConfig(**args))


def test_gradient_checkpointing_gives_the_same_weights(tiny_data, tiny_model_dir, tmp_path):
    from vistune.model.llava import LlavaModel
    from vistune.train.setup import apply_stage

    model = LlavaModel.load(tiny_model_dir)
    apply_stage(model, TrainConfig(stage="finetune", gradient_checkpointing=True))
    assert model.llm.is_activation_checkpointing
    weights = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        args = tiny_args(
            tiny_data,
            out,
            tmp_path / "f",
            tiny_model_dir,
            stage="finetune",
            max_steps=2,
            lr=1e-3,
            gradient_checkpointing=checkpointing,
            cpu_kernels=False,  # both through transformers' layers (checkpointing needs them)
        )
        train(TrainConfig(**args))
        weights.append(_llm(out / "model"))
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-6, atol=1e-7)


def test_resume_past_the_runs_last_step_is_refused(tiny_data, tiny_model_dir, tmp_path):
    from vistune.errors import VistuneError

    args = tiny_args(tiny_data, tmp_path / "out", tmp_path / "f", tiny_model_dir, save_every=2)
    train(TrainConfig(**args, max_steps=4))
    with pytest.raises(VistuneError, match="is at step 4, past this run's 2 steps"):
        train(TrainConfig(**args, max_steps=2, resume=True))


def test_an_output_or_feature_folder_that_cannot_be_made_is_one_line(
    tiny_data, tiny_model_dir, tmp_path, capsys
):
    from vistune.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = tiny_args(tiny_data, tmp_path / "out", tmp_path / "f", tiny_model_dir)
    argv = ["train", "--data", args["data"], "--init", args["init"]]
    argv += ["--batch-size", "4", "--per-device-batch", "2", "--max-steps", "1", "--no-plot"]
    for where, out, features in (
        ("out", blocker, tmp_path / "f"),
        ("out", blocker / "run", tmp_path / "f"),
        ("features", tmp_path / "out", blocker / "store"),
    ):
        code = main([*argv, "--out", str(out), "--features", str(features)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-800:]
        assert f"cannot use the {where} folder" in err


def test_a_second_run_into_the_same_out_is_refused(tiny_data, tiny_model_dir, tmp_path):
    """Two runs into one folder wrote one log, one set of checkpoints and one model, and
    each reported the other's loss; the lock dies with its holder, so a killed run's folder
    takes a --resume at once."""
    import fcntl
    import os

    from vistune.errors import VistuneError

    out = tmp_path / "out"
    out.mkdir()
    holder = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"4242")
    args = tiny_args(tiny_data, out, tmp_path / "f", tiny_model_dir, max_steps=1)
    try:
        with pytest.raises(VistuneError, match=r"another vistune train \(pid 4242\) is writing"):
            train(TrainConfig(**args))
    finally:
        os.close(holder)  # as the process ends
    assert train(TrainConfig(**args)).steps == 1
    assert (out / ".lock").read_text() == str(os.getpid())


def test_a_resume_reports_the_skips_of_the_data_it_reads(tiny_model_dir, tmp_path):
    """The counts came from the checkpoint, so rows added since (skipped: the samples are
    the same) were not reported."""
    from tests.train.conftest import write_dataset

    data = write_dataset(tmp_path / "d", n=12)
    args = tiny_args(data, tmp_path / "out", tmp_path / "f", tiny_model_dir, max_steps=1,
                     save_every=1)  # fmt: skip
    train(TrainConfig(**args))
    rows = json.loads(data.read_text())
    rows.append({"id": "gone", "image": "nowhere.png", "conversations": rows[1]["conversations"]})
    data.write_text(json.dumps(rows))
    train(TrainConfig(**{**args, "resume": True, "max_steps": 2}))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {"plain_multi_turn": 4, "missing_image": 1}


def test_projector_lr_moves_the_projector_at_its_own_rate(tiny_data, tiny_model_dir, tmp_path):
    """Adam's first step moves every weight by about the learning rate (sign of the
    gradient): with projector_lr 100x lr, the projector's largest move is about 100x the
    LLM's. One step, no warmup, no clipping."""
    moves = {}
    for name, projector_lr in (("same", None), ("fast", 1e-2)):
        args = tiny_args(tiny_data, tmp_path / name, tmp_path / "feats", tiny_model_dir)
        args.update(stage="finetune", lr=1e-4, projector_lr=projector_lr, max_steps=1,
                     warmup_ratio=0.0, max_grad_norm=0.0, gain_samples=0)  # fmt: skip
        train(TrainConfig(**args))
        model_dir = tmp_path / name / "model"
        moved = {}
        for part, file in (
            ("projector", "projector.safetensors"),
            ("llm", "llm/model.safetensors"),
        ):
            before, after = load_file(str(tiny_model_dir / file)), load_file(str(model_dir / file))
            moved[part] = max(float((after[k] - before[k]).abs().max()) for k in before)
        moves[name] = moved
    assert moves["same"]["projector"] == pytest.approx(1e-4, rel=0.05)
    assert moves["same"]["llm"] == pytest.approx(1e-4, rel=0.05)
    assert moves["fast"]["projector"] == pytest.approx(1e-2, rel=0.05)
    assert moves["fast"]["llm"] == pytest.approx(1e-4, rel=0.05)


def test_each_step_logs_the_loss_of_each_response_type(tiny_model_dir, tmp_path):
    """Data mixing the paper's response types (ids "<image>_<type>", as datagen writes
    them): each step logs each type's mean token CE, of which the step's loss is the
    target-weighted mean; the chart draws a smoothed curve per type."""
    from tests.train.conftest import write_dataset
    from vistune.train.report import plot_loss

    data = write_dataset(tmp_path / "data", n=16)
    rows = json.loads(data.read_text())
    for i, row in enumerate(rows):
        row["id"] = f"{i}_{'conversation' if i % 2 else 'detail'}"
    data.write_text(json.dumps(rows))
    cfg = TrainConfig(**tiny_args(data, tmp_path / "out", tmp_path / "feats", tiny_model_dir,
                                  stage="finetune", gain_samples=0))  # fmt: skip
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert all(set(r["loss_by_type"]) <= {"conversation", "detail"} for r in log)
    assert {t for r in log for t in r["loss_by_type"]} == {"conversation", "detail"}
    for r in log:  # a weighted mean lies between its parts
        parts = r["loss_by_type"].values()
        assert min(parts) - 1e-6 <= r["loss"] <= max(parts) + 1e-6
    assert any(len(r["loss_by_type"]) == 2 for r in log)
    labels = plot_loss(log * 3, tmp_path / "loss.png")
    assert {"conversation (smoothed)", "detail (smoothed)"} <= set(labels)

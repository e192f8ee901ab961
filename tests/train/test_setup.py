"""What a run prepares before its first step: the notes it logs about its settings."""

from __future__ import annotations

from vistune.config import ModelConfig
from vistune.model.llava import LlavaModel
from vistune.train.config import TrainConfig
from vistune.train.setup import run_notes


def test_run_notes_say_what_runs_otherwise_than_a_user_may_expect(
    tiny_clip_dir, tiny_dinov2_dir, tiny_llm_dir
):
    """The paper configs' image_size 224 silently ran a CLIP tower of another size on
    interpolated positions (here: the tiny 28 px CLIP at 56), a side that is not a multiple
    of the patch silently lost its last pixels, and --fsdp in one process did nothing."""

    def notes(vision, size: int, world: int = 1, **cfg) -> list[str]:
        model = LlavaModel.from_parts(vision, tiny_llm_dir, ModelConfig(image_size=size))
        return run_notes(model, TrainConfig(**{"model_max_length": 512, **cfg}), world)

    assert notes(tiny_clip_dir, 28) == []
    assert notes(tiny_clip_dir, 56) == [
        "image_size 56 is not the vision tower's own 28: its position embeddings are "
        "interpolated (16 image tokens); image_size 28 runs the tower as it was trained"
    ]
    assert notes(tiny_clip_dir, 35)[1] == (
        "image_size 35 is not a multiple of the tower's patch 14: the last 7 pixels of each "
        "side are never seen"
    )
    assert notes(tiny_dinov2_dir, 56) == []  # DINOv2 interpolates as a matter of course
    assert notes(tiny_clip_dir, 28, fsdp=True) == [
        "--fsdp shards across processes started by torchrun; one process: unsharded"
    ]
    assert notes(tiny_clip_dir, 28, world=2, fsdp=True) == []
    assert notes(tiny_clip_dir, 28, model_max_length=2048) == [
        "model_max_length 2048 exceeds the LLM's 512 positions"
    ]


def test_vistune_features_says_it_before_filling_the_store(
    tiny_clip_dir, tiny_llm_dir, tiny_data, tmp_path, capsys
):
    """`vistune features` is where the paper's setup spends its first hour: the image size
    note comes from there too, not only from the training run after it."""
    from vistune.cli import main

    argv = ["features", "--vision", str(tiny_clip_dir), "--llm", str(tiny_llm_dir)]
    argv += ["--image-size", "56", "--data", str(tiny_data), "--features", str(tmp_path / "f")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "vistune features: image_size 56 is not the vision tower's own 28" in err


def test_batch_and_inputs_are_checked_before_the_model_loads(
    tiny_data, tiny_model_dir, tmp_path, monkeypatch
):
    """A batch that does not split, a data file or image folder that is not there were
    refused only after the model had loaded and the features had filled (an hour at the
    paper's scale, once per try)."""
    import pytest

    from tests.train.conftest import tiny_args
    from vistune.errors import VistuneError
    from vistune.train import loop

    def built(*_args, **_kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(loop, "build_model", built)
    args = tiny_args(tiny_data, tmp_path / "out", tmp_path / "f", tiny_model_dir)
    for extra, message in (
        ({"batch_size": 4, "per_device_batch": 3}, "batch_size 4 is not a multiple of"),
        ({"data": str(tmp_path / "none.json")}, "none.json: training data file not found"),
        ({"image_folder": str(tmp_path / "imgs")}, "imgs: image folder not found"),
    ):
        with pytest.raises(VistuneError, match=message):
            loop.train(TrainConfig(**{**args, **extra}))
    assert not (tmp_path / "f").exists()  # no features were filled


def test_an_llm_with_learned_positions_trains_on_samples_cut_to_its_table(tiny_clip_dir, tmp_path):
    """A GPT-2-style LLM has no position past its table: a sample longer than that (within
    model_max_length) ended the run with an IndexError from the position lookup."""
    import json

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import build_tiny_tokenizer
    from tests.train.conftest import tiny_args, write_dataset
    from vistune.train.loop import train
    from vistune.train.setup import learned_positions, sample_limit

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer),
                        n_positions=48, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    tokenizer.save_pretrained(gpt2)
    model = LlavaModel.from_parts(tiny_clip_dir, gpt2, ModelConfig(image_size=28))
    assert learned_positions(model.llm)
    assert sample_limit(TrainConfig(), model) == 48
    assert run_notes(model, TrainConfig(), 1) == [
        "model_max_length 2048 exceeds the LLM's 48 learned positions: samples are cut to 48 tokens"
    ]
    assert sample_limit(TrainConfig(model_max_length=40), model) == 40

    data = write_dataset(tmp_path / "data", n=8)
    rows = json.loads(data.read_text())
    rows[1]["conversations"][1]["value"] = "The image is blue. " * 20  # one turn: plain
    data.write_text(json.dumps(rows))
    said: list[str] = []
    args = tiny_args(data, tmp_path / "out", tmp_path / "f", "default", vision=str(tiny_clip_dir),
                     llm=str(gpt2), image_size=28, max_steps=2)  # fmt: skip
    result = train(TrainConfig.from_settings(args), say=said.append)
    assert result.steps == 2
    assert any("1 cut to 48 tokens" in line for line in said), said

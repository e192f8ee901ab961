"""Training teaches the model to read the image (issue 16): not only the wording.

A tiny model is trained on answers that only the picture can give (the colour of a solid
image); on held-out images its loss with the right image must end clearly below its loss
with the images swapped among the samples (the image gain, vistune.train.gain).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.train.conftest import RGB, tiny_args, write_dataset
from vistune.data.conversation import tokenize_conversation
from vistune.features import tower_features
from vistune.model.llava import LlavaModel
from vistune.train.config import TrainConfig
from vistune.train.gain import image_gain
from vistune.train.loop import train
from vistune.train.step import TrainStep


def held_out(folder, model):
    """Six new images (one per colour, another size than the training ones) and their
    colour questions, tokenised under the model's template."""
    folder.mkdir()
    ids, labels, paths = [], [], []
    for i, (colour, rgb) in enumerate(RGB.items()):
        path = folder / f"held{i}.png"
        Image.new("RGB", (31, 30), rgb).save(path)
        turns = [{"from": "human", "value": "<image>\nWhat colour is the image?"},
                 {"from": "gpt", "value": f"The image is {colour}."}]  # fmt: skip
        sample = tokenize_conversation(turns, model.tokenizer, model.config.template)
        ids.append(sample.input_ids)
        labels.append(sample.labels)
        paths.append(path)
    return ids, labels, tower_features(model, paths)


def gain_of(model, data):
    ids, labels, features = data
    return image_gain(TrainStep(model, fast=False), ids, labels, features)


def test_training_makes_the_loss_depend_on_the_image(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "data", n=48)
    args = tiny_args(data, tmp_path / "out", tmp_path / "feats", tiny_model_dir,
                     stage="finetune", template="chat_template", epochs=20, lr=1e-2,
                     batch_size=8, per_device_batch=8, save_every=1000,
                     gain_samples=8, gain_every=25, plot=True)  # fmt: skip
    before = LlavaModel.load(tiny_model_dir)
    held = held_out(tmp_path / "held", before)
    untrained = gain_of(before, held)
    train(TrainConfig.from_settings(args))
    after = gain_of(LlavaModel.load(tmp_path / "out" / "model"), held)
    assert abs(untrained["gain"]) < 0.1
    assert after["own"] < untrained["own"]
    # the colour word is one token in about six: a model that reads it gains ~0.3 nats a token
    assert after["gain"] > 0.15, after
    # the run measured it too, on the 8 samples it held out, and says so
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["held_out"] == 8 and summary["samples"] == 40
    logged = summary["image_gain"]
    assert [g["step"] for g in logged] == [25, 50, 75, 100]
    assert logged[-1]["image_gain"] > 0.15 and logged[-1]["image_gain"] > logged[0]["image_gain"]
    assert (tmp_path / "out" / "loss.png").is_file()


def test_the_gain_is_zero_when_the_images_carry_nothing(tiny_model):
    ids = [[1, 2, -200, 3, 4], [1, 2, -200, 5, 6]]
    labels = [[-100, -100, -200, 3, 4], [-100, -100, -200, 5, 6]]
    labels = [[t if t != -200 else -100 for t in row] for row in labels]
    same = torch.ones(1, 4, tiny_model.vision.hidden_size).expand(2, 4, -1)
    gain = image_gain(TrainStep(tiny_model, fast=False), ids, labels, same)
    assert gain["own"] == pytest.approx(gain["swapped"])
    assert gain["gain"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="two or more samples"):
        image_gain(TrainStep(tiny_model, fast=False), ids[:1], labels[:1], same[:1])


def test_hold_out_takes_samples_with_images_by_seed_and_spares_small_runs():
    from pathlib import Path

    from vistune.data.dataset import Sample
    from vistune.train.gain import hold_out

    def sample(i: int) -> Sample:
        return Sample(str(i), Path(f"{i}.png") if i % 2 else None, [1], [1], 1, 0)

    samples = [sample(i) for i in range(40)]  # 20 with an image
    train, held = hold_out(samples, 4, seed=0)
    assert len(held) == 4 and all(s.image is not None for s in held)
    assert len(train) == 36 and not {s.id for s in held} & {s.id for s in train}
    assert hold_out(samples, 4, seed=0)[1] == held != hold_out(samples, 4, seed=1)[1]
    assert hold_out(samples, 6, seed=0) == (samples, [])  # 20 images < 4 x 6
    assert hold_out(samples, 0, seed=0) == (samples, [])

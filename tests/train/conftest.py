"""Fixtures for the training tests: a saved tiny model directory and a tiny LLaVA dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

COLOURS = ["red", "blue", "green", "yellow", "white", "black"]
RGB = {
    "red": (220, 30, 30),
    "blue": (30, 30, 220),
    "green": (30, 200, 30),
    "yellow": (230, 220, 40),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
}


def write_dataset(folder: Path, n: int = 24, extra_rows: list | None = None) -> Path:
    """n images (solid colours, 28x28) and a LLaVA JSON with one or two turns each."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        name = f"img{i:03d}.png"
        if not (folder / name).exists():
            Image.new("RGB", (28 + i % 3, 28), RGB[colour]).save(folder / name)
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the image?"},
            {"from": "gpt", "value": f"The image is {colour}."},
        ]
        if i % 3 == 0:
            turns += [
                {"from": "human", "value": "Is it large or small?"},
                {
                    "from": "gpt",
                    "value": "It is small, and the colour fills it from left to right.",
                },
            ]
        rows.append({"id": f"s{i}", "image": name, "conversations": turns})
    rows += extra_rows or []
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tmp_path_factory) -> Path:
    """The shared tiny LlavaModel saved as a model directory (read-only for tests)."""
    return tiny_model.save(tmp_path_factory.mktemp("tiny_init") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_data"))


def tiny_args(data: Path, out: Path, features: Path, init: Path, **extra) -> dict:
    """TrainConfig fields for a fast fp32 run on the tiny model."""
    args = dict(
        stage="pretrain",
        data=str(data),
        out=str(out),
        init=str(init),
        features=str(features),
        batch_size=4,
        per_device_batch=2,
        epochs=1,
        precision="fp32",
        plot=False,
        save_every=3,
    )
    args.update(extra)
    return args

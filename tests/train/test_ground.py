"""Grounded projector alignment: which cell shows what, the targets, and the fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train.conftest import tiny_args, write_dataset
from vistune.data.annotations import Box
from vistune.data.formats import load_coco
from vistune.data.scenes import make_scenes
from vistune.errors import DataError
from vistune.train.config import TrainConfig
from vistune.train.ground import (
    align_projector,
    alignment_loss,
    cell_objects,
    cell_targets,
    cell_third,
    square_box,
    third,
)
from vistune.train.loop import train


def test_cells_show_the_smallest_covering_box_and_every_object_owns_its_centre():
    big = Box("square", (0.0, 0.0, 1.0, 1.0))
    small = Box("star", (0.55, 0.55, 0.65, 0.65))  # covers no cell centre of a 2x2 grid
    cells = cell_objects([big, small], 2)
    assert cells == [big, big, big, small]  # the star's centre falls in the last cell
    assert cell_objects([], 3) == [None] * 9


def test_centre_cells_name_each_object_once_whatever_its_size():
    """`centre`: the tokens naming a kind count the objects, not the cells they cover."""
    big = Box("star", (0.0, 0.0, 0.7, 0.7))  # covers 4 of a 3x3 grid's cell centres
    small = Box("star", (0.7, 0.7, 0.95, 0.95))
    assert sum(c is big for c in cell_objects([big, small], 3)) == 4
    centre = cell_objects([big, small], 3, "centre")
    assert centre == [None, None, None, None, big, None, None, None, small]
    # two centres in one cell: the smaller object keeps it
    inner = Box("ring", (0.4, 0.4, 0.6, 0.6))
    assert cell_objects([big, inner], 3, "centre")[4] is inner
    with pytest.raises(ValueError, match="unknown ground cells .all.; valid: cover, centre"):
        cell_objects([big], 3, "all")
    with pytest.raises(ValueError, match="ground_cells"):
        TrainConfig(data="x.json", ground_cells="middle")


def test_boxes_follow_the_towers_square():
    # a 200 x 100 image padded to 200 x 200: y moves down by a quarter and halves
    assert square_box((0.0, 0.0, 0.5, 1.0), 200, 100, "pad") == (0.0, 0.25, 0.5, 0.75)
    assert square_box((0.1, 0.2, 0.3, 0.4), 200, 100, "resize") == (0.1, 0.2, 0.3, 0.4)
    # a centre crop of 100 x 100 keeps x in [0.25, 0.75]; a box left of it is cut away
    assert square_box((0.0, 0.0, 0.2, 1.0), 200, 100, "crop") is None
    assert square_box((0.25, 0.0, 0.5, 1.0), 200, 100, "crop") == (0.0, 0.0, 0.5, 1.0)


def test_targets_are_the_words_of_the_object_or_background():
    words = {"red": 1.0, "star": 3.0, "background": -1.0, "top": 10.0, "left": 20.0}
    words |= {"bottom": 30.0, "right": 40.0}

    def vector(text: str) -> torch.Tensor:
        return torch.tensor([sum(words[w] for w in text.split()) / len(text.split())])

    box = Box("star", (0.0, 0.0, 0.3, 0.3), "red")
    assert third(box) == "top left" and third(Box("x", (0.4, 0.4, 0.6, 0.6))) == "center"
    targets = cell_targets([box], 2, vector)
    assert targets.flatten().tolist() == [2.0, -1.0, -1.0, -1.0]
    # with `where` the object's third joins its words, and each background cell's own third
    where = cell_targets([box], 2, vector, where=True).flatten().tolist()
    assert where == pytest.approx([8.5, (-1 + 10 + 40) / 3, (-1 + 30 + 20) / 3, (-1 + 30 + 40) / 3])
    assert [cell_third(i, 3) for i in (0, 4, 5, 8)] == [
        "top left",
        "center",
        "right",
        "bottom right",
    ]


def test_alignment_fits_a_projector_and_the_loss_sees_norm_and_direction():
    torch.manual_seed(0)
    features = torch.randn(64, 4, 8)
    mapping = torch.randn(8, 6)
    targets = features @ mapping  # (64, 4, 6): a linear projector can fit it exactly
    assert alignment_loss(targets, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(2 * targets, targets).item() == pytest.approx(0.1, abs=1e-5)
    projector = torch.nn.Linear(8, 6)
    losses = align_projector(projector, features, targets, steps=300, lr=3e-2, batch=16)
    assert len(losses) == 300 and losses[-1] < 0.05 < losses[0]
    # its last gradient must not reach training's first step (it did: DDP != one process)
    assert all(p.grad is None for p in projector.parameters())
    with pytest.raises(ValueError, match="differ in images or tokens"):
        align_projector(projector, features[:, :3], targets, steps=1, lr=1e-3)
    # a CLS token before the grid has no target: the last tokens are the grid's
    fitted = align_projector(projector, features, targets[:, 1:], steps=1, lr=1e-3)
    assert len(fitted) == 1


def test_ground_is_for_stage_one_and_needs_the_instances(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="pretrain stage only"):
        TrainConfig(stage="finetune", ground="x")
    data = write_dataset(tmp_path / "data", n=8)
    args = tiny_args(data, tmp_path / "out", tmp_path / "f", tiny_model_dir, ground=str(tmp_path))
    with pytest.raises(DataError, match="instances_train.json: not found"):
        train(TrainConfig(**args))


def scene_data(scenes: Path) -> tuple[Path, Path]:
    """Ten 32 px scenes (all "train") and a stage-1 LLaVA JSON of their first captions."""
    make_scenes(scenes, 10, seed=0, val_fraction=0.0, size=32)
    contexts, _ = load_coco(scenes, "train")
    rows = [{"id": c.image_id, "image": c.image, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": c.captions[0]}]}
        for c in contexts]  # fmt: skip
    data = scenes / "brief.json"
    data.write_text(json.dumps(rows))
    return scenes, data


def test_stage_one_grounds_the_projector_on_scene_boxes(tmp_path, tiny_model_dir):
    """The real loop on scenes: the projector moves toward the words before the captions."""
    scenes, data = scene_data(tmp_path / "scenes")
    said = []
    args = tiny_args(data, tmp_path / "out", tmp_path / "f", tiny_model_dir, ground=str(scenes),
                     ground_steps=40, ground_lr=1e-2, image_folder=str(scenes), max_steps=1)  # fmt: skip
    train(TrainConfig(**args), say=said.append)
    (line,) = [s for s in said if s.startswith("grounded the projector on 10 images")]
    first, last = (float(v) for v in line.rsplit("loss ", 1)[1].split(" -> "))
    assert last < first


def test_grounding_starts_the_position_table_at_each_cells_third(
    tmp_path, tiny_clip_dir, tiny_llm_dir
):
    """mlp2x_gelu_pos: the table's rows begin as the LLM's words of the cell's third (2x2
    grid: top left, top right, bottom left, bottom right); a near-zero learning rate keeps
    them there through the alignment and one caption step."""
    from vistune.config import ModelConfig
    from vistune.model.llava import LlavaModel
    from vistune.train.ground import word_vector

    model = LlavaModel.from_parts(
        tiny_clip_dir, tiny_llm_dir, ModelConfig(image_size=28, projector="mlp2x_gelu_pos")
    )
    init = model.save(tmp_path / "init")
    scenes, data = scene_data(tmp_path / "scenes")
    args = tiny_args(data, tmp_path / "out", tmp_path / "f", init, ground=str(scenes),
                     ground_steps=2, ground_lr=1e-12, lr=1e-12, image_folder=str(scenes),
                     max_steps=1, gain_samples=0)  # fmt: skip
    train(TrainConfig(**args))
    trained = LlavaModel.load(tmp_path / "out" / "model")
    embed = model.llm.get_input_embeddings().weight.detach()
    words = ["top left", "top right", "bottom left", "bottom right"]
    expected = torch.stack([word_vector(embed, model.tokenizer, w) for w in words])
    torch.testing.assert_close(trained.projector.position.detach(), expected, atol=1e-5, rtol=0)

"""Built-in synthetic scenes (vistune.data.scenes): layout, determinism, exact boxes, captions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vistune.cli import main
from vistune.data.formats import load_coco
from vistune.data.scene_captions import scene_captions
from vistune.data.scenes import (
    COLORS,
    KINDS,
    SceneObject,
    SceneSpec,
    load_scene_objects,
    make_scenes,
    position_name,
    render_scene,
)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    assert make_scenes(out, 30, seed=5, val_fraction=0.2, size=128) == {"train": 24, "val": 6}
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_coco_layout_and_reader(scenes_dir: Path) -> None:
    names = sorted(p.name for p in (scenes_dir / "annotations").iterdir())
    assert names == [f"{k}_{s}.json" for k in ("captions", "instances") for s in ("train", "val")]
    assert len(list((scenes_dir / "train").glob("*.png"))) == 24
    assert sorted(p.name for p in (scenes_dir / "val").iterdir())[0] == "000000000025.png"
    instances = json.loads((scenes_dir / "annotations" / "instances_val.json").read_text())
    assert {"images", "annotations", "categories", "info", "licenses"} <= set(instances)
    cats = instances["categories"]
    assert len(cats) == len(KINDS) >= 8 and len(COLORS) >= 8
    assert all(set(c) == {"id", "name", "supercategory"} for c in cats)
    ann = instances["annotations"][0]
    assert {"kind", "color", "size_name", "position", "bbox", "category_id", "area"} <= set(ann)
    assert cats[ann["category_id"] - 1]["name"] == ann["kind"]

    contexts, skipped = load_coco(scenes_dir, "train", check_images=True)
    assert not skipped and len(contexts) == 24
    for ctx in contexts:
        assert len(ctx.captions) == 5 and len(set(ctx.captions)) == 5
        assert 1 <= len(ctx.boxes) <= 6
        assert (ctx.width, ctx.height) == (128, 128)
        assert Image.open(scenes_dir / ctx.image).size == (128, 128)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, scenes_dir: Path) -> None:
    make_scenes(tmp_path / "again", 30, seed=5, val_fraction=0.2, size=128)
    assert _tree(tmp_path / "again") == _tree(scenes_dir)
    make_scenes(tmp_path / "other", 30, seed=6, val_fraction=0.2, size=128)
    other = _tree(tmp_path / "other")
    assert other.keys() == _tree(scenes_dir).keys()
    assert other["train/000000000001.png"] != _tree(scenes_dir)["train/000000000001.png"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_box_is_exact_extent_of_painted_pixels(kind: str) -> None:
    spec = SceneSpec(64, "plain", ("gray", "beige"), ((kind, "red", "large", (10, 17, 30)),))
    image, (obj,) = render_scene(spec)
    pixels = np.asarray(image).astype(int)  # (H, W, 3)
    painted = np.argwhere((pixels != [150, 150, 150]).any(axis=-1))  # rows of (y, x)
    assert np.all(pixels[tuple(painted.T)] == COLORS["red"])
    y1, x1 = painted.min(axis=0)
    y2, x2 = painted.max(axis=0) + 1
    assert obj.bbox == (x1, y1, x2 - x1, y2 - y1)
    assert obj.area == len(painted)
    assert 10 <= x1 and 17 <= y1 and x2 <= 40 and y2 <= 47  # inside its 30-px square
    assert x2 - x1 >= 20 and y2 - y1 >= 20  # and fills most of it


def test_ground_truth_matches_annotations_and_objects_do_not_overlap(scenes_dir: Path) -> None:
    truth = load_scene_objects(scenes_dir, "train")
    contexts, _ = load_coco(scenes_dir, "train")
    for ctx in contexts:
        objects = truth[ctx.image_id]
        assert [o.kind for o in objects] == [b.category for b in ctx.boxes]
        for o, box in zip(objects, ctx.boxes, strict=True):
            x, y, w, h = o.bbox
            assert box.xyxy == (x / 128, y / 128, (x + w) / 128, (y + h) / 128)
            assert o.position == position_name((x + w / 2) / 128, (y + h / 2) / 128)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                ax, ay, aw, ah = a.bbox
                bx, by, bw, bh = b.bbox
                assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay


def test_position_names() -> None:
    assert position_name(0.1, 0.1) == "top left"
    assert position_name(0.5, 0.5) == "center"
    assert position_name(0.9, 0.5) == "right"
    assert position_name(0.5, 0.99) == "bottom"


def test_captions_state_the_ground_truth() -> None:
    objs = [
        SceneObject("star", "red", "small", "top left", (5, 5, 10, 10), 60),
        SceneObject("star", "red", "small", "top right", (80, 5, 10, 10), 60),
        SceneObject("circle", "blue", "large", "bottom", (40, 70, 40, 40), 1200),
    ]
    seen = set()
    for seed in range(30):
        caps = scene_captions(objs, "striped", random.Random(seed))
        assert len(caps) == 5 and len(set(caps)) == 5
        seen.update(caps)
    text = "\n".join(seen)
    assert "There are three " in text
    assert "two red stars and a blue circle" in text.lower()
    assert "The largest object is a blue circle and the smallest is a red star." in seen
    assert "a large blue circle at the bottom" in text.lower()
    assert "Shapes in red and blue are scattered over" in text
    assert "striped" in text or "stripes" in text
    assert "left of" not in text  # the two red stars are not unique, the circle is below them


def test_scenes_command(tmp_path: Path, capsys) -> None:
    assert main(["scenes", "--n", "3", "--seed", "1", "--out", str(tmp_path), "--size", "64"]) == 0
    assert "wrote 3 scenes" in capsys.readouterr().out
    assert len(list((tmp_path / "train").glob("*.png"))) == 2  # round(3 * 0.2) = 1 in val
    assert main(["scenes", "--n", "2", "--out", str(tmp_path), "--val-fraction", "1"]) == 2
    assert "--val-fraction must be in [0, 1)" in capsys.readouterr().err


def test_scenes_command_out_is_a_file(tmp_path: Path, capsys) -> None:
    taken = tmp_path / "scenes"
    taken.write_text("not a folder")
    assert main(["scenes", "--n", "2", "--out", str(taken)]) == 2
    assert f"--out {taken} is a file, not a folder" in capsys.readouterr().err

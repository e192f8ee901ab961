"""Built-in synthetic scenes: an offline, exactly-annotated stand-in for COCO (paper §3).

`make_scenes` renders images of 1-6 coloured shapes on varied backgrounds with PIL and
writes them laid out as COCO's release is:

    DIR/annotations/captions_<split>.json    images + five captions per image
    DIR/annotations/instances_<split>.json   images + boxes + categories
    DIR/<split>/<12-digit id>.png            splits "train" and "val"

Boxes are exact: each object is drawn through its own mask (no antialiasing) and its box is
the mask's pixel extent. Instance annotations carry extra ground-truth keys ("kind",
"color", "size_name", "position") that COCO readers ignore and that `load_scene_objects`
returns, so counts, colours, kinds, positions and absence can be answered exactly. Captions
are generated from the same ground truth. Everything is deterministic by seed: the same seed
gives identical JSON bytes and image pixels.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vistune.data.records import load_json
from vistune.data.scene_captions import scene_captions
from vistune.errors import DataError
from vistune.files import replacing, write_text

# name -> (category id, supercategory); ids start at 1 as in COCO.
KINDS: dict[str, tuple[int, str]] = {
    "circle": (1, "round"),
    "ring": (2, "round"),
    "heart": (3, "round"),
    "square": (4, "polygon"),
    "triangle": (5, "polygon"),
    "diamond": (6, "polygon"),
    "pentagon": (7, "polygon"),
    "hexagon": (8, "polygon"),
    "star": (9, "symbol"),
    "cross": (10, "symbol"),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "pink": (255, 105, 180),
    "brown": (120, 70, 20),
    "black": (10, 10, 10),
    "white": (250, 250, 250),
}
# name -> side of the object's square, as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.12, 0.16),
    "medium": (0.2, 0.25),
    "large": (0.3, 0.36),
}
BACKGROUNDS = ("plain", "gradient", "noisy", "striped")
# Muted mid-tone background colours, far from every object colour.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (150, 150, 150),
    "beige": (190, 180, 150),
    "slate": (110, 125, 140),
    "sage": (150, 170, 140),
    "sand": (175, 160, 125),
    "lavender gray": (160, 150, 175),
}
SPLITS = ("train", "val")
MAX_OBJECTS = 6
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class SceneObject:
    kind: str
    color: str
    size_name: str
    position: str
    """Where the box centre falls: "top left" ... "center" ... "bottom right"."""
    bbox: tuple[int, int, int, int]
    """COCO [x, y, w, h] in pixels, exact."""
    area: int = 0
    """Painted pixels."""


@dataclass(frozen=True)
class SceneSpec:
    """What to draw: a background and objects given by their square's (x, y, side) in px."""

    size: int
    background: str
    background_colors: tuple[str, str]
    objects: tuple[tuple[str, str, str, tuple[int, int, int]], ...]
    """(kind, color, size_name, (x, y, side)) per object."""


def position_name(cx: float, cy: float) -> str:
    """Name of the third of the image (0-1 coordinates) the point falls in."""
    col = ("left", "", "right")[min(int(cx * 3), 2)]
    row = ("top", "", "bottom")[min(int(cy * 3), 2)]
    return " ".join(p for p in (row, col) if p) or "center"


def random_spec(rng: random.Random, size: int = 224) -> SceneSpec:
    """A random scene: 1-6 mostly non-overlapping objects (rejection sampling on squares)."""
    background = rng.choice(BACKGROUNDS)
    bg_colors = tuple(rng.sample(sorted(BACKGROUND_COLORS), 2))
    n = rng.randint(1, MAX_OBJECTS)
    placed: list[tuple[int, int, int]] = []
    objects = []
    for _ in range(n):
        size_name = rng.choice(list(SIZES))
        lo, hi = SIZES[size_name]
        for _ in range(_PLACEMENT_TRIES):
            side = round(rng.uniform(lo, hi) * size)
            x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
            if all(not _overlap((x, y, side), other) for other in placed):
                placed.append((x, y, side))
                kind, color = rng.choice(list(KINDS)), rng.choice(list(COLORS))
                objects.append((kind, color, size_name, (x, y, side)))
                break
    return SceneSpec(size, background, bg_colors, tuple(objects))  # type: ignore[arg-type]


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int], margin: int = 3) -> bool:
    ax, ay, aside = a
    bx, by, bside = b
    return not (
        ax + aside + margin <= bx
        or bx + bside + margin <= ax
        or ay + aside + margin <= by
        or by + bside + margin <= ay
    )


def render_scene(spec: SceneSpec, seed: int = 0) -> tuple[Image.Image, list[SceneObject]]:
    """Draw the scene; each object's box is the exact extent of its painted pixels."""
    image = _background(spec, np.random.default_rng(seed))
    objects = []
    for kind, color, size_name, square in spec.objects:
        mask = Image.new("L", (spec.size, spec.size), 0)
        _draw_shape(ImageDraw.Draw(mask), kind, square)
        x1, y1, x2, y2 = mask.getbbox()  # right/lower exclusive
        image.paste(COLORS[color], (0, 0), mask)
        area = int(np.count_nonzero(np.asarray(mask)))
        cx, cy = (x1 + x2) / 2 / spec.size, (y1 + y2) / 2 / spec.size
        bbox = (x1, y1, x2 - x1, y2 - y1)
        objects.append(SceneObject(kind, color, size_name, position_name(cx, cy), bbox, area))
    return image, objects


def _background(spec: SceneSpec, rng: np.random.Generator) -> Image.Image:
    s = spec.size
    a = np.array(BACKGROUND_COLORS[spec.background_colors[0]], dtype=np.float32)
    b = np.array(BACKGROUND_COLORS[spec.background_colors[1]], dtype=np.float32)
    if spec.background == "plain":
        pixels = np.broadcast_to(a, (s, s, 3))
    elif spec.background == "gradient":
        t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]  # (S, 1, 1) top->bottom
        pixels = np.broadcast_to(a * (1 - t) + b * t, (s, s, 3))
    elif spec.background == "noisy":
        pixels = a + rng.normal(0.0, 10.0, size=(s, s, 1)).astype(np.float32)  # (S, S, 3)
    else:  # striped
        period = max(s // 8, 2)
        stripe = ((np.arange(s)[:, None] + np.arange(s)[None, :]) // (period // 2)) % 2
        pixels = np.where(stripe[..., None] == 0, a, b)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def _regular(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(phase + 2 * math.pi * i / n),
            cy + r * math.sin(phase + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, square: tuple[int, int, int]) -> None:
    x, y, side = square
    x2, y2 = x + side - 1, y + side - 1
    cx, cy, r = x + (side - 1) / 2, y + (side - 1) / 2, (side - 1) / 2
    up = -math.pi / 2
    if kind == "circle":
        draw.ellipse((x, y, x2, y2), fill=255)
    elif kind == "ring":
        draw.ellipse((x, y, x2, y2), fill=255)
        t = side * 0.22
        draw.ellipse((x + t, y + t, x2 - t, y2 - t), fill=0)
    elif kind == "square":
        draw.rectangle((x, y, x2, y2), fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, y), (x2, y2), (x, y2)], fill=255)
    elif kind == "diamond":
        draw.polygon([(cx, y), (cx + r * 0.7, cy), (cx, y2), (cx - r * 0.7, cy)], fill=255)
    elif kind == "pentagon":
        draw.polygon(_regular(cx, cy, r, 5, up), fill=255)
    elif kind == "hexagon":
        draw.polygon(_regular(cx, cy, r, 6, 0.0), fill=255)
    elif kind == "star":
        outer, inner = _regular(cx, cy, r, 5, up), _regular(cx, cy, r * 0.42, 5, up + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif kind == "cross":
        t = side / 3
        draw.rectangle((x + t, y, x2 - t, y2), fill=255)
        draw.rectangle((x, y + t, x2, y2 - t), fill=255)
    elif kind == "heart":
        draw.polygon(_heart(cx, cy, r), fill=255)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; valid: {', '.join(KINDS)}")


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    # The classic parametric heart, x in [-16, 16], y in [-17, 12] (upside down in image).
    pts = []
    for i in range(72):
        t = 2 * math.pi * i / 72
        hx = 16 * math.sin(t) ** 3
        hy = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + hx / 16 * r, cy - (hy + 2.5) / 14.5 * r))
    return pts


def categories() -> list[dict[str, Any]]:
    """COCO "categories" list of the scene kinds."""
    return [{"supercategory": sup, "id": cid, "name": name} for name, (cid, sup) in KINDS.items()]


def make_scenes(
    out: str | Path,
    n: int,
    seed: int = 0,
    val_fraction: float = 0.2,
    size: int = 224,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Render `n` scenes into `out` as a COCO-layout dataset; returns images per split.

    The last round(n * val_fraction) images form "val", the rest "train". Image ids run
    1..n across both splits; image i is drawn from a generator seeded by (seed, i) alone.
    `progress(1)` is called after each image.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    out = Path(out)
    n_val = round(n * val_fraction)
    ids = {"train": range(1, n - n_val + 1), "val": range(n - n_val + 1, n + 1)}
    counts = {}
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        images, caps, anns = [], [], []
        for image_id in ids[split]:
            record, image_caps, image_anns = _one_scene(out, split, image_id, seed, size)
            images.append(record)
            caps += [
                {"image_id": image_id, "id": len(caps) + i + 1, "caption": c}
                for i, c in enumerate(image_caps)
            ]
            anns += [{"id": len(anns) + i + 1, **a} for i, a in enumerate(image_anns)]
            if progress is not None:
                progress(1)
        info = {"description": "vistune synthetic scenes", "version": "1.0", "seed": seed}
        common = {"info": info, "licenses": [], "images": images}
        _write_json(out / "annotations" / f"captions_{split}.json", {**common, "annotations": caps})
        instances = {**common, "annotations": anns, "categories": categories()}
        _write_json(out / "annotations" / f"instances_{split}.json", instances)
        counts[split] = len(images)
    return counts


def _one_scene(
    out: Path, split: str, image_id: int, seed: int, size: int
) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
    rng = random.Random(f"vistune-scenes:{seed}:{image_id}")
    spec = random_spec(rng, size)
    image, objects = render_scene(spec, seed=rng.getrandbits(32))
    file_name = f"{image_id:012d}.png"
    path = out / split / file_name
    with replacing(path) as tmp:
        image.save(tmp, format="PNG")
    record = {
        "id": image_id,
        "file_name": file_name,
        "width": size,
        "height": size,
        "background": spec.background,
        "background_colors": list(spec.background_colors),
    }
    anns = [
        {
            "image_id": image_id,
            "category_id": KINDS[o.kind][0],
            "bbox": list(o.bbox),
            "area": o.area,
            "iscrowd": 0,
            "kind": o.kind,
            "color": o.color,
            "size_name": o.size_name,
            "position": o.position,
        }
        for o in objects
    ]
    return record, scene_captions(objects, spec.background, rng), anns


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=None))


def load_scene_objects(coco_dir: str | Path, split: str) -> dict[str, list[SceneObject]]:
    """Ground-truth objects per image id (as a string, like `ImageContext.image_id`).

    Reads the extra keys `make_scenes` stores in instances_<split>.json; a COCO file
    without them raises DataError.
    """
    path = Path(coco_dir) / "annotations" / f"instances_{split}.json"
    data = load_json(path)
    try:
        truth: dict[str, list[SceneObject]] = {str(img["id"]): [] for img in data["images"]}
        for ann in data["annotations"]:
            obj = SceneObject(
                ann["kind"], ann["color"], ann["size_name"], ann["position"],
                tuple(ann["bbox"]), ann.get("area", 0),
            )  # fmt: skip
            truth[str(ann["image_id"])].append(obj)
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a vistune scenes file (missing {err})") from None
    return truth

"""The symbolic context a text-only teacher sees instead of the image (paper §3, Table 1).

Captions describe the scene; boxes localise objects as `category: [x1, y1, x2, y2]` with
coordinates normalised to 0-1 by the image width and height.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Box:
    category: str
    xyxy: tuple[float, float, float, float]
    """(x1, y1, x2, y2), each in [0, 1]."""
    color: str = ""
    """The object's colour where the annotations give it (the built-in scenes' instances
    carry a "color" key; COCO's do not)."""

    def render(self) -> str:
        name = f"{self.color} {self.category}" if self.color else self.category
        return f"{name}: [{', '.join(f'{v:.3f}' for v in self.xyxy)}]"


@dataclass(frozen=True)
class ImageContext:
    image_id: str
    image: str
    """Path of the image relative to the dataset root (e.g. "train/000000000001.png"), as in LLaVA JSON."""
    captions: tuple[str, ...]
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    width: int = 0
    height: int = 0
    categories: tuple[str, ...] = ()
    """Every category name of the dataset (COCO's "categories"), so that a teacher can ask
    about objects that are not in this image; empty when unknown."""

    def render(self, with_boxes: bool = True) -> str:
        """The text block shown to the teacher: captions, a blank line, then boxes."""
        text = "\n".join(self.captions)
        if with_boxes and self.boxes:
            text += "\n\n" + "\n".join(b.render() for b in self.boxes)
        return text


def screen_contexts(
    contexts: list[ImageContext], image_root: Path | None, skipped: Counter
) -> list[ImageContext]:
    """Drop contexts the teacher cannot use, counting why (missing or unreadable images,
    no captions, boxes out of range, duplicate ids)."""
    kept, seen = [], set()
    for ctx in contexts:
        path = image_root / ctx.image if image_root is not None else None
        if ctx.image_id in seen:
            skipped["duplicate image id"] += 1
        elif path is not None and not path.is_file():
            skipped["image missing on disk"] += 1
        elif path is not None and not os.access(path, os.R_OK):
            skipped["image unreadable"] += 1
        elif not any(c.strip() for c in ctx.captions):
            skipped["image without captions"] += 1
        elif any(not _box_ok(b.xyxy) for b in ctx.boxes):
            skipped["box out of range"] += 1
        elif any(not b.category.strip() for b in ctx.boxes):
            skipped["unknown category"] += 1
        else:
            seen.add(ctx.image_id)
            kept.append(ctx)
    return kept


def _box_ok(xyxy: tuple[float, float, float, float]) -> bool:
    x1, y1, x2, y2 = xyxy
    return 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0

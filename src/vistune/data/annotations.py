"""What the annotations say about one image: its captions and its boxes (paper §3, Table 1).

This is the symbolic context a text-only teacher sees instead of the image: captions
describe the scene; boxes localise objects as `category: [x1, y1, x2, y2]` with coordinates
normalised to 0-1 by the image width and height. The readers of COCO files and image-caption
pairs (vistune.data.formats) make them; datagen, the eval benchmark and grounded alignment
read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

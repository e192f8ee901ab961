"""Which image contexts a text-only teacher can use (paper §3, Table 1).

The contexts themselves (captions and boxes, `ImageContext` and `Box`) live in
vistune.data.annotations, beside the readers that make them.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from vistune.data.annotations import ImageContext


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

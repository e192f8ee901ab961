"""Grounded projector alignment: each image token is first taught the words of what it shows.

Paper §4.2's stage 1 aligns the projector through captions alone: the gradient reaches the
projector only through a frozen LLM that does not yet attend to the image, and at the
demo's scale (a 135M LLM, a few hundred CPU steps) that signal never grows: measured in
docs/LEARNING.md, the image then carries about 0.02 nats per answer token and the tuned
model answers from the question alone. The boxes that §3 gives the text-only teacher can
also tell the projector what each of its tokens should mean. Before the caption steps,
`align_projector` fits the projector so that the token of each grid cell lands on the
LLM's own word embeddings of the object there (its colour, where the annotations give
one, and its category: the mean of the words' input embeddings), and of the word
"background" elsewhere: a cosine loss, plus a norm term that keeps the tokens at the
scale of the target words (the caption loss alone drove them to 8x the text embeddings'
norm, where the LLM ignored them). It touches the projector only and runs in seconds on
the stored features; the LLM then reads image tokens that already look like words, and
both stages go on as the paper's.

    targets = cell_targets(boxes, grid=8, ...)     # (T, D) per image
    losses = align_projector(projector, features, targets, steps=600, lr=1e-3)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vistune.data.annotations import Box
from vistune.errors import DataError
from vistune.train.config import GROUND_CELLS, check_choice

BACKGROUND = "background"
"""The word the cells without an object are aligned to."""


def word_vector(embed: torch.Tensor, tokenizer: object, text: str) -> torch.Tensor:
    """Mean input embedding of the words of `text` as they appear mid-sentence. # (D,)"""
    vectors = []
    for word in text.split():
        ids = tokenizer.encode(" " + word, add_special_tokens=False)
        vectors.append(embed[ids].float().mean(0))
    return torch.stack(vectors).mean(0)


def square_box(
    xyxy: tuple[float, float, float, float], width: int, height: int, aspect: str
) -> tuple[float, float, float, float] | None:
    """A box in 0-1 image coordinates -> 0-1 coordinates of the square the tower sees
    (vistune.data.image: `pad` centres the image in a square, `resize` squashes it,
    `crop` keeps the centre square); None when a crop cuts the box away."""
    x1, y1, x2, y2 = xyxy
    if aspect == "resize" or width == height:
        return xyxy
    side = max(width, height) if aspect == "pad" else min(width, height)
    ox, oy = (side - width) / 2, (side - height) / 2  # negative for a crop
    box = (
        (x1 * width + ox) / side,
        (y1 * height + oy) / side,
        (x2 * width + ox) / side,
        (y2 * height + oy) / side,
    )
    clipped = tuple(min(max(v, 0.0), 1.0) for v in box)
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None
    return clipped  # type: ignore[return-value]


def cell_objects(boxes: Sequence[Box], grid: int, cells_of: str = "cover") -> list[Box | None]:
    """The object each cell of a grid x grid raster (row-major) shows, or None.

    `cover`: a cell shows the smallest box that covers its centre; every box also owns the
    cell its own centre falls in (a small object between cell centres is not lost).
    `centre`: only that cell (the smaller box where two centres share a cell)."""
    check_choice("ground cells", cells_of, GROUND_CELLS)
    cells: list[Box | None] = [None] * (grid * grid)
    by_area = sorted(boxes, key=lambda b: (b.xyxy[2] - b.xyxy[0]) * (b.xyxy[3] - b.xyxy[1]))
    for box in reversed(by_area) if cells_of == "cover" else ():
        x1, y1, x2, y2 = box.xyxy  # larger first, so the smaller one covering a cell wins
        for row in range(grid):
            for col in range(grid):
                cx, cy = (col + 0.5) / grid, (row + 0.5) / grid
                if x1 <= cx < x2 and y1 <= cy < y2:
                    cells[row * grid + col] = box
    for box in reversed(by_area):
        x1, y1, x2, y2 = box.xyxy
        col = min(int((x1 + x2) / 2 * grid), grid - 1)
        row = min(int((y1 + y2) / 2 * grid), grid - 1)
        cells[row * grid + col] = box
    return cells


def third(box: Box) -> str:
    """Which third of the picture the box's centre is in: "top left" ... "center"."""
    x1, y1, x2, y2 = box.xyxy
    col = ("left", "", "right")[min(int((x1 + x2) / 2 * 3), 2)]
    row = ("top", "", "bottom")[min(int((y1 + y2) / 2 * 3), 2)]
    return f"{row} {col}".strip() or "center"


def cell_third(index: int, grid: int) -> str:
    """The third of the picture the centre of row-major cell `index` falls in."""
    row, col = divmod(index, grid)
    return third(Box("", ((col + 0.5) / grid, (row + 0.5) / grid) * 2))


def cell_targets(
    boxes: Sequence[Box],
    grid: int,
    vector: Callable[[str], torch.Tensor],
    where: bool = False,
    cells_of: str = "cover",
) -> torch.Tensor:
    """Target embedding per grid cell: the words of its object ("red star", with `where`
    also the third it is in: "red star top left"), or "background" (with `where`, and the
    cell's own third: "background top left"); `cells_of` as in `cell_objects`.
    # (grid*grid, D)"""
    rows = []
    for index, box in enumerate(cell_objects(boxes, grid, cells_of)):
        if box is None:
            rows.append(vector(f"{BACKGROUND} {cell_third(index, grid)}" if where else BACKGROUND))
        else:
            name = f"{box.color} {box.category}".strip()
            rows.append(vector(f"{name} {third(box)}" if where else name))
    return torch.stack(rows)


def alignment_loss(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - cosine to the target words, plus the squared relative error of the norm.

    tokens, targets: (N, T, D)."""
    cosine = F.cosine_similarity(tokens, targets, dim=-1)  # (N, T)
    ratio = tokens.norm(dim=-1) / targets.norm(dim=-1).clamp_min(1e-6)
    return (1.0 - cosine).mean() + 0.1 * (ratio - 1.0).pow(2).mean()


def align_projector(
    projector: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    lr: float,
    batch: int = 128,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fit `projector` so that features (N, T, Dv) map to targets (N, G, D): AdamW at `lr`
    with a linear decay over `steps` minibatches of `batch` images. Returns the losses.
    The last G of the T tokens are the grid's (a CLS token before them has no target).

    Deterministic by `seed` (the same on every rank, so ranks stay identical without
    talking); the projector's own dtype and device are kept."""
    if features.shape[0] != targets.shape[0] or features.shape[1] < targets.shape[1]:
        raise ValueError(
            f"features {tuple(features.shape)} and targets {tuple(targets.shape)} differ in "
            "images or tokens"
        )
    weight = next(projector.parameters())
    params = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (1.0 - step / steps)
        pick = [rng.randrange(features.shape[0]) for _ in range(min(batch, features.shape[0]))]
        x = features[pick].to(device=weight.device, dtype=weight.dtype)
        y = targets[pick].to(device=weight.device, dtype=torch.float32)
        loss = alignment_loss(projector(x)[:, -y.shape[1] :].float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    optimizer.zero_grad(set_to_none=True)  # no stale gradient into training's first step
    return losses


def ground_projector(
    model: object,
    coco_dir: Path,
    split: str,
    image_paths: Sequence[Path],
    features: Callable[[list[Path]], torch.Tensor],
    steps: int,
    lr: float,
    seed: int = 0,
    where: bool = False,
    say: Callable[[str], None] | None = None,
    cells_of: str = "cover",
) -> dict[str, float]:
    """Align `model.projector` to the boxes of `coco_dir`'s `split` (see the module doc).

    Only the images among `image_paths` (the run's training images, matched by resolved
    path) are used; `features(paths)` gives their stored tower features (N, T, Dv).
    Returns what the run summary records: images, steps, first and last loss."""
    from vistune.data.formats import load_coco

    contexts, _ = load_coco(coco_dir, split)
    wanted = {Path(p).resolve() for p in image_paths}
    chosen = [(c, (coco_dir / c.image).resolve()) for c in contexts]
    chosen = [(c, p) for c, p in chosen if p in wanted and c.boxes]
    if not chosen:
        raise DataError(
            f"{coco_dir}: none of the training images has boxes in "
            f"annotations/instances_{split}.json; ground needs the data's own COCO folder"
        )
    vision, config = model.vision, model.config
    grid = config.image_size // vision.patch_size
    embed = model.llm.get_input_embeddings().weight.detach()
    cache: dict[str, torch.Tensor] = {}

    def vector(text: str) -> torch.Tensor:
        if text not in cache:
            cache[text] = word_vector(embed, model.tokenizer, text).cpu()
        return cache[text]

    targets = []
    for context, _ in chosen:
        boxes = []
        for box in context.boxes:
            xyxy = square_box(box.xyxy, context.width, context.height, config.image_aspect)
            if xyxy is not None:
                boxes.append(Box(box.category, xyxy, box.color))
        targets.append(cell_targets(boxes, grid, vector, where, cells_of))
    target = torch.stack(targets)  # (N, G, D)
    feats = features([p for _, p in chosen]).float()  # (N, T, Dv), T = G (+ CLS first)
    position = getattr(model.projector, "position", None)
    if position is not None:  # mlp2x_gelu_pos: each cell's row starts at its third's words
        with torch.no_grad():
            rows = torch.stack([vector(cell_third(i, grid)) for i in range(grid * grid)])
            position[-grid * grid :] = rows.to(position)
    if say is not None:
        say(f"grounding the projector on the boxes of {len(chosen)} images ({steps} steps)")
    losses = align_projector(model.projector, feats, target, steps, lr, seed=seed)
    return {"images": len(chosen), "steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}

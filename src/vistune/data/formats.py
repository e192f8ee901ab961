"""Dataset file formats: COCO annotations, image-caption pairs and LLaVA JSON (paper §3).

- `load_coco` turns COCO's `annotations/captions_<split>.json` + `instances_<split>.json`
  into one `ImageContext` per image: its captions, and its boxes as
  `category: [x1, y1, x2, y2]` normalised to 0-1 (paper Table 1, top block).
- `load_pairs` reads CC3M/LAION-style image-caption pairs: JSONL (one object a line), a
  JSON array (like LLaVA-CC3M-Pretrain-595K's metadata.json) or TSV (`image<TAB>caption`,
  optional header). Keys: the image under "image" (or "file_name", "file", "url"), the
  caption under "caption" (or "text"), an optional "id".
- `read_llava_rows` reads a LLaVA JSON (or JSONL) file's rows for every reader of one
  (training, the data mix); `read_llava_json` / `write_llava_json` keep LLaVA's released
  files as they are:
  `[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]`, "<image>" once
  in the first human turn; samples without "image" are text-only; unknown keys and the
  type of "id" (str or int) are kept. The default writer output is byte-identical to the
  official compact files (`json.dump` defaults); `indent=` gives pretty files.

Bad rows (empty captions, boxes out of range, unknown categories, images missing on disk
when checked) are skipped and counted by reason in the returned Counter; a file that is
not valid JSON, or a JSONL line that is not, raises `DataError` naming the file and the
position (the one rule of vistune.data.records).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vistune.data.annotations import Box, ImageContext
from vistune.data.conversation import IMAGE_PLACEHOLDER
from vistune.data.records import kind, load_json, read_jsonl
from vistune.errors import DataError
from vistune.files import write_text

ROLES = ("human", "gpt")
IMAGE_KEYS = ("image", "file_name", "file", "url")
CAPTION_KEYS = ("caption", "text")
BOX_TOLERANCE_PX = 1.0
"""COCO boxes may poke out of the image by a fraction of a pixel; within this, clamp."""


# ---------------------------------------------------------------------------- LLaVA JSON


RESPONSE_TYPES = ("conversation", "detail", "complex")
"""The paper's three response types (§3), the suffix of a generated sample's id."""


def response_type(sample_id: str) -> str | None:
    """The response type an id names: `vistune datagen` writes "<image id>_<type>" (the
    official llava_instruct_150k ids name none)."""
    kind_ = str(sample_id).rpartition("_")[2]
    return kind_ if kind_ in RESPONSE_TYPES else None


def dumps_llava(
    samples: list[dict[str, Any]], indent: int | None = None, ensure_ascii: bool = False
) -> str:
    """The text `write_llava_json` writes (no trailing newline, as `json.dump` leaves it)."""
    return json.dumps(samples, indent=indent, ensure_ascii=ensure_ascii)


def write_llava_json(
    samples: list[dict[str, Any]],
    path: str | Path,
    indent: int | None = None,
    ensure_ascii: bool = False,
) -> None:
    """Write samples as a LLaVA JSON file, atomically.

    `indent=None` writes one line with `json.dump`'s default separators, as the official
    llava_instruct_150k.json / blip_laion_cc_sbu_558k.json are; `indent=2` a pretty file.
    `ensure_ascii=True` escapes non-ASCII as `json.dump` does by default.
    """
    write_text(path, dumps_llava(samples, indent=indent, ensure_ascii=ensure_ascii))


def read_llava_rows(path: str | Path) -> list[Any]:
    """The rows of a LLaVA JSON file (a list) or JSONL file (one sample a line), unchecked.

    A file that is not JSON, or a line that is not, raises DataError naming it (see
    vistune.data.records); a row that is JSON but not a sample is the caller's to skip and
    count (training counts it as malformed)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path, required=None, allow_empty=True)
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: a LLaVA JSON file holds a list of samples, got {kind(data)}")
    return data


def read_llava_json(path: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA JSON file (a list of sample objects) unchanged; `.jsonl` is one a line.

    Samples are not validated here: `check_llava_sample` is the rule (training skips and
    counts the rows it refuses, vistune.data.dataset).
    """
    data = read_llava_rows(path)
    for i, sample in enumerate(data):
        if not isinstance(sample, dict):
            raise DataError(f"{path}: sample {i} is {kind(sample)}, not an object")
    return data


class BadSample(DataError):
    """A LLaVA JSON sample that breaks a rule of `check_llava_sample`. `reason` is the kind
    (one of SAMPLE_PROBLEMS, the names training counts its skips by), `problem` what is
    wrong, and the message names the sample: by id, or by position (`#<index>`) where it
    has no id or its text is not valid Unicode (such text cannot be printed)."""

    def __init__(self, reason: str, problem: str, where: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.reason, self.problem = reason, problem


SAMPLE_PROBLEMS = (
    "malformed",
    "empty_conversation",
    "image_without_placeholder",
    "placeholder_without_image",
)


def check_llava_sample(sample: Any, index: int = 0) -> None:
    """Raise BadSample when a LLaVA JSON sample (row `index` of its file) cannot be trained
    on: the one rule for every reader of LLaVA JSON.

    Rules: an object with an "id"; "conversations" a non-empty list of turns alternating
    human, gpt, ... and ending with gpt; every value a non-empty string; with "image" (a
    non-empty string; null is no image) exactly one "<image>", in the first human turn;
    without an image no "<image>" at all; all text valid Unicode (JSON allows lone
    surrogates such as "\\ud83d", which no tokenizer or file name takes).
    """
    if not isinstance(sample, dict):
        raise BadSample("malformed", f"sample is {kind(sample)}, not an object", f"#{index}")
    if "id" not in sample:
        raise BadSample("malformed", "missing id", f"#{index}")
    where = f"sample {sample['id']}"
    if not _unicode(where):
        where = f"#{index}"  # an id that cannot be printed

    def bad(reason: str, problem: str) -> BadSample:
        return BadSample(reason, problem, where)

    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad("malformed" if turns else "empty_conversation", "missing conversations")
    for i, turn in enumerate(turns):
        _check_turn(i, turn, bad)
    if turns[-1]["from"] != "gpt":
        raise bad("malformed", "last turn is not from gpt (unanswered question)")
    image = sample.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise bad("malformed", "image must be a non-empty string")
    count = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in turns)
    if image is not None and count == 0:
        raise bad("image_without_placeholder", "image given but no <image> placeholder")
    if image is None and count:
        raise bad("placeholder_without_image", "<image> placeholder but no image")
    if count > 1:
        raise bad("malformed", f"<image> appears {count} times, expected once")
    if count == 1 and IMAGE_PLACEHOLDER not in turns[0]["value"]:
        raise bad("malformed", "<image> is not in the first human turn")
    for text in (str(sample["id"]), image or "", *(turn["value"] for turn in turns)):
        if not _unicode(text):
            raise BadSample("malformed", f"text that is not valid Unicode ({text!r})", f"#{index}")


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_llava_sample(sample: Any) -> str | None:
    """What is wrong with a LLaVA JSON sample (`check_llava_sample`'s rule), or None."""
    try:
        check_llava_sample(sample)
    except BadSample as err:
        return err.problem
    return None


def _check_turn(i: int, turn: Any, bad: Callable[[str, str], BadSample]) -> None:
    if not isinstance(turn, dict):
        raise bad("malformed", f"turn {i} is {kind(turn)}, not an object")
    role = turn.get("from")
    if not isinstance(role, str) or role not in ROLES:
        raise bad("malformed", f"turn {i}: bad role {role!r} (expected human or gpt)")
    if role != ROLES[i % 2]:
        raise bad("malformed", f"turn {i}: role {role!r} out of order (turns alternate human, gpt)")
    value = turn.get("value")
    if not isinstance(value, str):
        raise bad("malformed", f"turn {i}: value is {kind(value)}, not a string")
    if not value.strip():
        raise bad("empty_conversation", f"turn {i}: empty value")


# ---------------------------------------------------------------------------- COCO


def load_coco(
    coco_dir: str | Path, split: str, check_images: bool = False
) -> tuple[list[ImageContext], Counter]:
    """Per-image contexts from COCO's captions and instances files for `split`.

    Image paths are relative to `coco_dir` (`<split>/<file_name>`, e.g. "train/000001.png"
    or "train2014/COCO_train2014_....jpg"). The instances file is optional (no boxes without
    it). Returns the contexts in the captions file's image order and the skip reasons.
    """
    coco_dir = Path(coco_dir)
    skipped: Counter = Counter()
    captions_path = coco_dir / "annotations" / f"captions_{split}.json"
    captions = _coco_object(captions_path)
    images = _coco_images(captions_path, captions, skipped)
    caps: dict[Any, list[str]] = {image_id: [] for image_id in images}
    for ann in _coco_list(captions_path, captions, "annotations"):
        text = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or not _known(ann.get("image_id"), caps):
            skipped["caption for unknown image"] += 1
        elif not isinstance(text, str) or not text.strip():
            skipped["empty caption"] += 1
        else:
            caps[ann["image_id"]].append(text.strip())
    boxes: dict[Any, list[Box]] = {image_id: [] for image_id in images}
    instances_path = coco_dir / "annotations" / f"instances_{split}.json"
    categories: tuple[str, ...] = ()
    if instances_path.exists():
        categories = _read_boxes(instances_path, images, boxes, skipped)
    contexts = []
    for image_id, record in images.items():
        image = f"{split}/{record['file_name']}"
        if not caps[image_id]:
            skipped["image without captions"] += 1
        elif check_images and not (coco_dir / image).is_file():
            skipped["image missing on disk"] += 1
        else:
            contexts.append(
                ImageContext(
                    image_id=str(image_id),
                    image=image,
                    captions=tuple(caps[image_id]),
                    boxes=tuple(boxes[image_id]),
                    width=int(record["width"]),
                    height=int(record["height"]),
                    categories=categories,
                )
            )
    return contexts, skipped


def _coco_object(path: Path) -> dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: a COCO annotation file holds an object, got {kind(data)}")
    return data


def _coco_list(path: Path, data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise DataError(f"{path}: missing the {key!r} list")
    return value


def _known(key: Any, table: dict | None = None) -> bool:
    """An id that can be looked up (a number or a string; JSON also allows lists and
    objects, which a dict cannot hold), and is in `table` when one is given."""
    if not isinstance(key, int | float | str):
        return False
    return table is None or key in table


def _coco_images(path: Path, data: dict[str, Any], skipped: Counter) -> dict[Any, dict]:
    images: dict[Any, dict] = {}
    for record in _coco_list(path, data, "images"):
        if not isinstance(record, dict) or not isinstance(record.get("id"), int | str):
            skipped["image record without id"] += 1
        elif not isinstance(record.get("file_name"), str) or not record["file_name"]:
            skipped["image record without file_name"] += 1
        elif not _positive_int(record.get("width")) or not _positive_int(record.get("height")):
            skipped["image record without width/height"] += 1
        elif record["id"] in images:
            skipped["duplicate image id"] += 1
        else:
            images[record["id"]] = record
    return images


def _read_boxes(
    path: Path, images: dict[Any, dict], boxes: dict[Any, list[Box]], skipped: Counter
) -> tuple[str, ...]:
    """Fill `boxes` per image id from an instances file; returns its category names.

    An annotation's optional "color" (a vistune extension the built-in scenes write; COCO
    has none) becomes the box's colour."""
    data = _coco_object(path)
    names = {}
    for cat in _coco_list(path, data, "categories"):
        if isinstance(cat, dict) and _known(cat.get("id")) and isinstance(cat.get("name"), str):
            names[cat["id"]] = cat["name"]
    for ann in _coco_list(path, data, "annotations"):
        if not isinstance(ann, dict) or not _known(ann.get("image_id"), images):
            skipped["box for unknown image"] += 1
        elif not _known(ann.get("category_id"), names):
            skipped["unknown category"] += 1
        else:
            record = images[ann["image_id"]]
            xyxy = _normalise_box(ann.get("bbox"), record["width"], record["height"])
            if xyxy is None:
                skipped["box out of range"] += 1
            else:
                color = ann.get("color")
                color = color.strip() if isinstance(color, str) else ""
                boxes[ann["image_id"]].append(Box(names[ann["category_id"]], xyxy, color))
    return tuple(dict.fromkeys(names.values()))


def _normalise_box(bbox: Any, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] in pixels -> (x1, y1, x2, y2) in 0-1; None when out of range."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):  # JSON readers accept NaN, Infinity
        return None
    tol = BOX_TOLERANCE_PX
    if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return None
    x1, y1 = min(max(x, 0.0), width) / width, min(max(y, 0.0), height) / height
    x2, y2 = max(min(x + w, width), 0.0) / width, max(min(y + h, height), 0.0) / height
    if x1 >= x2 or y1 >= y2:  # within the tolerance but wholly outside: nothing left
        return None
    return (x1, y1, x2, y2)


def _positive_int(value: Any) -> bool:
    """A whole number above 0; 640.0 counts (some exporters write sizes as floats)."""
    if isinstance(value, float):
        return value.is_integer() and value > 0
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------- pairs


def load_pairs(
    path: str | Path, check_images: bool = False, image_root: str | Path | None = None
) -> tuple[list[ImageContext], Counter]:
    """Image-caption pairs (CC3M/LAION style) as contexts with one caption and no boxes.

    `.jsonl`: one object a line; `.json`: a list of objects; `.tsv`/`.txt`: `image<TAB>
    caption` rows, the first row skipped when it reads `image<TAB>caption`. Image paths are
    kept as written; with `check_images` they are looked up under `image_root` (default:
    the file's folder). The id is the row's "id" when given, else the image path.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".jsonl":
        rows: Iterable[Any] = read_jsonl(path, required=None, allow_empty=True)
    elif path.suffix == ".json":
        rows = load_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: a pairs JSON file holds a list, got {kind(rows)}")
    elif path.suffix in (".tsv", ".txt"):
        rows = _iter_tsv(path)
    else:
        raise DataError(f"{path}: pairs files are .jsonl, .json or .tsv, got {path.suffix!r}")
    skipped: Counter = Counter()
    contexts = []
    for row in rows:
        context = _pair_context(row, skipped)
        if context is None:
            continue
        if check_images and not (root / context.image).is_file():
            skipped["image missing on disk"] += 1
            continue
        contexts.append(context)
    return contexts, skipped


def _pair_context(row: Any, skipped: Counter) -> ImageContext | None:
    if not isinstance(row, dict):
        skipped["malformed row"] += 1
        return None
    image = next((row[k] for k in IMAGE_KEYS if isinstance(row.get(k), str)), "")
    caption = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str)), "")
    if not image.strip():
        skipped["missing image"] += 1
        return None
    if not caption.strip():
        skipped["empty caption"] += 1
        return None
    image_id = row.get("id")
    if image_id is None or image_id == "":  # null or empty: no id given
        image_id = image.strip()
    return ImageContext(image_id=str(image_id), image=image.strip(), captions=(caption.strip(),))


def _iter_tsv(path: Path) -> Iterable[dict[str, str] | None]:
    try:  # utf-8-sig: a BOM (Windows tools write one) is not part of the header
        f = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    with f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            for i, fields in enumerate(reader):
                if not fields or fields == [""]:
                    continue
                if i == 0 and [v.strip().lower() for v in fields[:2]] == ["image", "caption"]:
                    continue
                yield {"image": fields[0], "caption": fields[1]} if len(fields) == 2 else None
        except UnicodeDecodeError as err:  # decoded a block at a time: no exact line
            raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
        except csv.Error as err:  # e.g. a field over csv's size limit (a binary file)
            raise DataError(f"{path}: line {reader.line_num}: {err}") from None

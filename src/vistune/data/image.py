"""Image loading and preprocessing for the vision tower (paper §4.1; LLaVA's image pipeline).

`load_image` turns any file a user may point at into an RGB PIL image, or one clear
ImageError naming the path (`decode_image` does the same for bytes, e.g. an API request's
base64 payload):

- EXIF orientation is applied (as `ImageOps.exif_transpose` does, without its rewrite of
  the EXIF bytes, which raises on malformed tags), so phone photos stand upright.
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white: the
  transparent pixels of diagrams and icons (ScienceQA) are paper-coloured by intent, and
  white keeps dark line art readable.
- Grey (L, 1), palette (P), CMYK, YCbCr convert to RGB; 16- and 32-bit integer grey (I;16,
  I) is scaled from 0..65535 to 0..255; float grey (F) is taken as 0..1 if its maximum is at
  most 1, else as 0..255, and clipped.
- PostScript (EPS) is refused before it is decoded: PIL renders it by running Ghostscript
  on the file, an interpreter no data set row or chat image should reach.
- Decompression bombs: the pixel count is read from the header (PIL opens lazily) and an
  image over `max_pixels` is refused before any pixel is decoded. PIL's own global limit
  (its DecompressionBombWarning/Error) is also turned into ImageError.

`ImageProcessor` follows LLaVA: `pad` = `expand2square` with the mean colour
(`tuple(int(x * 255) for x in mean)`, image centred) then a bicubic resize to size x size;
`resize` squashes straight to size x size. Then scale to [0, 1] and normalise with the
tower's mean/std -> (N, 3, S, S) float32.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from vistune.config import AT_LEAST_1, IMAGE_ASPECTS
from vistune.errors import ImageError, ImageTooLargeError, ModelDirError
from vistune.files import read_json_if_present

MAX_PIXELS = 50_000_000
"""Largest image (width x height) load_image accepts by default: a 7000 x 7000 photo fits."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALISATION_BY_MODEL_TYPE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "siglip_vision_model": (SIGLIP_MEAN, SIGLIP_STD),
}
"""Mean/std by config.json model_type when a directory has no preprocessor_config.json;
any other model type (DINOv2, ViT, ...) gets ImageNet's."""

_TRANSPOSE_BY_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF Orientation -> the transpose that makes the image upright (ImageOps.exif_transpose)."""
_REFUSED_FORMATS = ("EPS",)
"""Formats PIL decodes with an external program (Ghostscript), never run on input files."""
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit RGB (see the module docstring)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = values * 255.0 if values.size and values.max() <= 1.0 else values
    else:
        values = values / 257.0  # 65535 -> 255
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """A copy of `image` turned as its EXIF Orientation says."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    method = _TRANSPOSE_BY_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image.copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (transparency on white, wide grey scaled to 8 bits)."""
    if image.mode == "RGB":
        return image
    if image.mode in _TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        return _wide_to_rgb(image)
    return image.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path` as upright RGB; ImageError (naming the path) if it cannot be."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: image file not found")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    return _open(path, str(path), max_pixels)


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded image bytes (e.g. an API request's base64 payload) as upright RGB, with the
    same checks as `load_image` (the pixel count read from the header before decoding);
    ImageError naming `name` if it cannot be."""
    return _open(io.BytesIO(data), name, max_pixels)


def _open(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """Open, check (format, header size), decode and convert one image; ImageError naming
    `name` on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.format in _REFUSED_FORMATS:
                    raise ImageError(f"{name}: {image.format} (PostScript) images are not read")
                width, height = image.size  # from the header; nothing decoded yet
                if width * height > max_pixels:
                    raise ImageTooLargeError(
                        f"{name}: image is {width}x{height} = {width * height} pixels, "
                        f"over the limit of {max_pixels}"
                    )
                image.load()
                upright = _upright(image)
                try:
                    return to_rgb(upright)
                except ValueError:
                    raise ImageError(f"{name}: unsupported colour mode {upright.mode}") from None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{name}: refused as a decompression bomb ({err})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format PIL cannot read)") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `background`, the image centred (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    if side * side > MAX_PIXELS:  # a thin strip under MAX_PIXELS whose square is not
        scale = math.isqrt(MAX_PIXELS) / side
        small = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(small, Image.Resampling.BICUBIC)
        (width, height), side = small, max(small)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _check_triple(name: str, value: tuple[float, ...]) -> None:
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")


def _centre_square(image: Image.Image, size: int) -> Image.Image:
    """The shorter side scaled to `size` (bicubic), then the centre size x size square,
    with transformers' roundings (int() of the longer side, floor of the offsets)."""
    width, height = image.size
    longer = int(size * max(width, height) / min(width, height))
    if size * longer > MAX_PIXELS:  # a thin strip: cut its centre square before scaling
        short = min(width, height)
        left, top = (width - short) // 2, (height - short) // 2
        square = image.crop((left, top, left + short, top + short))
        return square.resize((size, size), Image.Resampling.BICUBIC)
    scaled = (size, longer) if width <= height else (longer, size)
    if scaled != image.size:
        image = image.resize(scaled, Image.Resampling.BICUBIC)
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class ImageProcessor:
    """PIL images -> normalised pixel tensors (N, 3, size, size) for the vision tower."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    aspect: str = "pad"
    """`pad`: expand to a square with the mean colour, then resize; `resize`: squash;
    `crop`: the shorter side to `size`, then the centre square (CLIPImageProcessor's
    resize + center crop)."""

    def __post_init__(self) -> None:
        if self.aspect not in IMAGE_ASPECTS:
            raise ValueError(f"unknown aspect {self.aspect!r}; valid: {', '.join(IMAGE_ASPECTS)}")
        AT_LEAST_1.check("size", self.size)
        _check_triple("mean", self.mean)
        _check_triple("std", self.std)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @property
    def fill(self) -> tuple[int, int, int]:
        """The pad colour: the mean in 0..255, as LLaVA computes it."""
        return tuple(int(x * 255) for x in self.mean)

    def prepare(self, image: Image.Image) -> Image.Image:
        """Padded (or not) and resized RGB image, size x size."""
        image = to_rgb(image)
        if self.aspect == "pad":
            image = expand2square(image, self.fill)
        elif self.aspect == "crop":
            image = _centre_square(image, self.size)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return image

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)  # (N, 3, S, S)
        for i, image in enumerate(images):
            pixels = np.asarray(self.prepare(image), dtype=np.float32) / 255.0  # (S, S, 3)
            out[i] = ((pixels - mean) / std).transpose(2, 0, 1)
        return torch.from_numpy(out)

    @classmethod
    def from_vision_dir(cls, path: str | Path, size: int, aspect: str = "pad") -> ImageProcessor:
        """Mean/std from the directory's preprocessor_config.json, else by its config.json
        model_type (clip -> OpenAI CLIP, siglip -> 0.5, anything else -> ImageNet)."""
        path = Path(path)
        pre = read_json_if_present(path / "preprocessor_config.json", "vision preprocessor config")
        if pre is not None and "image_mean" in pre and "image_std" in pre:
            mean, std = pre["image_mean"], pre["image_std"]
            if not (isinstance(mean, list) and isinstance(std, list)):
                raise ModelDirError(
                    f"{path / 'preprocessor_config.json'}: image_mean/image_std must be lists"
                )
            return cls(size, tuple(mean), tuple(std), aspect)
        config = read_json_if_present(path / "config.json", "vision config")
        if config is None and pre is None:
            raise ModelDirError(f"{path}: no config.json or preprocessor_config.json")
        model_type = (config or {}).get("model_type", "")
        mean, std = NORMALISATION_BY_MODEL_TYPE.get(model_type, (IMAGENET_MEAN, IMAGENET_STD))
        return cls(size, mean, std, aspect)

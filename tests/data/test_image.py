"""Image loading (EXIF, modes, bombs, bad files) and the pad/resize processor (LLaVA)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vistune.data.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageProcessor,
    expand2square,
    load_image,
)
from vistune.errors import ImageError, ModelDirError


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide, 20 high; left half red, right half blue. Orientation 6 = rotate 90° clockwise
    # on display, so the upright image is 20 wide, 40 high with red on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    top, bottom = np.asarray(image)[5, 10], np.asarray(image)[35, 10]
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_malformed_exif_still_turns_upright(tmp_path):
    # A phone photo whose EXIF holds a tag of the wrong type (MaxSampleValue, a SHORT, stored
    # as text): PIL reads it, but rewriting that EXIF (as ImageOps.exif_transpose does)
    # raises struct.error, which escaped load_image as a traceback.
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x0110] = "Model X"  # ASCII tag, renumbered below to MaxSampleValue (0x0119)
    raw = exif.tobytes()
    bad = raw.replace(b"\x01\x10\x00\x02", b"\x01\x19\x00\x02")
    assert bad != raw
    path = tmp_path / "odd_exif.jpg"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(path, exif=bad)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 40)


def _save(tmp_path, image: Image.Image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red
    pixels[0, 1] = (0, 0, 0, 0)  # fully transparent black
    pixels[0, 2] = (0, 0, 0, 128)  # half-transparent black
    out = np.asarray(load_image(_save(tmp_path, Image.fromarray(pixels, "RGBA"), "a.png")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_grey_palette_cmyk_and_16_bit(tmp_path):
    grey = load_image(_save(tmp_path, Image.new("L", (3, 2), 77), "g.png"))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]

    pal = Image.new("P", (2, 2))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    out = np.asarray(load_image(_save(tmp_path, pal, "p.png")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [200, 100, 50]

    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    out = np.asarray(load_image(_save(tmp_path, pal_t, "pt.png", transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 100, 50]

    cmyk = load_image(_save(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "c.jpg"))
    r, g, b = np.asarray(cmyk)[0, 0].tolist()
    assert r > 240 and g < 15 and b < 15

    wide = np.array([[0, 65535], [32896, 1000]], dtype=np.uint16)
    out = np.asarray(load_image(_save(tmp_path, Image.fromarray(wide), "w16.png")))
    assert out[:, :, 0].tolist() == [[0, 255], [128, 4]]


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (300, 200)), "big.png")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match=r"big\.png.*300x200 = 60000 pixels.*limit of 59999"):
        load_image(path, max_pixels=59_999)
    assert decoded == []


def test_pil_bomb_error_becomes_image_error(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.new("RGB", (100, 100)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warn above 1000, error above 2000
    with pytest.raises(ImageError, match="bomb.png: refused as a decompression bomb"):
        load_image(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.png", b"just some text, not an image\n", "not an image file"),
        ("broken.png", None, "corrupt or truncated"),
        ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt|not an image"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:  # a real PNG cut in half
        good = _save(tmp_path, Image.effect_noise((64, 64), 50).convert("RGB"), "good.png")
        content = good.read_bytes()[: good.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"{name}: ({message})"):
        load_image(path)


def test_postscript_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    # PIL renders EPS by running Ghostscript (an interpreter) on the file: a data set row or
    # a chat image named .jpg can hold PostScript, so it is refused before anything runs.
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(1))
    path = tmp_path / "photo.jpg"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    with pytest.raises(ImageError, match=r"photo\.jpg: .*EPS.*not read"):
        load_image(path)
    assert ran == []


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: image file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)


def test_pad_centres_with_mean_colour():
    mean = (0.5, 0.25, 1.0)
    image = Image.new("RGB", (6, 2), (255, 255, 255))
    square = expand2square(image, ImageProcessor(6, mean, (1, 1, 1)).fill)
    arr = np.asarray(square)
    assert square.size == (6, 6)
    assert arr[0, 0].tolist() == [127, 63, 255] and arr[5, 5].tolist() == [127, 63, 255]
    assert (arr[2:4] == 255).all() and (arr[1] != 255).any() and (arr[4] != 255).any()
    tall = np.asarray(expand2square(Image.new("RGB", (1, 3), (0, 0, 0)), (9, 9, 9)))
    assert tall[:, 1].tolist() == [[0, 0, 0]] * 3 and tall[:, 0].tolist() == [[9, 9, 9]] * 3


def test_processor_pad_values_and_shape():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    proc = ImageProcessor(4, mean, std, aspect="pad")
    image = Image.new("RGB", (4, 2), (255, 0, 127))  # 2 pad rows above, 2 below... at size 4
    out = proc([image, Image.new("RGB", (4, 4), (0, 0, 0))])
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.float32
    fill = (127 / 255 - 0.5) / torch.tensor(std)  # mean colour (127) normalised
    torch.testing.assert_close(out[0, :, 0, 0], fill)
    torch.testing.assert_close(out[0, :, 3, 3], fill)
    middle = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (127 / 255 - 0.5) / 1.0])
    torch.testing.assert_close(out[0, :, 1:3, :].mean(dim=(1, 2)), middle, atol=2e-2, rtol=0)
    torch.testing.assert_close(out[1], (0 - 0.5) / torch.tensor(std).view(3, 1, 1).expand(3, 4, 4))


def test_processor_resize_squashes_without_padding():
    proc = ImageProcessor(8, IMAGENET_MEAN, IMAGENET_STD, aspect="resize")
    out = proc([Image.new("RGB", (32, 4), (255, 255, 255))])
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0].amin(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0].amax(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_processor_matches_manual_bicubic_and_accepts_rgba():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (10, 7, 3), dtype=np.uint8))
    proc = ImageProcessor(5, CLIP_MEAN, CLIP_STD, aspect="pad")
    ref = expand2square(image, (122, 116, 104)).resize((5, 5), Image.Resampling.BICUBIC)
    ref = (np.asarray(ref, dtype=np.float32) / 255 - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(proc([image])[0], torch.from_numpy(ref.transpose(2, 0, 1)).float())
    assert proc([image.convert("RGBA")]).shape == (1, 3, 5, 5)


def test_processor_validates():
    with pytest.raises(ValueError, match="valid: pad, resize, crop"):
        ImageProcessor(4, IMAGENET_MEAN, IMAGENET_STD, aspect="squash")
    with pytest.raises(ValueError, match="std must be positive"):
        ImageProcessor(4, IMAGENET_MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 values"):
        ImageProcessor(4, (0.5, 0.5), IMAGENET_STD)


@pytest.mark.parametrize(
    ("files", "mean", "std"),
    [
        (
            {"preprocessor_config.json": {"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]}},
            (0.1, 0.2, 0.3),
            (1.0, 2.0, 3.0),
        ),
        ({"config.json": {"model_type": "clip_vision_model"}}, CLIP_MEAN, CLIP_STD),
        ({"config.json": {"model_type": "siglip"}}, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ({"config.json": {"model_type": "dinov2"}}, IMAGENET_MEAN, IMAGENET_STD),
    ],
)
def test_from_vision_dir(tmp_path, files, mean, std):
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    proc = ImageProcessor.from_vision_dir(tmp_path, size=14, aspect="resize")
    assert (proc.size, proc.aspect, proc.mean, proc.std) == (14, "resize", mean, std)


def test_from_vision_dir_errors(tmp_path):
    with pytest.raises(ModelDirError, match="no config.json"):
        ImageProcessor.from_vision_dir(tmp_path, size=14)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match=r"config\.json: not valid JSON \(vision config\)"):
        ImageProcessor.from_vision_dir(tmp_path, size=14)


@pytest.mark.parametrize(
    ("aspect", "shape"),
    [("pad", (50, 37)), ("resize", (50, 37)), ("crop", (50, 37)), ("crop", (37, 101)),
     ("crop", (32, 45)), ("crop", (20, 20))],
)  # fmt: skip
def test_matches_transformers_clip_processor(aspect, shape):
    """Equal to HF's PIL CLIP processor on LLaVA's input (the padded square, or a squash),
    and, for `crop`, to its own resize + centre crop (the paper's preprocessing); tall, wide,
    already-sized and upscaled images."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    ours = ImageProcessor(32, CLIP_MEAN, CLIP_STD, aspect)([image])
    if aspect == "crop":
        hf = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        ref = hf(image, return_tensors="pt")["pixel_values"]
    elif aspect == "pad":
        hf = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
        ref = hf(expand2square(image, (122, 116, 104)), return_tensors="pt")["pixel_values"]
    else:
        hf = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
        ref = hf(image, return_tensors="pt")["pixel_values"]
    assert ref.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("aspect", "height", "limit"), [("pad", 40, 40_000), ("crop", 2, 400)])
def test_a_thin_strip_is_not_blown_up_to_a_huge_square(aspect, height, limit, monkeypatch):
    """A 1,000,000 x 1 image is under MAX_PIXELS, but its padded square (pad) or its
    shorter side scaled up (crop) was 10^12 pixels: a MemoryError. Here MAX_PIXELS is cut
    so that a 300-pixel-wide strip takes the new path; the result matches the old one."""
    import vistune.data.image as image_module

    ramp = np.linspace(0, 255, 300)[None, :, None] * np.array([1.0, 0.5, 0.25])  # smooth
    strip = Image.fromarray(np.repeat(ramp, height, axis=0).astype(np.uint8))
    proc = ImageProcessor(8, CLIP_MEAN, CLIP_STD, aspect=aspect)
    direct = proc([strip])
    monkeypatch.setattr(image_module, "MAX_PIXELS", limit)
    sizes = []
    real_new = Image.new

    def recording_new(mode, size, *args, **kwargs):
        sizes.append(size)
        return real_new(mode, size, *args, **kwargs)

    real_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(image_module.Image, "new", recording_new)
    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    bounded = proc([strip])
    assert bounded.shape == direct.shape == (1, 3, 8, 8)
    assert sizes and all(w * h <= limit for w, h in sizes)  # no canvas past the limit
    torch.testing.assert_close(bounded, direct, atol=0.05, rtol=0)  # up to resampling

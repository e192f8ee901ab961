"""COCO / pairs / LLaVA JSON readers and writers (vistune.data.formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vistune.data.formats import (
    load_coco,
    load_pairs,
    read_llava_json,
    read_llava_rows,
    validate_llava_sample,
    write_llava_json,
)
from vistune.errors import DataError

# Entries in the exact shape (and byte layout: one line, json.dump defaults) of the official
# llava_instruct_150k.json and blip_laion_cc_sbu_558k.json.
OFFICIAL_COMPACT = (
    r'[{"id": "000000033471", "image": "000000033471.jpg", "conversations": [{"from": "human", '
    r'"value": "<image>\nWhat are the colors of the bus in the image?"}, {"from": "gpt", '
    r'"value": "The bus in the image is white and red."}, {"from": "human", "value": "What '
    r'feature can be seen on the back of the bus?"}, {"from": "gpt", "value": "The back of '
    r'the bus features an advertisement."}]}, {"id": "004539375", "image": '
    r'"00453/004539375.jpg", "conversations": [{"from": "human", "value": "Render a clear and '
    r'concise summary of the photo.\n<image>"}, {"from": "gpt", "value": "select luxury '
    r'furniture 3 - inch gel memory foam mattress topper"}]}]'
)
# Pretty (indent=2) layout, a text-only sample with an int id, an extra key, non-ASCII text.
OFFICIAL_PRETTY = """[
  {
    "id": 7,
    "conversations": [
      {
        "from": "human",
        "value": "Write a haiku about caf\u00e9s."
      },
      {
        "from": "gpt",
        "value": "Caf\u00e9 au lait \u2014 steam"
      }
    ],
    "model": "sharegpt"
  }
]"""


def test_official_compact_round_trip_is_byte_exact(tmp_path: Path) -> None:
    src = tmp_path / "llava_instruct.json"
    src.write_bytes(OFFICIAL_COMPACT.encode())
    samples = read_llava_json(src)
    assert [s["id"] for s in samples] == ["000000033471", "004539375"]
    assert samples[1]["conversations"][0]["value"].endswith("photo.\n<image>")
    assert all(validate_llava_sample(s) is None for s in samples)
    out = tmp_path / "out.json"
    write_llava_json(samples, out)
    assert out.read_bytes() == src.read_bytes()


def test_pretty_round_trip_keeps_int_ids_extra_keys_and_unicode(tmp_path: Path) -> None:
    src = tmp_path / "pretty.json"
    src.write_text(OFFICIAL_PRETTY, encoding="utf-8")
    samples = read_llava_json(src)
    assert samples[0]["id"] == 7 and samples[0]["model"] == "sharegpt"
    assert validate_llava_sample(samples[0]) is None  # text-only: no image, no placeholder
    out = tmp_path / "out.json"
    write_llava_json(samples, out, indent=2)
    assert out.read_bytes() == src.read_bytes()
    assert "café" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    write_llava_json(samples, out, indent=2, ensure_ascii=True)
    assert "caf\\u00e9" in out.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "pretty.json"]  # no tmp


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n  "conversations": [}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 2 column 21"):
        read_llava_json(bad)
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DataError, match=r"obj\.json: .*list of samples"):
        read_llava_json(notlist)


def test_a_byte_order_mark_is_not_part_of_the_json(tmp_path: Path) -> None:
    """Windows editors save UTF-8 with a BOM: a LLaVA JSON, COCO annotations or a pairs
    JSONL file so saved reads as without it (it used to be "Unexpected UTF-8 BOM")."""
    row = _sample()
    data = tmp_path / "bom.json"
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    assert [s["id"] for s in read_llava_json(data)] == ["1"]
    pairs = tmp_path / "pairs.jsonl"
    lines = [{"image": "a.jpg", "caption": "a dog"}, {"image": "b.jpg", "caption": "a cat"}]
    pairs.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in lines).encode())
    contexts, skipped = load_pairs(pairs)
    assert [c.captions for c in contexts] == [("a dog",), ("a cat",)] and not skipped


def _sample(**kw):
    sample = {
        "id": "1",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A star."},
        ],
    }
    sample.update(kw)
    return sample


def _turns(*pairs):
    return [{"from": r, "value": v} for r, v in pairs]


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (_sample(), None),
        (_sample(conversations=[]), "missing conversations"),
        ({"id": 1, "image": "a.jpg"}, "missing conversations"),
        ({"conversations": _turns(("human", "hi"), ("gpt", "yo"))}, "missing id"),
        (_sample(conversations=_turns(("human", "<image>\nQ"), ("gpt", " "))), "turn 1: empty value"),
        (_sample(conversations=_turns(("user", "<image>\nQ"), ("gpt", "A"))), "turn 0: bad role 'user'"),
        (_sample(conversations=_turns(("gpt", "<image>\nQ"), ("human", "A"))), "turn 0: role 'gpt' out of order"),
        (_sample(conversations=_turns(("human", "Q"), ("gpt", "A"))), "image given but no <image> placeholder"),
        ({"id": 2, "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A"))}, "<image> placeholder but no image"),
        (_sample(conversations=_turns(("human", "<image>\n<image>Q"), ("gpt", "A"))), "<image> appears 2 times"),
        (
            _sample(conversations=_turns(("human", "Q"), ("gpt", "A"), ("human", "<image>"), ("gpt", "B"))),
            "<image> is not in the first human turn",
        ),
        (_sample(conversations=_turns(("human", "<image>\nQ"))), "last turn is not from gpt"),
        (_sample(image=""), "image must be a non-empty string"),
        ("text", "sample is a string"),
    ],
)  # fmt: skip
def test_validate_llava_sample(sample, reason: str | None) -> None:
    got = validate_llava_sample(sample)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason), got


def _write_coco(root: Path) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    for name in ("a.png", "b.png"):
        (root / "val" / name).write_bytes(b"png")
    images = [
        {"id": 1, "file_name": "a.png", "width": 200, "height": 100},
        {"id": 2, "file_name": "b.png", "width": 50, "height": 50},
        {"id": 3, "file_name": "gone.png", "width": 50, "height": 50},
        {"id": 4, "file_name": "nocap.png", "width": 50, "height": 50},
        {"id": 5, "file_name": "nosize.png"},
    ]
    captions = [
        {"id": 1, "image_id": 1, "caption": " A red star. "},
        {"id": 2, "image_id": 1, "caption": "A star on gray."},
        {"id": 3, "image_id": 2, "caption": "A blue circle."},
        {"id": 4, "image_id": 2, "caption": "   "},
        {"id": 5, "image_id": 3, "caption": "Gone."},
        {"id": 6, "image_id": 99, "caption": "Orphan."},
        {"id": 7, "image_id": [1], "caption": "An id JSON allows but no table holds."},
    ]
    boxes = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 80, 50]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [40, 40, 20, 5]},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [0, 0, 50.4, 50]},
        {"id": 5, "image_id": 2, "category_id": 2, "bbox": [5, 5, 0, 4]},
        {"id": 6, "image_id": {"id": 1}, "category_id": [2], "bbox": [0, 0, 1, 1]},
    ]
    cats = [{"id": 1, "name": "star", "supercategory": "symbol"}, {"id": 2, "name": "circle"}]
    ann = root / "annotations"
    (ann / "captions_val.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (ann / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": boxes, "categories": cats})
    )


def test_load_coco_normalises_boxes_and_counts_skips(tmp_path: Path) -> None:
    _write_coco(tmp_path)
    contexts, skipped = load_coco(tmp_path, "val", check_images=True)
    assert [c.image_id for c in contexts] == ["1", "2"]
    a, b = contexts
    assert a.image == "val/a.png" and (a.width, a.height) == (200, 100)
    assert a.captions == ("A red star.", "A star on gray.")
    assert [(x.category, x.xyxy) for x in a.boxes] == [("star", (0.1, 0.1, 0.5, 0.6))]
    assert b.captions == ("A blue circle.",)
    assert [x.xyxy for x in b.boxes] == [(0.0, 0.0, 1.0, 1.0)]  # 0.4 px over: clamped
    assert a.render().endswith("\n\nstar: [0.100, 0.100, 0.500, 0.600]")
    assert skipped == {
        "image record without width/height": 1,
        "empty caption": 1,
        "caption for unknown image": 2,
        "box for unknown image": 1,
        "unknown category": 1,
        "box out of range": 2,
        "image without captions": 1,
        "image missing on disk": 1,
    }
    contexts, skipped = load_coco(tmp_path, "val")  # not checking the disk keeps image 3
    assert [c.image_id for c in contexts] == ["1", "2", "3"]


def test_load_coco_malformed_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DataError, match="captions_train.json: file not found"):
        load_coco(tmp_path, "train")
    (tmp_path / "annotations" / "captions_train.json").write_text('{"images": [1, }')
    with pytest.raises(DataError, match="captions_train.json: malformed JSON at line 1 column 16"):
        load_coco(tmp_path, "train")
    (tmp_path / "annotations" / "captions_train.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="missing the 'annotations' list"):
        load_coco(tmp_path, "train")


def test_load_pairs_jsonl_json_tsv(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(b"x")
    jsonl = tmp_path / "pairs.jsonl"
    rows = [
        {"image": "img/1.jpg", "caption": "a dog"},
        {"url": "img/2.jpg", "text": "a cat", "id": 42},
        {"image": "img/3.jpg", "caption": ""},
        {"caption": "no image"},
        [1, 2],
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    contexts, skipped = load_pairs(jsonl)
    assert [(c.image_id, c.image, c.captions) for c in contexts] == [
        ("img/1.jpg", "img/1.jpg", ("a dog",)),
        ("42", "img/2.jpg", ("a cat",)),
    ]
    assert skipped == {"empty caption": 1, "missing image": 1, "malformed row": 1}
    contexts, skipped = load_pairs(jsonl, check_images=True)
    assert [c.image for c in contexts] == ["img/1.jpg"] and skipped["image missing on disk"] == 1

    meta = tmp_path / "metadata.json"  # LLaVA-CC3M-Pretrain-595K metadata.json shape
    meta.write_text(json.dumps([{"id": "GCC_1", "image": "GCC_1.jpg", "caption": "olive oil"}]))
    contexts, _ = load_pairs(meta)
    assert contexts[0].image_id == "GCC_1" and contexts[0].captions == ("olive oil",)

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('image\tcaption\nimg/1.jpg\ta dog\nimg/2.jpg\nimg/3.jpg\ta "quoted" cat\n')
    contexts, skipped = load_pairs(tsv)
    assert [c.captions[0] for c in contexts] == ["a dog", 'a "quoted" cat']
    assert skipped == {"malformed row": 1}


def test_load_pairs_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a", "caption": "b"}\n{"image": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: malformed JSON at line 2"):
        load_pairs(bad)
    with pytest.raises(DataError, match="pairs files are"):
        load_pairs(tmp_path / "pairs.csv")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"image": "a", "caption": "b"}\n{"image": "caf\xe9", "caption": "c"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl: line 2 is not UTF-8"):
        load_pairs(latin)


def test_tsv_pairs_not_utf8_oversized_or_with_a_bom(tmp_path: Path) -> None:
    latin = tmp_path / "latin.tsv"
    latin.write_bytes(b"a.jpg\ta dog\nb.jpg\tcaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.tsv: not UTF-8 text"):
        load_pairs(latin)
    huge = tmp_path / "huge.tsv"  # e.g. a binary file named .tsv: csv's field size limit
    huge.write_text("a.jpg\t" + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"huge\.tsv: line 1: field larger than field limit"):
        load_pairs(huge)
    bom = tmp_path / "bom.tsv"  # as Windows tools save UTF-8: the header is still a header
    bom.write_bytes("image\tcaption\na.jpg\ta dog\n".encode("utf-8-sig"))
    contexts, skipped = load_pairs(bom)
    assert [(c.image, c.captions) for c in contexts] == [("a.jpg", ("a dog",))] and not skipped


def test_pairs_with_a_null_id_fall_back_to_the_image(tmp_path: Path) -> None:
    jsonl = tmp_path / "pairs.jsonl"
    rows = [
        {"id": None, "image": "1.jpg", "caption": "a dog"},
        {"id": None, "image": "2.jpg", "caption": "a cat"},
        {"id": "", "image": "3.jpg", "caption": "a cow"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    contexts, _ = load_pairs(jsonl)
    assert [c.image_id for c in contexts] == ["1.jpg", "2.jpg", "3.jpg"]


def test_unreadable_paths_and_deep_nesting_are_data_errors(tmp_path: Path) -> None:
    folder = tmp_path / "data.json"
    folder.mkdir()
    with pytest.raises(DataError, match=r"data\.json: cannot read"):
        read_llava_json(folder)
    folder_jsonl = tmp_path / "data.jsonl"
    folder_jsonl.mkdir()
    with pytest.raises(DataError, match=r"data\.jsonl: cannot read"):
        read_llava_json(folder_jsonl)
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    with pytest.raises(DataError, match=r"deep\.json: .*nested too deeply"):
        read_llava_json(tmp_path / "deep.json")
    (tmp_path / "deep.jsonl").write_text(deep + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl: line 1 .*nested too deeply"):
        read_llava_json(tmp_path / "deep.jsonl")


def test_coco_boxes_nan_or_outside_within_tolerance_are_dropped_not_the_image(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}]
    captions = [{"id": 1, "image_id": 1, "caption": "A star."}]
    boxes = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 0, 5, 5]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, float("nan"), 5]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [100.2, 0, 0.5, 5]},  # right of it
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, -0.9, 5, 0.6]},  # above it
    ]
    cats = [{"id": 1, "name": "star"}]
    ann = tmp_path / "annotations"
    (ann / "captions_val.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (ann / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": boxes, "categories": cats})
    )
    contexts, skipped = load_coco(tmp_path, "val")
    assert [(b.category, b.xyxy) for b in contexts[0].boxes] == [("star", (0.1, 0.2, 0.3, 0.6))]
    assert skipped == {"box out of range": 4}


def test_load_coco_takes_whole_float_sizes(tmp_path: Path) -> None:
    """Some exporters write sizes as 640.0; a size that is not whole is still refused."""
    (tmp_path / "annotations").mkdir()
    images = [{"id": 1, "file_name": "a.png", "width": 200.0, "height": 100.0},
              {"id": 2, "file_name": "b.png", "width": 200.5, "height": 100}]  # fmt: skip
    captions = [{"id": 1, "image_id": 1, "caption": "A star."},
                {"id": 2, "image_id": 2, "caption": "A circle."}]  # fmt: skip
    (tmp_path / "annotations" / "captions_val.json").write_text(
        json.dumps({"images": images, "annotations": captions})
    )
    contexts, skipped = load_coco(tmp_path, "val")
    assert [(c.image_id, c.width, c.height) for c in contexts] == [("1", 200, 100)]
    assert skipped["image record without width/height"] == 1


def test_a_jsonl_file_with_a_bom_keeps_its_first_row(tmp_path):
    """Editors on Windows start UTF-8 files with a BOM: the first row was counted malformed
    (LLaVA JSON files already took it)."""
    rows = [{"id": "a", "conversations": []}, {"id": "b", "conversations": []}]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    assert read_llava_rows(path) == rows

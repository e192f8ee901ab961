"""LLaVA JSON -> samples: skips by reason, truncation that never cuts the image, grouping."""

from __future__ import annotations

import pytest

from tests.train.conftest import write_dataset
from vistune.data.conversation import IGNORE_INDEX, IMAGE_TOKEN_ID
from vistune.data.dataset import (
    SkipError,
    build_samples,
    global_batches,
    micro_batches,
    padding_share,
    truncate,
)
from vistune.data.formats import validate_llava_sample
from vistune.errors import DataError

BAD_ROWS = [
    {
        "id": "no-file",
        "image": "missing.png",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}],
    },
    {"id": "empty", "image": "img000.png", "conversations": []},
    {
        "id": "no-placeholder",
        "image": "img000.png",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}],
    },
    {
        "id": "no-image",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "x"}],
    },
    {
        "id": "long",
        "image": "img000.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + "word " * 400},
            {"from": "gpt", "value": "x"},
        ],
    },
    "not an object",
]


def test_bad_rows_are_skipped_and_counted(tiny_model, tmp_path):
    data = write_dataset(tmp_path, n=6, extra_rows=BAD_ROWS)
    import json

    rows = json.loads(data.read_text())
    samples, skipped = build_samples(
        rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, image_tokens=4, max_length=128
    )
    assert len(samples) == 6
    assert dict(skipped) == {
        "missing_image": 1,
        "empty_conversation": 1,
        "image_without_placeholder": 1,
        "placeholder_without_image": 1,
        "too_long": 1,
        "malformed": 1,
    }
    for s in samples:
        assert s.input_ids.count(IMAGE_TOKEN_ID) == 1
        assert s.length == len(s.input_ids) + 3
        assert s.targets == sum(label != IGNORE_INDEX for label in s.labels[1:]) > 0
    with pytest.raises(DataError, match="sample no-file"):
        build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128, strict=True)


def _turns(question: str, answer: str, speaker: object = "human") -> list[dict]:
    return [{"from": speaker, "value": question}, {"from": "gpt", "value": answer}]


def test_rows_no_tokenizer_takes_are_skipped_not_a_crash(tiny_model, tmp_path):
    write_dataset(tmp_path, n=1)
    rows = [
        {
            "id": "surrogate",
            "image": "img000.png",
            "conversations": _turns("<image>\nHi", "a \ud83d"),
        },
        {"id": "bad-id-\udc00", "conversations": _turns("Hi", "ok")},
        {"id": "from-list", "conversations": _turns("Hi", "ok", speaker=["human"])},
        {"id": "fine", "image": "img000.png", "conversations": _turns("<image>\nHi", "ok")},
    ]
    samples, skipped = build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128)
    assert [s.id for s in samples] == ["fine"] and dict(skipped) == {"malformed": 3}
    with pytest.raises(DataError, match="#0: text that is not valid Unicode"):
        build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128, strict=True)


def test_training_skips_exactly_the_rows_the_llava_rule_refuses(tiny_model, tmp_path):
    """One rule (vistune.data.formats.check_llava_sample): training skipped rows without an
    id, an empty turn or an empty image name differently from the validator, which refused
    them; now each is refused by both, with the validator's words in the strict error."""
    write_dataset(tmp_path, n=1)
    rows = [
        {"image": "img000.png", "conversations": _turns("<image>\nHi", "ok")},
        {"id": "blank", "conversations": _turns("Hi", "ok") + _turns(" ", "more")},
        {"id": "unnamed", "image": "", "conversations": _turns("Hi", "ok")},
        {"id": "null", "image": None, "conversations": _turns("Hi", "ok")},  # text-only
    ]
    samples, skipped = build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128)
    assert [s.id for s in samples] == ["null"]
    assert dict(skipped) == {"malformed": 2, "empty_conversation": 1}
    assert [validate_llava_sample(r) for r in rows] == [
        "missing id", "turn 2: empty value", "image must be a non-empty string", None
    ]  # fmt: skip
    for row in rows[:3]:
        with pytest.raises(DataError) as err:
            build_samples([row], tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128, strict=True)
        assert validate_llava_sample(row) in str(err.value)
    with pytest.raises(DataError, match=r"^#0: missing id \(reason malformed"):
        build_samples(rows[:1], tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128, strict=True)


def test_an_image_path_that_cannot_be_checked_is_skipped_not_a_crash(tiny_model, tmp_path):
    """is_file() raises for a name over 255 bytes (ENAMETOOLONG) or an unreadable folder."""
    write_dataset(tmp_path, n=1)
    rows = [
        {"id": "long", "image": "x" * 300 + ".png", "conversations": _turns("<image>\nHi", "ok")},
        {"id": "fine", "image": "img000.png", "conversations": _turns("<image>\nHi", "ok")},
    ]
    samples, skipped = build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128)
    assert [s.id for s in samples] == ["fine"] and dict(skipped) == {"missing_image": 1}
    with pytest.raises(DataError, match="sample long: image .* cannot be read"):
        build_samples(rows, tiny_model.tokenizer, "vicuna_v0", tmp_path, 4, 128, strict=True)


def test_plain_template_takes_one_exchange_and_cut_samples_are_marked(tiny_model, tmp_path):
    write_dataset(tmp_path, n=1)
    two = _turns("<image>\nWhat?", "A red square.") + _turns("And?", "Small.")
    rows = [
        {"id": "two-turns", "image": "img000.png", "conversations": two},
        {"id": "one", "image": "img000.png", "conversations": _turns("<image>\nWhat?", "Red.")},
        {"id": "long", "image": "img000.png", "conversations": _turns("<image>", "red " * 200)},
    ]
    samples, skipped = build_samples(rows, tiny_model.tokenizer, "plain", tmp_path, 4, 64)
    assert dict(skipped) == {"plain_multi_turn": 1}
    assert [(s.id, s.truncated) for s in samples] == [("one", False), ("long", True)]
    assert samples[1].length == 64


def test_truncation_keeps_image_and_cuts_text_from_the_end():
    ids = [1, IMAGE_TOKEN_ID, 2, 3, 4, 5, 6, 7]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, 6, 7]
    cut_ids, cut_labels = truncate(ids, labels, image_tokens=10, max_length=14, where="s")
    assert cut_ids == [1, IMAGE_TOKEN_ID, 2, 3, 4]  # 5 - 1 + 10 = 14 positions
    assert cut_labels == labels[:5]
    assert truncate(ids, labels, 10, 20, "s") == (ids, labels)
    with pytest.raises(SkipError, match="exceed") as err:
        truncate(ids, labels, image_tokens=10, max_length=12, where="s")
    assert err.value.reason == "too_long"


def test_global_batches_are_seeded_sorted_and_cover_each_epoch():
    lengths = [5, 50, 7, 30, 9, 12, 80, 3, 41, 22]
    first = global_batches(lengths, 4, epoch=0, seed=1)
    assert first == global_batches(lengths, 4, epoch=0, seed=1)
    assert first != global_batches(lengths, 4, epoch=1, seed=1)
    assert len(first) == 2 and len({i for b in first for i in b}) == 8  # last 2 dropped
    for batch in first:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_grouped_batches_put_the_longest_sample_first():
    """As HF's length grouping: a run that runs out of memory does so at step 0."""
    lengths = [(i * 37) % 101 for i in range(64)]
    firsts = set()
    for epoch in range(6):
        batches = global_batches(lengths, 4, epoch=epoch, seed=3)
        assert lengths[batches[0][0]] == max(lengths)
        assert sorted(i for b in batches for i in b) == list(range(64))
        for batch in batches:
            assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
        firsts.add(tuple(batches[1]))
    assert len(firsts) > 1  # the rest of the order still changes with the epoch


def test_micro_batches_split_one_global_batch_over_ranks():
    batch = [7, 6, 5, 4, 3, 2, 1, 0]
    assert micro_batches(batch, 2, world=1, rank=0) == [[7, 6], [5, 4], [3, 2], [1, 0]]
    ranks = [micro_batches(batch, 2, world=2, rank=r) for r in range(2)]
    assert ranks == [[[7, 6], [3, 2]], [[5, 4], [1, 0]]]
    assert sorted(i for r in ranks for m in r for i in m) == sorted(batch)


@pytest.mark.parametrize("global_batch, micro", [(16, 4), (4, 4)])
def test_length_grouping_reduces_padding(global_batch, micro):
    lengths = [10 * (i % 7) + 5 for i in range(256)]

    def share(group: bool) -> float:
        pads = totals = 0
        batches = global_batches(lengths, global_batch, 0, 0, group)
        assert sorted(i for b in batches for i in b) == list(range(256))
        for batch in batches:
            parts = [[lengths[i] for i in m] for m in micro_batches(batch, micro, 1, 0)]
            pad, total = padding_share(parts)
            pads, totals = pads + pad, totals + total
        return pads / totals

    assert share(True) < 0.25 * share(False)
    assert padding_share([[3, 5], [2]]) == (2, 12)

"""Stage-2 training mixes by ratio (vistune.datagen.mix, paper Table 4)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from vistune.cli import main
from vistune.data.formats import read_llava_json, write_llava_json
from vistune.datagen.mix import PRESETS, build_mix, mix_with_counts, parse_ratios, take
from vistune.errors import DataError

SIZES = {"conversation": 40, "detail": 20, "complex": 60}


def _sample(rtype: str, i: int) -> dict:
    return {
        "id": f"{i:012d}",
        "image": f"{i:012d}.jpg",
        "conversations": [
            {"from": "human", "value": f"<image>\n{rtype} question {i}"},
            {"from": "gpt", "value": f"{rtype} answer {i}"},
        ],
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for rtype, n in SIZES.items():
        out[rtype] = tmp_path / f"{rtype}.json"
        write_llava_json([_sample(rtype, i) for i in range(n)], out[rtype])
    return out


def _types(samples: list[dict]) -> Counter:
    return Counter(s["conversations"][1]["value"].split()[0] for s in samples)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("full", {"complex": 60, "conversation": 40, "detail": 20}),
        ("detail+complex", {"complex": 60, "detail": 20}),
        ("conversation", {"conversation": 40}),
        ("conv+5%detail+10%complex", {"complex": 6, "conversation": 40, "detail": 1}),
    ],
)
def test_presets_take_the_table4_shares(files, preset: str, expected: dict[str, int]) -> None:
    samples, counts = mix_with_counts(files, preset, seed=0)
    assert counts == expected
    assert _types(samples) == Counter(expected)
    assert len({(s["id"], s["conversations"][1]["value"]) for s in samples}) == len(samples)


def test_arbitrary_ratios_and_repeats(files) -> None:
    samples, counts = mix_with_counts(files, "conversation=1.5, detail=0.25", seed=1)
    assert counts == {"conversation": 60, "detail": 5}
    conv = Counter(s["id"] for s in samples if s["conversations"][1]["value"].startswith("conv"))
    assert sorted(Counter(conv.values()).items()) == [(1, 20), (2, 20)]  # all once, half twice
    assert mix_with_counts(files, {"complex": 0.5}, seed=1)[1] == {"complex": 30}


def test_deterministic_by_seed_and_shuffled(files) -> None:
    a = build_mix(files, "full", seed=3)
    assert a == build_mix(files, "full", seed=3)
    assert a != build_mix(files, "full", seed=4)
    assert Counter(s["conversations"][1]["value"] for s in a) == Counter(
        s["conversations"][1]["value"] for s in build_mix(files, "full", seed=4)
    )
    assert [_types(a[i : i + 30]).most_common(1)[0][1] < 30 for i in (0, 30, 60)] == [True] * 3
    partial = build_mix(files, "conv+5%detail+10%complex", seed=3)
    assert partial != build_mix(files, "conv+5%detail+10%complex", seed=9)


def test_take_keeps_samples_unchanged() -> None:
    samples = [{"id": i, "extra": [i]} for i in range(10)]
    picked = take(samples, 0.3, random.Random(0))
    assert len(picked) == 3 and all(p in samples for p in picked)
    assert [p["id"] for p in picked] == sorted(p["id"] for p in picked)


def test_bad_ratios_and_missing_files(files) -> None:
    assert parse_ratios("full") == PRESETS["full"]
    with pytest.raises(ValueError, match="unknown mix 'fulll'; valid: full, detail\\+complex"):
        parse_ratios("fulll")
    with pytest.raises(ValueError, match="bad ratio 'detail=lots'"):
        parse_ratios("conversation=1,detail=lots")
    with pytest.raises(
        ValueError, match="ratio for 'conversation' must be at least 0 and finite, got -1"
    ):
        parse_ratios("conversation=-1")
    with pytest.raises(ValueError, match="takes nothing"):
        parse_ratios("conversation=0")
    with pytest.raises(DataError, match="needs a file for: detail"):
        build_mix({"conversation": files["conversation"]}, "conv+5%detail+10%complex", 0)


def test_mix_command(files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mix.json"
    argv = ["mix", "--out", str(out), "--ratios", "conversation=1,detail=0.05"]
    argv += [f"--input={name}={path}" for name, path in files.items()]
    assert main(argv) == 0
    assert "wrote 41 samples" in capsys.readouterr().out
    assert read_llava_json(out) == build_mix(files, "conversation=1,detail=0.05", 0)
    assert main(["mix", "--out", str(out), "--input", "conversation"]) == 2
    assert "--input takes TYPE=FILE" in capsys.readouterr().err
    assert main(["mix", "--out", str(out), "--input", f"x={out}", "--ratios", "nope"]) == 2
    assert "unknown mix 'nope'" in capsys.readouterr().err


def test_mix_command_refuses_a_type_given_twice(files, tmp_path: Path, capsys) -> None:
    # two files for one type: taking the last would drop the first file's samples unseen
    out = tmp_path / "mix.json"
    argv = ["mix", "--out", str(out), "--ratios", "detail=1"]
    argv += ["--input", f"detail={files['detail']}", "--input", f"detail={files['complex']}"]
    assert main(argv) == 2
    assert "--input gives detail twice" in capsys.readouterr().err
    assert not out.exists()


def test_a_datagen_file_of_several_types_gives_each_type_its_own_samples(tmp_path):
    both = [
        {**_sample(rtype, i), "id": f"{i:012d}_{rtype}"}
        for i in range(20)
        for rtype in ("conversation", "detail", "complex")
    ]
    path = tmp_path / "instruct.json"
    write_llava_json(both, path)
    files = {rtype: path for rtype in ("conversation", "detail", "complex")}
    samples, counts = mix_with_counts(files, "conv+5%detail+10%complex", seed=0)
    assert counts == {"complex": 2, "conversation": 20, "detail": 1}
    assert _types(samples) == counts
    assert all(s["id"].endswith("_" + s["conversations"][1]["value"].split()[0]) for s in samples)


def test_ids_with_an_underscore_but_no_type_keep_the_whole_file(tmp_path):
    path = tmp_path / "official.json"
    write_llava_json([{**_sample("detail", i), "id": f"img_{i}"} for i in range(10)], path)
    assert mix_with_counts({"detail": path}, "detail=1", seed=0)[1] == {"detail": 10}


def test_mix_command_out_is_a_folder(files, tmp_path: Path, capsys) -> None:
    argv = ["mix", "--out", str(tmp_path), "--ratios", "detail=1"]
    assert main([*argv, "--input", f"detail={files['detail']}"]) == 2
    assert f"--out {tmp_path} is a folder, not a file" in capsys.readouterr().err


def test_a_file_without_samples_of_its_type_is_an_error_not_a_silent_zero(tmp_path):
    """A datagen file made with --types brief,conversation, given for detail, used to give
    0 detail samples and a mix without them; an empty file likewise."""
    made = [{**_sample("conversation", i), "id": f"{i}_{t}"} for i in range(3)
            for t in ("brief", "conversation")]  # fmt: skip
    path = tmp_path / "instruct.json"
    write_llava_json(made, path)
    with pytest.raises(
        DataError, match=rf"{path} holds no detail samples \(its types: brief, conversation\)"
    ):
        mix_with_counts({"detail": path}, "detail=1", seed=0)
    empty = tmp_path / "empty.json"
    write_llava_json([], empty)
    with pytest.raises(DataError, match=rf"{empty} holds no detail samples"):
        mix_with_counts({"detail": empty}, "detail=0.05", seed=0)

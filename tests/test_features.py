"""Frozen feature store: computed once, reused, stale and corrupt entries recomputed."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.errors import ImageError
from vistune.features import FeatureStore, encoder_key, open_store, tower_features
from vistune.files import host_tag


def _images(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"im{i}.png"
        Image.new("RGB", (28, 28), (20 * i, 100, 200 - 20 * i)).save(path)
        paths.append(path)
    return paths


class Counting:
    """A fake tower: features are a function of the file's bytes; counts calls."""

    def __init__(self) -> None:
        self.seen: list[Path] = []

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        out = []
        for path in paths:
            if path.suffix == ".bad":
                raise ImageError(f"{path}: not an image")
            self.seen.append(path)
            data = np.frombuffer(path.read_bytes()[:24], dtype=np.uint8).astype(np.float32)
            out.append(torch.from_numpy(data).reshape(4, 6) / 7.0)
        return torch.stack(out)  # (N, 4, 6)


def _store(root: Path) -> FeatureStore:
    return FeatureStore(root, "enc", tokens=4, dim=6, settings={"name": "fake"})


def test_computed_once_and_reused_across_opens(tmp_path):
    paths = _images(tmp_path, 5)
    tower = Counting()
    failed = _store(tmp_path / "s").ensure(paths, tower, batch=2)
    assert failed == {} and len(tower.seen) == 5
    again = _store(tmp_path / "s")  # a new process / stage
    assert again.ensure(paths, tower, batch=2) == {} and len(tower.seen) == 5
    got = again.get(paths[::-1])
    assert got.dtype == torch.float16 and got.shape == (5, 4, 6)
    expected = Counting()(paths[::-1]).half()
    assert torch.equal(got, expected)


def test_stale_file_is_recomputed(tmp_path):
    paths = _images(tmp_path, 3)
    tower = Counting()
    store = _store(tmp_path / "s")
    store.ensure(paths, tower)
    Image.new("RGB", (28, 28), (1, 2, 3)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a different mtime even on coarse clocks
    assert store.missing(paths) == [paths[1]]
    store.ensure(paths, tower)
    assert tower.seen[-1] == paths[1] and len(tower.seen) == 4
    assert torch.equal(_store(tmp_path / "s").get([paths[1]]), Counting()([paths[1]]).half())


def test_corrupt_and_truncated_shards_are_recomputed(tmp_path):
    paths = _images(tmp_path, 4)
    tower = Counting()
    store = _store(tmp_path / "s")
    store.ensure(paths[:2], tower)
    store.ensure(paths[2:], tower)
    shards = sorted((tmp_path / "s" / "enc").glob("shard-*.npy"))
    assert len(shards) == 2
    data = bytearray(shards[0].read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last row of the first shard
    shards[0].write_bytes(bytes(data))
    shards[1].write_bytes(shards[1].read_bytes()[:-40])  # truncated
    fresh = _store(tmp_path / "s")
    assert fresh.missing(paths) == [paths[1], paths[2], paths[3]]
    fresh.ensure(paths, tower)
    assert len(tower.seen) == 7
    assert fresh.missing(paths) == []
    assert torch.equal(_store(tmp_path / "s").get(paths), Counting()(paths).half())


def test_writers_with_one_tag_never_replace_each_other_s_shards(tmp_path, monkeypatch):
    paths = _images(tmp_path, 4)
    tower = Counting()
    first, second = _store(tmp_path / "s"), _store(tmp_path / "s")  # two processes, tag ""
    folder = tmp_path / "s" / "enc"
    first.ensure(paths[:1], tower)
    # another writer has linked its array as shard 1 and not yet written its JSON
    in_flight = folder / "shard-000001.npy"
    in_flight.write_bytes(b"someone else's shard")
    second.ensure(paths[1:2], tower)
    assert in_flight.read_bytes() == b"someone else's shard"
    assert (folder / "shard-000002.json").is_file()
    # and one that takes the next name between our count and our link
    real_link = os.link

    def racing_link(src, dst):
        if Path(dst).name == "shard-000003.npy" and not Path(dst).exists():
            Path(dst).write_bytes(b"the winner's shard")
        return real_link(src, dst)

    monkeypatch.setattr("vistune.features.os.link", racing_link)
    first.ensure(paths[2:], tower)
    assert (folder / "shard-000003.npy").read_bytes() == b"the winner's shard"
    assert (folder / "shard-000004.json").is_file()
    assert not list(folder.glob(".tmp-*"))
    fresh = _store(tmp_path / "s")
    assert fresh.missing(paths) == []
    assert torch.equal(fresh.get(paths), Counting()(paths).half())


def test_an_array_whose_json_never_came_is_removed_after_an_hour(tmp_path):
    _store(tmp_path / "s")
    folder = tmp_path / "s" / "enc"
    old, recent = folder / "shard-000000.npy", folder / "shard-000001-r1.npy"
    old.write_bytes(b"x")
    recent.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    _store(tmp_path / "s")
    assert not old.exists() and recent.read_bytes() == b"y"


def test_training_fill_recomputes_a_corrupt_row_of_an_unchanged_image(tiny_model, tmp_path):
    from vistune.train.setup import fill_features

    paths = _images(tmp_path, 3)
    store = open_store(tmp_path / "s", tiny_model)
    assert fill_features(tiny_model, store, paths, batch=3) == {}
    shard = next((tmp_path / "s").glob("*/shard-*.npy"))
    array = np.load(shard, mmap_mode="r+")
    array[1] = 7.0  # row 1 overwritten in place: the image file itself is unchanged
    array.flush()
    del array
    ticks = []
    assert fill_features(tiny_model, store, paths, 3, lambda n, t: ticks.append((n, t))) == {}
    assert ticks == [(0, 1), (1, 1)]  # (0, total) opens the bar before the batch runs
    store.reload()  # as prepare_samples reads the store after the fill
    assert store.missing(paths, verify=False) == []
    direct = tower_features(tiny_model, paths)
    torch.testing.assert_close(store.get(paths).float(), direct, atol=2e-3, rtol=2e-3)


def test_fill_progress_starts_before_the_first_batch(tmp_path, monkeypatch):
    # A bar made at the first report after a batch started its clock at that batch's end:
    # `vistune train` showed "774333 img/s" and a wrong ETA.
    import vistune.train.setup as setup

    events: list = []
    tower = Counting()

    def run_tower(model, paths):
        events.append(("batch", len(paths)))
        return tower(paths)

    monkeypatch.setattr(setup, "tower_features", run_tower)
    paths = _images(tmp_path, 3)
    failed = setup.fill_features(
        None, _store(tmp_path / "s"), paths, 2, lambda *t: events.append(t)
    )
    assert failed == {}
    assert events == [(0, 3), ("batch", 2), (2, 3), ("batch", 1), (3, 3)]
    events.clear()  # nothing to compute: no bar at all
    assert setup.fill_features(None, _store(tmp_path / "s"), paths, 2, events.append) == {}
    assert events == []


def _count_reads(monkeypatch) -> list[int]:
    """Counts rows read for their checksum from now on."""
    import vistune.features as features

    calls: list[int] = []
    real = features._row_crc
    monkeypatch.setattr(features, "_row_crc", lambda row: calls.append(1) or real(row))
    return calls


def _flip(path: Path, offset: int = -3) -> None:
    """Flip a byte in place: same size, same inode."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    with open(path, "r+b") as handle:
        handle.write(bytes(data))


def _rot(shard: Path) -> None:
    """Bit rot: the bytes change under markers that still match the file's identity."""
    from vistune.features import _identity

    _flip(shard)
    for marker in shard.parent.glob(f"{shard.stem}.verified*"):
        record = json.loads(marker.read_text())
        record["npy"] = _identity(shard.stat())
        marker.write_text(json.dumps(record))


def test_a_verified_shard_is_not_read_again(tmp_path, monkeypatch):
    paths = _images(tmp_path, 5)
    _store(tmp_path / "s").ensure(paths, Counting(), batch=2)
    reads = _count_reads(monkeypatch)
    assert _store(tmp_path / "s").missing(paths) == []  # a start after the fill reads once
    assert len(reads) == 5
    assert [m.name for m in (tmp_path / "s" / "enc").glob("*.verified*")] == [
        "shard-000000.verified"
    ]
    assert _store(tmp_path / "s").missing(paths) == []  # every later start: none
    assert len(reads) == 5


def test_a_store_that_takes_no_marker_is_still_read(tmp_path, monkeypatch):
    """A complete store on a read-only (or full) disk: the marker is best effort, so a start
    checks every row as before instead of failing with PermissionError."""
    import vistune.features as features

    paths = _images(tmp_path, 3)
    _store(tmp_path / "s").ensure(paths, Counting())
    write = features.write_text

    def read_only(path, text):
        if ".verified" in path.name:
            raise PermissionError(13, "Permission denied", str(path))
        write(path, text)

    monkeypatch.setattr(features, "write_text", read_only)
    reads = _count_reads(monkeypatch)
    assert _store(tmp_path / "s").missing(paths) == []
    assert _store(tmp_path / "s").missing(paths) == [] and len(reads) == 6  # twice, unmarked
    assert not list((tmp_path / "s" / "enc").glob("*.verified*"))


def test_a_shard_changed_after_its_check_is_read_again(tmp_path, monkeypatch):
    paths = _images(tmp_path, 4)
    tower = Counting()
    _store(tmp_path / "s").ensure(paths, tower)
    assert _store(tmp_path / "s").missing(paths) == []  # verified and marked
    shard = tmp_path / "s" / "enc" / "shard-000000.npy"
    before = shard.stat()
    copy = shard.with_name("copy")
    copy.write_bytes(shard.read_bytes())
    _flip(copy)  # the last row
    os.replace(copy, shard)  # rewritten: same size, same mtime, another inode
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    reads = _count_reads(monkeypatch)
    fresh = _store(tmp_path / "s")
    assert fresh.missing(paths) == [paths[3]] and len(reads) == 4
    fresh.ensure(paths, tower)
    assert tower.seen[-1] == paths[3] and len(tower.seen) == 5
    assert torch.equal(_store(tmp_path / "s").get(paths), Counting()(paths).half())


def test_an_in_place_edit_with_its_mtime_set_back_is_read_again(tmp_path):
    paths = _images(tmp_path, 3)
    _store(tmp_path / "s").ensure(paths, Counting())
    assert _store(tmp_path / "s").missing(paths) == []
    shard = tmp_path / "s" / "enc" / "shard-000000.npy"
    before = shard.stat()
    time.sleep(0.05)  # past the clock tick of the check, for the ctime
    _flip(shard)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert _store(tmp_path / "s").missing(paths) == [paths[2]]  # the ctime moved


def test_full_verify_finds_rot_the_markers_cannot_see(tmp_path, monkeypatch):
    paths = _images(tmp_path, 3)
    tower = Counting()
    _store(tmp_path / "s").ensure(paths, tower)
    assert _store(tmp_path / "s").missing(paths) == []
    shard = tmp_path / "s" / "enc" / "shard-000000.npy"
    _rot(shard)
    reads = _count_reads(monkeypatch)
    assert _store(tmp_path / "s").missing(paths) == [] and reads == []  # the trade-off
    full = _store(tmp_path / "s")
    full.verify_all = True
    assert full.missing(paths) == [paths[2]] and len(reads) == 3
    assert list(shard.parent.glob("*.verified*")) == []  # it vouched for the rotten row
    full.ensure(paths, tower)
    assert tower.seen[-1] == paths[2] and len(tower.seen) == 4
    assert torch.equal(_store(tmp_path / "s").get(paths), Counting()(paths).half())


def test_no_marker_for_a_shard_that_failed_or_a_check_cut_short(tmp_path, monkeypatch):
    paths = _images(tmp_path, 4)
    store = _store(tmp_path / "s")
    store.ensure(paths[:2], Counting())
    store.ensure(paths[2:], Counting())
    folder = tmp_path / "s" / "enc"
    _flip(folder / "shard-000000.npy")
    assert _store(tmp_path / "s").missing(paths) == [paths[1]]
    assert [m.name for m in folder.glob("*.verified*")] == ["shard-000001.verified"]
    # a killed check leaves at most a temporary, and a garbled marker vouches for nothing
    (folder / "shard-000001.verified").write_text('{"npy": [')
    (folder / f".tmp-{os.getpid()}-{host_tag()}-shard-000000.verified").write_text("{}")
    reads = _count_reads(monkeypatch)
    assert _store(tmp_path / "s").missing(paths[2:]) == [] and len(reads) == 2


def test_ranks_checking_one_shard_keep_their_own_markers(tmp_path, monkeypatch):
    paths = _images(tmp_path, 6)
    _store(tmp_path / "s").ensure(paths, Counting())  # one shard, as `vistune features`
    reads = _count_reads(monkeypatch)
    for rank in (0, 1):  # as training ranks: each checks its share, at the same time
        store = _store(tmp_path / "s")
        store.writer = f"rank{rank}"
        assert store.missing(paths[rank::2]) == []
    assert len(reads) == 6
    names = sorted(m.name for m in (tmp_path / "s" / "enc").glob("*.verified*"))
    assert names == ["shard-000000.verified-rank0", "shard-000000.verified-rank1"]
    assert _store(tmp_path / "s").missing(paths) == [] and len(reads) == 6


def test_unreadable_images_are_reported_not_fatal(tmp_path):
    paths = _images(tmp_path, 2)
    bad = tmp_path / "x.bad"
    bad.write_text("nope")
    failed = _store(tmp_path / "s").ensure([paths[0], bad, paths[1]], Counting(), batch=3)
    assert list(failed) == [bad]
    assert _store(tmp_path / "s").missing(paths) == []


def test_encoder_key_changes_with_weights_and_settings(tiny_model):
    base = encoder_key(tiny_model.vision, {"layer": -2})
    assert base == encoder_key(tiny_model.vision, {"layer": -2})
    assert base != encoder_key(tiny_model.vision, {"layer": -1})
    other = torch.nn.Linear(2, 2)
    assert base != encoder_key(other, {"layer": -2})


def test_real_tower_store_matches_direct_features(tiny_model, tmp_path):
    paths = _images(tmp_path, 3)
    store = open_store(tmp_path / "s", tiny_model)
    assert store.ensure(paths, lambda p: tower_features(tiny_model, p)) == {}
    direct = tower_features(tiny_model, paths)  # (3, T, Dv) fp32
    torch.testing.assert_close(store.get(paths).float(), direct, atol=2e-3, rtol=2e-3)
    with pytest.raises(Exception, match="no features"):
        store.get([tmp_path / "unknown.png"])


def test_features_command_fills_once_and_verifies_on_request(tiny_model, tmp_path, capsys):
    from vistune.cli import main

    model_dir = tiny_model.save(tmp_path / "model")
    paths = _images(tmp_path, 3)
    rows = [
        {
            "id": str(i),
            "image": p.name,
            "conversations": [
                {"from": "human", "value": "<image>\nHi"},
                {"from": "gpt", "value": "Hello"},
            ],
        }
        for i, p in enumerate([*paths, paths[0], tmp_path / "gone.png"])
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    argv = [
        "features",
        "--data",
        str(data),
        "--init",
        str(model_dir),
        "--features",
        str(tmp_path / "store"),
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "images: 3  computed: 3  already stored: 0  unreadable: 0  missing files: 1" in first
    assert main(argv) == 0
    assert "computed: 0  already stored: 3" in capsys.readouterr().out
    _rot(next((tmp_path / "store").glob("*/shard-*.npy")))  # its last row: paths[2]
    assert main(argv) == 0
    assert "computed: 0  already stored: 3" in capsys.readouterr().out
    assert main([*argv, "--verify"]) == 0  # a user who suspects bit rot
    assert "computed: 1  already stored: 2" in capsys.readouterr().out


def test_features_command_offers_only_the_settings_it_uses(capsys):
    from vistune.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert "--feature-batch" in shown and "--image-size" in shown and "--data-format" in shown
    assert "--lr" not in shown and "--resume" not in shown and "--out" not in shown
    assert "--verify" in shown


def test_a_store_that_cannot_be_written_or_read_says_so(tmp_path, monkeypatch):
    """A read-only store, garbled metadata and a shard list of the wrong shape were
    tracebacks (PermissionError, JSONDecodeError, ValueError from an unpack)."""
    from vistune.features import FeatureStoreError

    paths = _images(tmp_path, 3)
    store = _store(tmp_path / "s")
    store.ensure(paths[:1], Counting())
    folder = tmp_path / "s" / "enc"
    (folder / "meta.json").write_bytes(b"\0" * 16)
    (folder / "shard-000007.json").write_text('{"a": 1}')
    (folder / "shard-000008.json").write_text('[["x.png", 0, 1]]')
    fresh = _store(tmp_path / "s")  # garbled meta.json rewritten, bad lists ignored
    assert json.loads((folder / "meta.json").read_text())["tokens"] == 4
    assert fresh.missing(paths) == paths[1:]

    # a read-only or full disk (root writes into a 0o555 folder, so the write fails here)
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("vistune.features.np.save", read_only)
    with pytest.raises(FeatureStoreError, match="cannot write features .*writable folder"):
        fresh.ensure(paths, Counting())
    assert not list(folder.glob(".tmp-*"))
    assert _store(tmp_path / "s").missing(paths) == paths[1:]  # nothing lost

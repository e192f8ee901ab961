"""Frozen vision features, computed once per image and kept on disk.

The vision tower never trains (paper §4.2: "we keep ... the visual encoder ... frozen" in
both stages), so each image's grid features Z_v = g(X_v) (paper eq. 1) are the same in
every step, epoch and stage. They are computed once, in batches, into a store that the
training loop reads instead of running the tower.

Layout: `<root>/<encoder key>/` holds `meta.json` (what the encoder is, tokens, width) and
shards `shard-<n>.npy` (float16, (N, T, D), memory-mapped on read) each with a
`shard-<n>.json` listing its rows: resolved image path, file size, mtime_ns and a CRC32 of
the row (`shard-<n>-<writer>.*` when several processes fill the store at once, each with
its own `writer` tag). The encoder key hashes the tower's weights, the hidden layer, token
selection, image size, aspect mode and normalisation, so changing any of them starts a new
store.
A shard's JSON is written after its array (both atomically), so a killed extraction leaves
only complete shards and the next run picks up where it stopped. A new shard's name is taken
with a hard link, which fails if the name exists, so processes with the same tag (two
`vistune features` runs, or one beside training) never replace each other's shards; an
array whose JSON never came (its writer killed between the two) is removed an hour later. An entry whose image
changed (size or mtime) is stale (as for rsync and make, an image replaced by another of
the same size with its mtime kept, as `cp -p` or `rsync -a` of a same-size file does, is not
seen: `touch` it), one whose row fails its CRC or whose shard is truncated
is corrupt: both are recomputed by `ensure`.

Reading every row for its CRC at every start would cost the whole store (300 GB for
CC3M-595K) at each stage and resume, so a check that passes is recorded beside the shard:
`shard-<n>.verified[-<writer>]` holds the rows it read and the identity (size, mtime_ns,
inode, ctime_ns) of the shard's array and JSON as they were read. A later check reads only
rows no marker with the current identity vouches for: a shard rewritten, truncated,
touched or edited in place (ctime cannot be set back) is read again. A marker is written
(atomically, after the read, and only if the identity did not change meanwhile) only when
every row read passed; each writer extends its own marker, so ranks checking the same shard
never overwrite each other's rows. Bit rot keeps a file's identity: `verify_all`
(`vistune features --verify`) reads every row again and drops markers vouching for a bad one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vistune.errors import ImageError, VistuneError
from vistune.files import remove_orphaned_temps, sync_file, temp_path, write_text

FP16_MAX = 65504.0


class FeatureStoreError(VistuneError):
    """A feature store entry is missing or corrupt where it is needed."""


def encoder_key(vision: torch.nn.Module, settings: dict[str, object]) -> str:
    """Hash of the tower's tensors and the feature settings (layer, select, size, ...)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(vision.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        data = tensor.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:20]


def file_identity(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an image file; a change in either makes its entry stale."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _identity(stat: os.stat_result) -> list[int]:
    """What a rewrite, truncation, touch or in-place edit of a shard file changes."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def _row_crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).tobytes())


@dataclass(frozen=True)
class Entry:
    shard: str
    row: int
    size: int
    mtime_ns: int
    crc: int


def _row(fields: object) -> tuple[int, int, int, int]:
    """(row, size, mtime_ns, crc) of one listed row [path, row, size, mtime_ns, crc]."""
    if not isinstance(fields, list) or len(fields) != 5 or not isinstance(fields[0], str):
        raise ValueError(f"not a shard row: {fields!r:.80}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields[1:]):
        raise ValueError(f"not a shard row: {fields!r:.80}")
    return fields[1], fields[2], fields[3], fields[4]


class FeatureStore:
    """On-disk (path -> (T, D) float16) features for one encoder."""

    def __init__(self, root: str | Path, key: str, tokens: int, dim: int, settings: dict) -> None:
        self.folder = Path(root) / key
        self.tokens, self.dim = tokens, dim
        self.writer = ""
        """Tag in the names of the shards and markers this process writes (processes filling
        the store at the same time, e.g. training ranks, need different tags)."""
        self.verify_all = False
        """Read every checked row, also those a marker vouches for (bit rot keeps a file's
        identity, so only a full read finds it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_orphaned_temps(self.folder, ".tmp-*", 1, 2)  # shards of a killed writer here
        self._remove_uncommitted()
        meta = {"tokens": tokens, "dim": dim, "dtype": "float16", "encoder": settings}
        meta_path = self.folder / "meta.json"
        try:
            found = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        except (OSError, ValueError):
            found = None  # garbled: the folder's name already says which encoder it is for
        if not isinstance(found, dict):
            write_text(meta_path, json.dumps(meta, indent=1))
        elif (found.get("tokens"), found.get("dim")) != (tokens, dim):
            raise FeatureStoreError(f"{meta_path}: holds {found} but the encoder gives {meta}")
        self._arrays: dict[str, np.ndarray] = {}
        self._opened: dict[str, list[int] | None] = {}  # shard -> its array's identity
        self._listed: dict[str, list[int]] = {}  # shard -> its JSON's identity when read
        self._marks: dict[str, list[tuple[str, list, set[int]]]] = {}  # (file, identity, rows)
        self._checked: dict[str, tuple] = {}  # shard -> (identity, good rows, bad rows)
        self.entries: dict[str, Entry] = {}
        self.reload()

    def reload(self) -> None:
        """Read every shard's row list (later shards win for a path) and the markers."""
        for table in (self.entries, self._arrays, self._opened, self._listed, self._marks):
            table.clear()
        self._checked.clear()
        for listing in sorted(self.folder.glob("shard-*.json")):
            try:
                with open(listing, "rb") as handle:
                    stat = os.fstat(handle.fileno())
                    rows = json.loads(handle.read())
                listed = [Entry(listing.stem, *_row(fields)) for fields in rows]
            except (OSError, ValueError, TypeError):
                continue  # unreadable or not a row list: its images are computed again
            self._listed[listing.stem] = _identity(stat)
            for path, entry in zip((fields[0] for fields in rows), listed, strict=True):
                self.entries[path] = entry
        for marker in self.folder.glob("shard-*.verified*"):
            try:
                found = json.loads(marker.read_text())
                mark = (marker.name, [found["npy"], found["json"]], set(found["rows"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: vouches for nothing
            self._marks.setdefault(marker.name.split(".verified")[0], []).append(mark)

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            path = self.folder / f"{shard}.npy"
            before = _identity(path.stat())
            array = np.load(path, mmap_mode="r")
            if array.shape[1:] != (self.tokens, self.dim) or array.dtype != np.float16:
                raise ValueError(f"{path}: shape {array.shape} dtype {array.dtype}")
            # unchanged around the open: the mapping is of the file with this identity
            self._opened[shard] = before if _identity(path.stat()) == before else None
            self._arrays[shard] = array
        return self._arrays[shard]

    def _valid(self, key: str, entry: Entry) -> bool:
        try:
            if file_identity(Path(key)) != (entry.size, entry.mtime_ns):
                return False
            return entry.row < self._array(entry.shard).shape[0]
        except (OSError, ValueError):
            return False

    def missing(self, paths: Iterable[Path], verify: bool = True) -> list[Path]:
        """Paths with no valid entry: absent, stale (file changed) or corrupt. With `verify`
        the rows are checked against their CRC (those not vouched for by a marker are read)."""
        paths = [Path(p) for p in paths]
        keys = [str(p.resolve()) for p in paths]
        invalid = set()
        wanted: dict[str, dict[int, int]] = {}  # shard -> {row: crc}
        for key in keys:
            entry = self.entries.get(key)
            if entry is None or not self._valid(key, entry):
                invalid.add(key)
            elif verify:
                wanted.setdefault(entry.shard, {})[entry.row] = entry.crc
        bad = {shard: self._check(shard, crcs) for shard, crcs in wanted.items()}
        for key in set(keys) - invalid:
            entry = self.entries[key]
            if entry.row in bad.get(entry.shard, ()):
                invalid.add(key)
        return [path for path, key in zip(paths, keys, strict=True) if key in invalid]

    def _shard_identity(self, shard: str) -> list | None:
        try:
            return [_identity((self.folder / f"{shard}.{ext}").stat()) for ext in ("npy", "json")]
        except OSError:
            return None

    def _check(self, shard: str, crcs: dict[int, int]) -> set[int]:
        """The rows of `crcs` ({row: crc}) whose bytes fail their CRC. Rows vouched for by a
        marker of the shard as it is now, or read earlier in this process, are not read."""
        now = self._shard_identity(shard)
        seen, good, bad = self._checked.get(shard, (None, set(), set()))
        if seen != now:  # results of this process are for the shard as it was then
            seen, good, bad = now, set(), set()
            self._checked[shard] = (seen, good, bad)
        marks = [m for m in self._marks.get(shard, []) if m[1] == now]
        vouched = set() if self.verify_all else set().union(*(rows for _, _, rows in marks))
        todo = sorted(set(crcs) - good - bad - vouched)
        if not todo:
            return set(crcs) & bad
        if now is None or self._opened.get(shard) != now[0]:
            self._arrays.pop(shard, None)  # mapped before the file changed: map it again
        try:
            array = self._array(shard)  # (N, T, D)
            for row in todo:
                (good if _row_crc(array[row]) == crcs[row] else bad).add(row)
        except (OSError, ValueError):
            bad.update(todo)
        if bad:  # a shard with a bad row is never marked
            self._unmark(shard, marks, bad)
        elif now is not None and now == [self._opened.get(shard), self._listed.get(shard)]:
            if self._shard_identity(shard) == now:  # nothing changed while it was read
                self._mark(shard, now, marks, good)
        return set(crcs) & bad

    def _mark(self, shard: str, identity: list, marks: list, good: set[int]) -> None:
        name = f"{shard}.verified" + (f"-{self.writer}" if self.writer else "")
        rows = good.union(*(rows for file, _, rows in marks if file == name))
        record = {"npy": identity[0], "json": identity[1], "rows": sorted(rows)}
        try:
            write_text(self.folder / name, json.dumps(record))
        except OSError:  # a read-only or full store: the rows are checked again next time
            return
        others = [m for m in self._marks.get(shard, []) if m[0] != name]
        self._marks[shard] = [*others, (name, identity, rows)]

    def _unmark(self, shard: str, marks: list, bad: set[int]) -> None:
        """Remove the markers that vouch for a row now known bad (a full check found rot)."""
        for file, _, rows in marks:
            if rows & bad:
                (self.folder / file).unlink(missing_ok=True)
        self._marks[shard] = [m for m in self._marks.get(shard, []) if not m[2] & bad]

    def add(self, items: Sequence[tuple[Path, np.ndarray]]) -> None:
        """Write one shard holding these (path, (T, D)) features; JSON last (commit)."""
        if not items:
            return
        stacked = np.stack([np.clip(f, -FP16_MAX, FP16_MAX) for _, f in items])
        stacked = stacked.astype(np.float16)  # (N, T, D)
        rows = []
        for row, (path, _) in enumerate(items):
            size, mtime_ns = file_identity(Path(path))
            rows.append([str(Path(path).resolve()), row, size, mtime_ns, _row_crc(stacked[row])])
        tmp = temp_path(self.folder / "shard.npy")
        try:
            with open(tmp, "wb") as handle:
                np.save(handle, stacked)
            sync_file(tmp)
            name = self._claim(tmp)  # a new name, taken with a link: not a replace
            write_text(self.folder / f"{name}.json", json.dumps(rows))  # syncs the folder
        except OSError as err:  # read-only, full, gone: what is stored so far stays
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise FeatureStoreError(
                f"{self.folder}: cannot write features ({err.strerror or err}); free space or "
                "point --features at a writable folder"
            ) from err
        self._listed[name] = _identity((self.folder / f"{name}.json").stat())
        self._arrays.pop(name, None)
        self._checked.pop(name, None)
        for path, row, size, mtime_ns, crc in rows:
            self.entries[path] = Entry(name, row, size, mtime_ns, crc)

    def _remove_uncommitted(self, age_s: float = 3600.0) -> None:
        """Delete arrays whose JSON never came: a writer killed between the two. The JSON
        follows its array within milliseconds, so one missing for an hour never comes."""
        for array in self.folder.glob("shard-*.npy"):
            try:
                if array.with_suffix(".json").exists():
                    continue
                if time.time() - array.stat().st_mtime > age_s:
                    array.unlink()
            except OSError:
                continue  # a read-only store, or another process removed it first

    def _claim(self, tmp: Path) -> str:
        """Give the written array `tmp` the next free shard name and return that name.

        The name is taken with a hard link, which fails if the name exists, so two processes
        with the same writer tag (two `vistune features` runs, or one beside a training run)
        never replace each other's shard; where the file system has no hard links it is
        renamed over (the name is then only as unique as the writer tag)."""
        taken = (p.name.split(".")[0].split("-")[1] for p in self.folder.glob("shard-*.*"))
        number = 1 + max((int(n) for n in taken if n.isdigit()), default=-1)
        while True:
            name = f"shard-{number:06d}" + (f"-{self.writer}" if self.writer else "")
            try:
                os.link(tmp, self.folder / f"{name}.npy")
            except FileExistsError:
                number += 1
                continue
            except OSError:
                os.replace(tmp, self.folder / f"{name}.npy")
                return name
            tmp.unlink()
            return name

    def get(self, paths: Sequence[Path]) -> torch.Tensor:
        """(M, T, D) float16 features of these images, read from the memory-mapped shards."""
        rows = []
        for path in paths:
            key = str(Path(path).resolve())
            entry = self.entries.get(key)
            if entry is None:
                raise FeatureStoreError(
                    f"{path}: no features in {self.folder}; run `vistune features`"
                )
            try:
                rows.append(np.asarray(self._array(entry.shard)[entry.row]))
            except (OSError, ValueError) as err:
                raise FeatureStoreError(f"{path}: unreadable feature shard ({err})") from err
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.tokens, self.dim)

    def ensure(
        self,
        paths: Iterable[Path],
        compute: Callable[[list[Path]], torch.Tensor],
        batch: int = 16,
        shard_rows: int = 1024,
        progress: Callable[[int], None] | None = None,
        verify: bool = True,
    ) -> dict[Path, str]:
        """Compute and store features for every path lacking a valid entry.

        `compute(paths) -> (N, T, D)` runs the tower; it may raise ImageError for a batch,
        which is then retried image by image. Returns {path: reason} for images that could
        not be read (the caller skips their samples). `progress(n)` is called per batch.
        """
        todo = list(dict.fromkeys(self.missing(paths, verify)))
        failed: dict[Path, str] = {}
        pending: list[tuple[Path, np.ndarray]] = []
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            for path, feats in self._compute(chunk, compute, failed):
                pending.append((path, feats))
            if len(pending) >= shard_rows:
                self.add(pending)
                pending = []
            if progress is not None:
                progress(len(chunk))
        self.add(pending)
        return failed

    def _compute(self, chunk: list[Path], compute, failed) -> list[tuple[Path, np.ndarray]]:
        try:
            feats = compute(chunk).float().cpu().numpy()  # (N, T, D)
            return list(zip(chunk, feats, strict=True))
        except ImageError:
            pass
        out = []
        for path in chunk:
            try:
                out.append((path, compute([path]).float().cpu().numpy()[0]))
            except ImageError as err:
                failed[path] = str(err)
        return out


@dataclass
class Encoder:
    """Just what features need from a LlavaModel: the tower, its processor and settings
    (so `vistune features` does not load a 13B LLM to run a 0.3B tower)."""

    vision: torch.nn.Module
    image_processor: object
    config: object

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens(self.config.image_size)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)  # (N, T, Dv)


def open_store(root: str | Path, model) -> FeatureStore:
    """The store of `model`'s encoder (a LlavaModel or an Encoder)."""
    config = model.config
    processor = model.image_processor
    settings = {
        "layer": config.vision_layer,
        "select": config.vision_select,
        "image_size": config.image_size,
        "aspect": config.image_aspect,
        "mean": list(processor.mean),
        "std": list(processor.std),
        "model_type": getattr(model.vision, "model_type", ""),
    }
    key = encoder_key(model.vision, settings)
    return FeatureStore(root, key, model.num_image_tokens, model.vision.hidden_size, settings)


def tower_features(model, paths: list[Path]) -> torch.Tensor:
    """(N, T, Dv) tower features of image files (ImageError if one cannot be read)."""
    from vistune.data.image import load_image

    images = [load_image(path) for path in paths]
    device = next(model.vision.parameters()).device
    with torch.no_grad():
        return model.image_features(model.image_processor(images).to(device))

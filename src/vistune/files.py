"""Files and folders written whole or not at all: the one way vistune writes its results,
LLaVA JSON, reports, feature shards, checkpoints, model directories and converted weights.

A file is written to a temporary beside it (the same folder, so the rename stays on one file
system), flushed to the disk (fsync), renamed over the target (`os.replace`, atomic on
POSIX), and then the folder is synced so that the rename itself survives a power cut. A
process killed at any moment leaves the old file or the new one, never a mix; a write that
fails removes its temporary and leaves the old file as it was.

A folder (a checkpoint, a model directory) is filled under a temporary name, synced file by
file, and renamed into place the same way (`staged_dir`); a folder already there is moved
aside first and deleted only once the new one is in place, and put back if the rename fails.

A model directory's JSON files (config.json, preprocessor_config.json, the weight index, an
export's settings) are read by `read_json` alone: a missing, unreadable or malformed one is
one `ModelDirError` naming the file and what it was read for.

Temporaries are named `.tmp-<pid>-<host>-<token>-<name>`, so `remove_orphaned_temps(folder,
".tmp-*", 1, 2)` tells those of a writer that was killed from those of one still writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vistune.errors import ModelDirError


def host_tag() -> str:
    """This machine in a file name (no '-'): temporaries on storage that several nodes share
    carry it, so a node judges only its own writers' pids."""
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside `path` (`.tmp-<pid>-<host>-<token>-<name>`)."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}-{path.name}")


def sync_dir(folder: str | Path) -> None:
    """fsync a folder, so that renames and new names in it survive a power cut."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform that cannot open folders
    try:
        os.fsync(handle)
    except OSError:
        pass  # a file system that does not sync folders
    finally:
        os.close(handle)


def sync_file(path: str | Path) -> None:
    """fsync a file's data, whoever wrote it (np.save, savefig, save_pretrained)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for any writer to create the new file at; when the
    block ends the file is synced and renamed over `path`, and the folder synced. On an
    error the temporary is removed and `path` is left as it was. The temporary keeps the
    target's name at its end (`report.png` -> `.tmp-...-report.png`), so writers that infer
    a format from the suffix still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        sync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (see the module docstring)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 (newlines as given, on every platform), atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(
    path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Write `data` as JSON (non-ASCII kept as UTF-8) and a final newline, atomically. A
    value JSON cannot hold raises TypeError before anything is written."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, sort_keys=sort_keys)
    write_text(path, text + "\n")


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; missing, not JSON or not an object is a ModelDirError naming
    the file and `what` it is (`"vision config"`)."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: not valid JSON ({what}): {exc}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object ({what})")
    return data


def read_json_if_present(path: str | Path, what: str) -> dict[str, Any] | None:
    """`read_json` for an optional file: None when it is not there."""
    return read_json(path, what) if Path(path).is_file() else None


def write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """Write one JSON value a line (non-ASCII kept as UTF-8), atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def staged_dir(
    path: str | Path, tmp: str | Path | None = None, aside: str | Path | None = None
) -> Iterator[Path]:
    """An empty temporary folder beside `path` to fill; when the block ends it is synced and
    swapped in at `path` (`swap_dir`). On an error the temporary is deleted and `path` is
    left as it was. `tmp` and `aside` name the temporary and the place an old `path` waits
    while the new one moves in (default: `temp_path` names), for callers whose leftovers
    are cleared by name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else temp_path(path)
    if tmp.exists():  # a leftover of this exact name: this writer's own to replace
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        swap_dir(tmp, path, aside)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_dir(tmp: str | Path, path: str | Path, aside: str | Path | None = None) -> None:
    """Put the finished folder `tmp` at `path`: every file in it and the folders are synced,
    an old `path` is renamed to `aside` and deleted only after `tmp` took its name (and
    renamed back if that fails), and the parent folder is synced."""
    tmp, path = Path(tmp), Path(path)
    _sync_tree(tmp)
    aside = Path(aside) if aside is not None else temp_path(path.with_name(f"old-{path.name}"))
    moved = False
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
        moved = True
    try:
        os.replace(tmp, path)
    except BaseException:
        if moved and not path.exists():
            os.replace(aside, path)
        raise
    sync_dir(path.parent)
    if moved:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


def _sync_tree(folder: Path) -> None:
    for root, _dirs, names in os.walk(folder):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                sync_file(os.path.join(root, name))
        sync_dir(root)


def remove_orphaned_temps(
    folder: Path, pattern: str, pid_field: int, host_field: int | None = None
) -> list[Path]:
    """Delete temporaries in `folder` matching the glob `pattern` whose writer is gone: a
    process killed while writing leaves them (a whole checkpoint, a feature shard). Their
    names hold the writer's pid as field `pid_field` of name.split("-"); files of a process
    still running on this machine are kept. With `host_field`, that field holds the writer's
    `host_tag()`, and files written on other machines are kept (their pids mean nothing here)."""
    removed = []
    for path in folder.glob(pattern):
        fields = path.name.split("-")
        try:
            pid = int(fields[pid_field])
            if host_field is not None and fields[host_field] != host_tag():
                continue
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _running(pid):
            continue
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            continue  # a read-only folder: left for a writer that can
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

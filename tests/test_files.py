"""vistune.files: every file and folder vistune writes lands whole or not at all, and
survives a power cut once written (synced before and after the rename)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vistune import files


def _events(monkeypatch) -> list[tuple[str, str]]:
    """Record fsync (of a file or a folder) and rename calls, in order."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def renamed(src, dst):
        events.append(("replace", str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    return events


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "r.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_write_is_synced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    events = _events(monkeypatch)
    files.write_json(path, {"a": "café"})
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).name.endswith("-r.json")  # the temporary, before the rename
    assert events[1][1] == str(path) and events[2][1] == str(tmp_path)
    assert path.read_bytes() == '{\n  "a": "café"\n}\n'.encode()


def test_a_writer_killed_before_the_rename_leaves_the_old_file(tmp_path):
    """A real crash (os._exit inside the block): the old file is whole, and the temporary
    it left is an orphan the next writer's cleanup takes away."""
    path = tmp_path / "log.txt"
    files.write_text(path, "old\n")
    script = (
        "import os, sys\nfrom vistune.files import replacing\n"
        "with replacing(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('new, half writ')\n"
        "    os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert done.returncode == 9
    assert path.read_text() == "old\n"
    left = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(left) == 1 and left[0].startswith(".tmp-") and left[0].endswith("-log.txt")
    assert files.remove_orphaned_temps(tmp_path, ".tmp-*", 1, 2) == [tmp_path / left[0]]
    assert [p.name for p in tmp_path.iterdir()] == ["log.txt"]


def test_an_error_in_the_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "chart.png"
    files.write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="savefig failed"):
        with files.replacing(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"  # a format by suffix
            tmp.write_bytes(b"half")
            raise RuntimeError("savefig failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["chart.png"]


def test_text_is_utf8_with_newlines_as_given_and_an_ordinary_mode(tmp_path):
    path = tmp_path / "sub" / "a.jsonl"  # the folder is made
    files.write_jsonl(path, [{"t": "é\u2028"}, [1]])
    assert path.read_bytes() == '{"t": "é\u2028"}\n[1]\n'.encode()
    files.write_text(path, "a\r\nb\n")
    assert path.read_bytes() == b"a\r\nb\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate: nothing written at all
        files.write_text(path, "\udc00")
    assert path.read_bytes() == b"a\r\nb\n" and len(list(path.parent.iterdir())) == 1


def test_a_staged_folder_replaces_the_old_one_only_once_it_is_whole(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with files.staged_dir(final) as folder:
        (folder / "config.json").write_text("1")
        (folder / "llm").mkdir()
        (folder / "llm" / "w.bin").write_bytes(b"w1")
        assert not final.exists()  # nothing at the name until the block ends
    assert (final / "config.json").read_text() == "1"
    with files.staged_dir(final) as folder:
        (folder / "config.json").write_text("2")
        assert (final / "config.json").read_text() == "1"  # the old one, while filling
    assert (final / "config.json").read_text() == "2" and not (final / "llm").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old one is gone
    events = _events(monkeypatch)
    with files.staged_dir(final) as folder:
        (folder / "config.json").write_text("3")
    kinds = [kind for kind, _ in events]
    # the file and the folder synced, the old moved aside, the new moved in, the parent synced
    assert kinds == ["fsync", "fsync", "replace", "replace", "fsync"]
    assert events[-1] == ("fsync", str(tmp_path))


def test_a_failed_swap_or_fill_keeps_the_old_folder(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    with files.staged_dir(final) as folder:
        (folder / "state.json").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        with files.staged_dir(final) as folder:
            (folder / "state.json").write_text("half")
            raise OSError("disk full")
    assert (final / "state.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    replace = os.replace

    def refused(src, dst):  # the old one is already aside when the new one cannot move in
        if Path(dst) == final and not Path(src).name.endswith("-old-ckpt"):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="No space"):
        with files.staged_dir(final) as folder:
            (folder / "state.json").write_text("new")
    assert (final / "state.json").read_text() == "old"  # put back
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_staged_folder_takes_the_names_its_caller_clears(tmp_path):
    final, tmp, aside = tmp_path / "step-1", tmp_path / ".tmp-step-1-7", tmp_path / ".old-7"
    tmp.mkdir()
    (tmp / "stale").write_text("a leftover of this exact name")
    final.mkdir()
    with files.staged_dir(final, tmp, aside) as folder:
        assert folder == tmp and list(folder.iterdir()) == []
        (folder / "state.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]
    assert json.loads((final / "state.json").read_text()) == {}


def test_orphaned_temporaries_of_killed_writers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    import torch

    from vistune.features import FeatureStore
    from vistune.files import host_tag, remove_orphaned_temps
    from vistune.train.checkpoint import save_checkpoint

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead, alive = int(gone.stdout), os.getppid()
    checkpoints = tmp_path / "run" / "checkpoints"
    for pid in (dead, alive):
        (checkpoints / f".tmp-step-00000002-{pid}").mkdir(parents=True)
        (checkpoints / f".tmp-step-00000002-{pid}" / "trainable.safetensors").write_bytes(b"x")
    save_checkpoint(tmp_path / "run", 4, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []},
                    {}, keep_last=2)  # fmt: skip
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f".tmp-step-00000002-{alive}", "step-00000004"
    ]  # fmt: skip
    store = tmp_path / "features" / "enc"
    store.mkdir(parents=True)
    here = host_tag()
    for pid in (dead, alive):
        (store / f".tmp-{pid}-{here}-shard-000001.npy").write_bytes(b"x")
    # on storage several nodes share: another node's writer, whose pid means nothing here
    (store / f".tmp-{dead}-0badf00d-shard-000002.npy").write_bytes(b"x")
    FeatureStore(tmp_path / "features", "enc", tokens=4, dim=6, settings={})
    assert sorted(p.name for p in store.glob(".tmp-*")) == sorted(
        [f".tmp-{dead}-0badf00d-shard-000002.npy", f".tmp-{alive}-{here}-shard-000001.npy"]
    )
    assert remove_orphaned_temps(store, ".tmp-*", 1, 2) == []


def test_every_writer_goes_through_vistune_files():
    """Renames, syncs and temporaries live in vistune.files alone (issue 17: five copies of
    the atomic write, three of the folder swap). The one exception: a feature shard takes
    its new name with a hard link, renaming only where the file system has no links."""
    import ast

    import vistune

    src = Path(vistune.__file__).parent
    watched = {"os.replace", "os.rename", "os.fsync", "shutil.move"}
    found = []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in watched or name.startswith("tempfile."):
                    found.append((path.relative_to(src).as_posix(), name))
    assert [f for f in found if f[0] != "files.py"] == [("features.py", "os.replace")]


@pytest.fixture(scope="module")
def broken_model(tiny_model, tmp_path_factory):
    """A saved tiny model whose config.json (or vision/config.json) is cut short."""
    base = tiny_model.save(tmp_path_factory.mktemp("json") / "model")

    def make(name: str) -> Path:
        copy = tmp_path_factory.mktemp("broken") / "model"
        shutil.copytree(base, copy)
        (copy / name).write_text('{"format": "vistune-llava", ', encoding="utf-8")
        return copy

    return make


ENTRY_POINTS = {
    "chat": lambda m, out: ["chat", "--model", str(m), "--prompt", "hi", "--dtype", "fp32"],
    "serve": lambda m, out: ["serve", "--model", str(m), "--dtype", "fp32"],
    "eval answer": lambda m, out: ["eval", "answer", "--model", str(m), "--questions",
                                   str(out / "q.jsonl"), "--out", str(out / "a.jsonl")],
    "export": lambda m, out: ["export", "--model", str(m), "--out", str(out / "hf")],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "what"),
    [("config.json", "vistune model config"), ("vision/config.json", "vision tower config")],
)
@pytest.mark.parametrize("command", sorted(ENTRY_POINTS))
def test_a_corrupt_model_json_is_one_clear_error_through_each_entry_point(
    broken_model, tmp_path, capsys, command, name, what
):
    """One reader (files.read_json) for a model directory's JSON: the same line, naming the
    file and what it is, whichever command reads it (D4: two readers said it two ways)."""
    from vistune import cli

    model = broken_model(name)
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "hi"}\n')
    assert cli.main(ENTRY_POINTS[command](model, tmp_path)) == 2
    err = capsys.readouterr().err
    expected = f"vistune: error: {model / name}: not valid JSON ({what}): "
    assert err.startswith(expected) and len(err.splitlines()) == 1, err
    assert "Traceback" not in err


def test_the_image_processor_reads_a_vision_folder_s_json_the_same_way(broken_model):
    from vistune.data.image import ImageProcessor
    from vistune.errors import ModelDirError

    vision = broken_model("vision/config.json") / "vision"
    (vision / "preprocessor_config.json").unlink()  # else its mean/std answer first
    with pytest.raises(ModelDirError, match=r"vision/config\.json: not valid JSON \(vision "):
        ImageProcessor.from_vision_dir(vision, size=14)
    with pytest.raises(ModelDirError, match=r"missing \(training config\)"):
        files.read_json(vision / "train_config.json", "training config")
    (vision / "list.json").write_text("[1]")
    with pytest.raises(ModelDirError, match=r"list\.json: expected a JSON object \(x\)"):
        files.read_json(vision / "list.json", "x")
    assert files.read_json_if_present(vision / "absent.json", "x") is None

"""The datagen pipeline end to end: COCO in, LLaVA JSON out, resumable, fault tolerant."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vistune.cli import main
from vistune.config import ClientConfig
from vistune.data.annotations import Box, ImageContext
from vistune.datagen.context import screen_contexts
from vistune.datagen.messages import build_messages, detail_question, load_prompt
from vistune.datagen.naive import DETAIL_QUESTIONS
from vistune.datagen.parse import RejectedOutput
from vistune.datagen.pipeline import DatagenConfig, run_datagen
from vistune.datagen.store import Key, Store, prompt_hash
from vistune.datagen.teachers import OpenAITeacher, Teacher

from .conftest import messages_hash

TYPES = ("brief", "conversation", "detail", "complex")
TEACHER_TYPES = ("conversation", "detail", "complex")


def make_coco(root: Path, n: int) -> Path:
    """n good images (ids 1..n) plus one whose file is missing, one without captions, one
    box out of range and one box of an unknown category."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    images, caps, anns = [], [], []
    for i in range(1, n + 3):
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": 100, "height": 80})
        if i <= n:
            Image.new("RGB", (10, 8), (i * 20 % 255, 90, 30)).save(root / "train" / f"{i:06d}.png")
        if i != n + 2:
            caps.append(
                {"id": len(caps) + 1, "image_id": i, "caption": f"A red cup and {i} plates."}
            )
            caps.append({"id": len(caps) + 1, "image_id": i, "caption": "Cups on a table."})
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20]})
        anns.append(
            {"id": len(anns) + 1, "image_id": i, "category_id": 2, "bbox": [60, 40, 30, 30]}
        )
    anns.append({"id": 900, "image_id": 1, "category_id": 1, "bbox": [90, 70, 50, 50]})
    anns.append({"id": 901, "image_id": 2, "category_id": 99, "bbox": [1, 1, 5, 5]})
    cats = [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}]
    ann_dir = root / "annotations"
    (ann_dir / "captions_train.json").write_text(
        json.dumps({"images": images, "annotations": caps})
    )
    (ann_dir / "instances_train.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return root


def datagen_args(coco: Path, out: Path, *extra: str, types=TYPES) -> list[str]:
    return ["datagen", "--coco", str(coco), "--split", "train", "--types", ",".join(types),
            "--out", str(out), *extra]  # fmt: skip


def openai_args(server, workers: int = 2) -> list[str]:
    return ["--teacher", "openai", "--base-url", server.url, "--model", "m", "--workers",
            str(workers), "--backoff", "0.001", "--http-retries", "2", "--timeout", "5"]  # fmt: skip


def ids(path: Path) -> list[str]:
    return [s["id"] for s in json.loads(path.read_text())]


def summary(out: Path) -> dict:
    return json.loads(out.with_name(out.stem + ".summary.json").read_text())


def test_prompts_are_packaged_and_hashed_like_the_server():
    for rtype in TEACHER_TYPES:
        prompt = load_prompt(rtype)
        assert len(prompt.examples) >= 2 and "Question" in prompt.system or rtype == "detail"
    ctx = ImageContext("5", "5.png", ("A cup.",), (Box("cup", (0.1, 0.1, 0.3, 0.3)),))
    question = detail_question("5", seed=0)
    assert question in DETAIL_QUESTIONS and question == detail_question("5", seed=0)
    messages = build_messages("detail", ctx, question)
    roles = [m["role"] for m in messages]
    assert roles == ["system"] + ["user", "assistant"] * len(load_prompt("detail").examples) + [
        "user"
    ]
    assert (
        messages[-1]["content"]
        == f"A cup.\n\ncup: [0.100, 0.100, 0.300, 0.300]\n\nQuestion to answer: {question}"
    )
    assert prompt_hash(messages) == messages_hash(messages)
    assert prompt_hash(messages) != prompt_hash(build_messages("detail", ctx, "Other?"))


def test_rules_run_writes_every_type_and_counts_bad_input(tmp_path, capsys):
    coco, out = make_coco(tmp_path / "coco", 3), tmp_path / "out" / "data.json"
    assert main(datagen_args(coco, out, "--teacher", "rules")) == 0
    assert ids(out) == [f"{i}_{t}" for i in (1, 2, 3) for t in TYPES]
    samples = json.loads(out.read_text())
    assert all(s["image"] == f"train/{int(s['id'].split('_')[0]):06d}.png" for s in samples)
    assert all(s["conversations"][0]["value"].count("<image>") == 1 for s in samples)
    report = summary(out)
    assert report["teacher"] == "rules (not an LLM)"
    assert report["per_type"]["conversation"] == {"done": 3}
    assert report["skipped"] == {"image missing on disk": 1, "image without captions": 1,
                                 "box out of range": 1, "unknown category": 1}  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "teacher: rules (not an LLM)" in err and "skipped input (image missing on disk): 1" in err
    )
    assert out.with_name("data.rejected.jsonl").read_text() == ""
    assert Path(str(out) + ".sqlite").is_file()

    first = out.read_bytes()
    assert main(datagen_args(coco, out, "--teacher", "rules")) == 0
    assert out.read_bytes() == first
    assert summary(out)["per_type"]["complex"] == {"cached": 3}


def test_openai_run_survives_faults_and_sends_each_request_once(tmp_path, chat_server):
    coco, out = make_coco(tmp_path / "coco", 4), tmp_path / "data.json"
    chat_server.retry_after = "0.05"
    faults = ("500", "429", "malformed", "cut", "empty", "length", "503")
    chat_server.inject(*faults)
    assert main(datagen_args(coco, out, *openai_args(chat_server, 3), "--http-retries", "8")) == 0
    assert ids(out) == [f"{i}_{t}" for i in (1, 2, 3, 4) for t in TYPES]
    assert len(chat_server.counts) == 4 * 3
    assert sum(chat_server.counts.values()) == 4 * 3 + len(faults)
    assert chat_server.bodies[0]["model"] == "m"

    assert main(datagen_args(coco, out, *openai_args(chat_server))) == 0
    assert sum(chat_server.counts.values()) == 4 * 3 + len(faults)  # all answered from the store


def test_rejected_answers_are_kept_counted_and_not_resent(tmp_path, chat_server):
    coco, out = make_coco(tmp_path / "coco", 2), tmp_path / "data.json"
    chat_server.reply = lambda messages: "Sure! Here it is.\nQuestion: What?\nAnswer: Cups."
    args = datagen_args(coco, out, *openai_args(chat_server), types=("conversation", "complex"))
    assert main(args) == 0
    assert ids(out) == []
    rejected = [
        json.loads(line) for line in out.with_name("data.rejected.jsonl").read_text().splitlines()
    ]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("1_conversation", "preamble"), ("1_complex", "preamble"),
        ("2_conversation", "preamble"), ("2_complex", "preamble"),
    ]  # fmt: skip
    assert rejected[0]["response"].startswith("Sure! Here it is.")
    assert summary(out)["per_type"]["complex"] == {"rejected": 2, "rejected: preamble": 2}
    with sqlite3.connect(str(out) + ".sqlite") as db:
        rows = db.execute("SELECT status, reason, response FROM requests").fetchall()
    assert {(s, r) for s, r, _ in rows} == {("rejected", "preamble")} and len(rows) == 4
    sent = len(chat_server.bodies)
    assert main(args) == 0
    assert len(chat_server.bodies) == sent
    assert summary(out)["per_type"]["complex"]["cached rejected"] == 2


def test_endpoint_down_exits_2_keeps_finished_work_and_resumes(tmp_path, chat_server, capsys):
    coco, out = make_coco(tmp_path / "coco", 4), tmp_path / "data.json"
    types = ("brief", "complex")
    assert (
        main(datagen_args(coco, out, *openai_args(chat_server), "--limit", "2", types=types)) == 0
    )
    before = Counter(chat_server.counts)
    assert len(before) == 2

    chat_server.down = True
    assert main(datagen_args(coco, out, *openai_args(chat_server), types=types)) == 2
    err = capsys.readouterr().err
    assert "vistune: error:" in err and "failed after 3 tries" in err
    assert "Wrote 6 finished samples" in err and "rerun the same command to resume" in err
    assert ids(out) == ["1_brief", "1_complex", "2_brief", "2_complex", "3_brief", "4_brief"]
    assert summary(out)["remaining"] == 2 and summary(out)["aborted"]

    chat_server.down = False
    assert main(datagen_args(coco, out, *openai_args(chat_server), types=types)) == 0
    assert ids(out) == [f"{i}_{t}" for i in (1, 2, 3, 4) for t in types]
    for key, n in before.items():
        assert chat_server.counts[key] == n == 1


def test_one_refused_request_fails_alone_and_the_run_goes_on(tmp_path, chat_server, capsys):
    coco, out = make_coco(tmp_path / "coco", 3), tmp_path / "data.json"
    chat_server.inject("400")  # the first request only: e.g. a context over the model's limit
    args = datagen_args(coco, out, *openai_args(chat_server, workers=1), types=("complex",))
    main(args)
    assert len(ids(out)) == 2 and summary(out)["aborted"] is None
    assert summary(out)["remaining"] == 1
    assert main(args) == 0  # the rerun sends the failed request again, only that one
    assert len(ids(out)) == 3 and sum(chat_server.counts.values()) == 4


def test_workers_send_concurrently_through_the_library(tmp_path, chat_server):
    chat_server.latency = 0.2
    contexts = [ImageContext(str(i), f"{i}.png", (f"Scene {i}.",)) for i in range(8)]
    teacher = OpenAITeacher(ClientConfig(chat_server.url, "m", backoff=0.001))
    config = DatagenConfig(types=("complex",), workers=4, check_images=False)
    ticks = []
    start = time.monotonic()
    with Store(tmp_path / "s.sqlite") as store:
        result = run_datagen(
            contexts, teacher, store, tmp_path / "o.json", config, progress=ticks.append
        )
        elapsed = time.monotonic() - start
        key = Key("3", "complex", prompt_hash(build_messages("complex", contexts[3])), "openai:m")
        assert store.get(key).status == "done" and store.counts() == {"done": 8}
    assert elapsed < 1.2  # 8 x 0.2 s one at a time would be 1.6 s; 4 at a time 0.4 s
    assert result.per_type["complex"]["done"] == 8 and result.written == 8
    assert ticks[0]["total"] == 8 and ticks[-1]["done"] == 8


def test_screen_contexts_counts_reasons(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"x")
    good = ImageContext("1", "ok.png", ("A cup.",), (Box("cup", (0.1, 0.1, 0.2, 0.2)),))
    contexts = [
        good,
        good,
        ImageContext("2", "gone.png", ("A cup.",)),
        ImageContext("3", "ok.png", ("  ",)),
        ImageContext("4", "ok.png", ("A cup.",), (Box("cup", (0.5, 0.1, 0.2, 1.3)),)),
        ImageContext("5", "ok.png", ("A cup.",), (Box(" ", (0.1, 0.1, 0.2, 0.2)),)),
    ]
    skipped = Counter()
    assert screen_contexts(contexts, tmp_path, skipped) == [good]
    assert skipped == {"duplicate image id": 1, "image missing on disk": 1, "image without captions": 1,
                       "box out of range": 1, "unknown category": 1}  # fmt: skip


def test_kill_9_mid_run_then_resume_loses_nothing_and_resends_nothing(tmp_path, chat_server):
    coco, out = make_coco(tmp_path / "coco", 10), tmp_path / "data.json"
    chat_server.latency = 0.1
    workers = 2
    cmd = [
        sys.executable,
        "-m",
        "vistune.cli",
        *datagen_args(coco, out, *openai_args(chat_server, workers)),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(chat_server.bodies) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    with sqlite3.connect(str(out) + ".sqlite") as db:
        done = {h for (h,) in db.execute("SELECT prompt_hash FROM requests WHERE status='done'")}
    assert 4 <= len(done) < 30

    chat_server.latency = 0.0
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert ids(out) == [f"{i}_{t}" for i in range(1, 11) for t in TYPES]
    assert len(chat_server.counts) == 30
    for h in done:
        assert chat_server.counts[h] == 1  # answered before the kill: never sent again
    resent = [h for h, n in chat_server.counts.items() if n > 1]
    assert len(resent) <= workers and not set(resent) & done  # only the ones in flight
    assert (
        summary(out)["per_type"]["conversation"]["cached"]
        + summary(out)["per_type"]["conversation"].get("done", 0)
        == 10
    )


def test_pairs_make_brief_samples_only(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("image\tcaption\na.png\tA black square.\nmissing.png\tA cat.\nb.png\t\n")
    out = tmp_path / "brief.json"
    assert (
        main(["datagen", "--pairs", str(pairs), "--types", "brief,brief", "--out", str(out)]) == 0
    )
    (sample,) = json.loads(out.read_text())
    assert (
        sample["id"] == "a.png_brief" and sample["conversations"][1]["value"] == "A black square."
    )
    assert summary(out)["skipped"] == {"image missing on disk": 1, "empty caption": 1}
    args = ["datagen", "--pairs", str(pairs), "--types", "brief,detail", "--teacher", "rules"]
    assert main([*args, "--out", str(out)]) == 2
    assert "--pairs has captions only: use --types brief" in capsys.readouterr().err


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    coco = make_coco(tmp_path / "coco", 1)
    out = str(tmp_path / "o.json")
    assert main(datagen_args(coco, Path(out), types=("complex",))) == 2
    assert "needs a --teacher" in capsys.readouterr().err
    assert main(datagen_args(coco, Path(out), "--teacher", "openai", types=("complex",))) == 2
    assert "--teacher openai needs --model NAME" in capsys.readouterr().err
    assert main(["datagen", "--coco", str(tmp_path), "--types", "poem", "--out", out]) == 2
    assert "unknown --types poem" in capsys.readouterr().err
    assert main(["datagen", "--coco", str(tmp_path), "--types", "brief", "--out", out]) == 2
    assert "no annotations/ folder" in capsys.readouterr().err
    openai = ("--teacher", "openai", "--model", "m")
    args = datagen_args(coco, Path(out), *openai, "--base-url", "localhost:8000/v1",
                        types=("complex",))  # fmt: skip
    assert main(args) == 2
    assert "--base-url must start with http:// or https://" in capsys.readouterr().err
    for flag, value, message in (
        ("--backoff", "nan", "must be at least 0 and finite, got nan"),  # time.sleep(nan)
        ("--timeout", "nan", "must be above 0 and finite, got nan"),
        ("--timeout", "inf", "must be above 0 and finite, got inf"),
        ("--temperature", "nan", "must be at least 0 and finite, got nan"),
        ("--temperature", "-1", "must be at least 0 and finite, got -1.0"),
        ("--http-retries", "-1", "must be at least 0, got -1"),
        ("--max-tokens", "0", "must be at least 1, got 0"),
        ("--workers", "0", "must be at least 1, got 0"),
        ("--limit", "0", "must be at least 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exit_:  # argparse's one line, before any work
            main(datagen_args(coco, Path(out), *openai, flag, value, types=("complex",)))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {flag}: {message}" in err, flag


class TruncatingTeacher(Teacher):
    name = "fake"
    concurrent = False

    def respond(self, request):
        if request.context.image_id == "1":
            raise RejectedOutput("truncated", "8 new tokens", raw="Question: Why")
        return "Question: Why?\nAnswer: Because."


def test_answers_a_teacher_refuses_are_rejected_with_their_text(tmp_path):
    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2)]
    config = DatagenConfig(types=("complex",), workers=4, check_images=False)
    with Store(tmp_path / "s.sqlite") as store:
        result = run_datagen(contexts, TruncatingTeacher(), store, tmp_path / "o.json", config)
    assert dict(result.per_type["complex"]) == {"done": 1, "rejected": 1, "rejected: truncated": 1}
    (line,) = (tmp_path / "o.rejected.jsonl").read_text().splitlines()
    assert json.loads(line)["response"] == "Question: Why" and ids(tmp_path / "o.json") == [
        "2_complex"
    ]


def test_a_request_store_that_is_not_sqlite_is_a_clear_error(tmp_path):
    import pytest

    from vistune.errors import DataError

    path = tmp_path / "store.sqlite"
    path.write_text("not a database, but a text file of the same name\n" * 100)
    with pytest.raises(DataError, match="store.sqlite: not a vistune request store"):
        Store(path)


def test_an_interrupted_run_reports_what_is_left(tmp_path, chat_server):
    """Ctrl-C (KeyboardInterrupt) mid-run: the summary counts the request in flight and
    those queued as remaining, not 0."""

    class Interrupted(OpenAITeacher):
        calls = 0

        def respond(self, request):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt
            return super().respond(request)

    contexts = [ImageContext(str(i), f"{i}.png", (f"Scene {i}.",)) for i in range(5)]
    config = DatagenConfig(types=("complex",), workers=1, check_images=False)
    out = tmp_path / "o.json"
    import pytest

    with Store(tmp_path / "s.sqlite") as store, pytest.raises(KeyboardInterrupt):
        run_datagen(
            contexts,
            Interrupted(ClientConfig(chat_server.url, "m", backoff=0.001)),
            store,
            out,
            config,
        )
    assert len(ids(out)) == 2
    assert summary(out)["remaining"] == 3  # the third, in flight, and two never sent


def test_a_bad_local_teacher_folder_is_one_line_and_keeps_what_is_done(
    tmp_path, tiny_llm_dir, capsys
):
    """A missing folder stops before anything is read; weights that fail to load on first
    use stop the run with one line, the brief samples written and the request left to
    resend."""
    import shutil

    coco = make_coco(tmp_path / "coco", 2)
    out = tmp_path / "o.json"
    local = ("--teacher", "local", "--model-dir")
    assert main(datagen_args(coco, out, *local, str(tmp_path / "nope"))) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: teacher directory not found" in err
    assert "Traceback" not in err and not out.exists()
    broken = shutil.copytree(tiny_llm_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(datagen_args(coco, out, *local, str(broken))) == 2
    err = capsys.readouterr().err
    assert f"{broken}: cannot load the teacher" in err and "Traceback" not in err
    assert ids(out) == ["1_brief", "2_brief"]
    with sqlite3.connect(str(out) + ".sqlite") as db:
        assert db.execute("select status from requests").fetchall() == [("pending",)]


class LimitedTeacher(Teacher):
    """Cuts image 1's answer below 16 tokens (a long answer); image 2's is short."""

    name = "limited"
    concurrent = False

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.asked: list[str] = []

    def respond(self, request):
        self.asked.append(request.context.image_id)
        if request.context.image_id == "1" and self.max_tokens < 16:
            raise RejectedOutput("truncated", f"{self.max_tokens} new tokens", raw="Question: Why")
        return "Question: Why?\nAnswer: Because."


def test_a_larger_max_tokens_asks_again_only_the_answers_cut_at_the_old_limit(tmp_path):
    """Sampling settings are not part of the key, so finished answers are reused under any
    --max-tokens; but an answer rejected as truncated at 8 tokens is asked again when the
    run allows more (not when it allows the same or fewer)."""
    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2)]
    config = DatagenConfig(types=("complex",), check_images=False)
    out = tmp_path / "o.json"

    def run(limit: int) -> tuple[LimitedTeacher, dict]:
        teacher = LimitedTeacher(limit)
        with Store(tmp_path / "s.sqlite") as store:
            result = run_datagen(contexts, teacher, store, out, config)
        return teacher, dict(result.per_type["complex"])

    teacher, counts = run(8)
    assert teacher.asked == ["1", "2"] and counts["rejected: truncated"] == 1
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        stored = dict(db.execute("select image_id, request from requests").fetchall())
    assert json.loads(stored["1"])["max_tokens"] == 8
    for limit in (8, 4):
        teacher, counts = run(limit)
        assert teacher.asked == [] and counts["cached rejected"] == 1
    teacher, counts = run(32)
    assert teacher.asked == ["1"]
    assert counts == {"cached": 1, "done": 1}
    assert ids(out) == ["1_complex", "2_complex"]


def test_a_truncation_stored_without_its_limit_is_asked_again_once(tmp_path):
    """A store written before the limit was kept: a `truncated` row cannot say which limit
    cut it, so it is asked again (once: the new answer keeps its limit); other rejections
    stay answered."""
    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2)]
    config = DatagenConfig(types=("complex",), check_images=False)
    with Store(tmp_path / "s.sqlite") as store:
        run_datagen(contexts, LimitedTeacher(8), store, tmp_path / "o.json", config)
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        for (image_id,) in db.execute("select image_id from requests").fetchall():
            db.execute(
                "update requests set status='rejected', reason=?, request=json_remove(request, "
                "'$.max_tokens') where image_id=?",
                ("truncated" if image_id == "1" else "preamble", image_id),
            )
    teacher = LimitedTeacher(8)
    for asked in (["1"], []):
        teacher.asked = []
        with Store(tmp_path / "s.sqlite") as store:
            run_datagen(contexts, teacher, store, tmp_path / "o.json", config)
        assert teacher.asked == asked


def _stored(path: Path) -> dict[str, str]:
    from contextlib import closing

    with closing(sqlite3.connect(path)) as db:  # `with connect()` alone leaves it open
        return dict(db.execute("select image_id, status from requests").fetchall())


def test_a_store_locked_by_another_process_is_named_as_locked(tmp_path):
    """Not 'not a vistune request store': the cause, in one line, and the store untouched."""
    import pytest

    from vistune.errors import DataError

    path = tmp_path / "s.sqlite"
    contexts = [ImageContext("1", "1.png", ("A cup.",))]
    config = DatagenConfig(types=("complex",), check_images=False)
    with Store(path) as store:
        run_datagen(contexts, LimitedTeacher(32), store, tmp_path / "o.json", config)
    for journal in ("wal", "delete"):  # a WAL store, and one some tool switched back
        other = sqlite3.connect(path, isolation_level=None)
        other.execute(f"PRAGMA journal_mode={journal}")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(DataError, match="locked by another process") as err:
            with Store(path, busy_timeout=0.05) as store:
                run_datagen(contexts, LimitedTeacher(32), store, tmp_path / "o.json", config)
        assert "not a vistune request store" not in str(err.value)
        other.execute("ROLLBACK")
        other.close()
        assert _stored(path) == {"1": "done"}


def test_a_lock_during_a_run_stops_it_with_one_error_and_keeps_every_answer(tmp_path):
    """Another process takes the store's write lock while the second answer is on its way:
    the run stops with a DataError naming the lock (no sqlite3 traceback), the first answer
    stays in the store and in the output, and a rerun once the lock is gone finishes."""
    import pytest

    from vistune.errors import DataError

    path = tmp_path / "s.sqlite"
    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2, 3)]
    config = DatagenConfig(types=("complex",), check_images=False)
    holder: list[sqlite3.Connection] = []

    class Locking(LimitedTeacher):
        def respond(self, request):
            if request.context.image_id == "2":
                other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                other.execute("BEGIN EXCLUSIVE")
                holder.append(other)
            return super().respond(request)

    out = tmp_path / "o.json"
    with Store(path, busy_timeout=0.05) as store:
        with pytest.raises(DataError, match="locked by another process") as err:
            run_datagen(contexts, Locking(32), store, out, config)
    assert "Wrote 1 finished samples" in str(err.value)
    assert ids(out) == ["1_complex"] and "locked" in summary(out)["aborted"]
    holder[0].execute("ROLLBACK")
    holder[0].close()
    assert _stored(path) == {"1": "done", "2": "pending"}
    teacher = LimitedTeacher(32)
    with Store(path) as store:
        run_datagen(contexts, teacher, store, out, config)
    assert teacher.asked == ["2", "3"] and len(ids(out)) == 3


def test_a_read_only_store_is_named_as_read_only(tmp_path, monkeypatch):
    import pytest

    from vistune.datagen import store as store_module
    from vistune.errors import DataError

    path = tmp_path / "s.sqlite"
    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2)]
    config = DatagenConfig(types=("complex",), check_images=False)
    with Store(path) as store:
        run_datagen(contexts[:1], LimitedTeacher(32), store, tmp_path / "o.json", config)
    connect = sqlite3.connect  # as a file the user cannot write (tests may run as root)
    monkeypatch.setattr(
        store_module.sqlite3,
        "connect",
        lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw),
    )
    with pytest.raises(
        DataError, match="s.sqlite: cannot write the request store: it is read-only"
    ):
        with Store(path) as store:
            run_datagen(contexts, LimitedTeacher(32), store, tmp_path / "o.json", config)
    monkeypatch.undo()
    assert _stored(path) == {"1": "done"}


def test_a_database_of_another_program_is_not_a_store(tmp_path):
    import pytest

    from vistune.errors import DataError

    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("create table requests (id integer primary key, url text)")
    with pytest.raises(DataError, match=r"not a vistune request store \(table requests lacks"):
        Store(path)
    with pytest.raises(DataError, match="cannot open the request store"):
        Store(tmp_path)  # a folder


def test_an_out_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    coco = make_coco(tmp_path / "coco", 1)
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(datagen_args(coco, folder, "--teacher", "rules")) == 2
    err = capsys.readouterr().err
    assert f"--out {folder} is a folder, not a file" in err and "Traceback" not in err
    assert not Path(str(folder) + ".sqlite").exists()


def test_outputs_that_cannot_be_written_are_one_error_and_the_answers_stay_stored(tmp_path):
    import pytest

    from vistune.errors import DataError

    contexts = [ImageContext(str(i), f"{i}.png", ("A cup.",)) for i in (1, 2)]
    config = DatagenConfig(types=("complex",), check_images=False)
    out = tmp_path / "o.json"
    (tmp_path / "o.summary.json").mkdir()  # something in the way of one output
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(DataError, match=r"o.summary.json: cannot write the outputs"):
            run_datagen(contexts, LimitedTeacher(32), store, out, config)
    assert _stored(tmp_path / "s.sqlite") == {"1": "done", "2": "done"}


def test_a_stored_answer_takes_the_image_path_of_this_run(tmp_path):
    """The teacher never sees the image path, so a stored answer is reused when the images
    moved (another split folder or --image-root layout); its sample must point at where
    the image is now, not where it was."""
    config = DatagenConfig(types=("complex",), check_images=False)
    out = tmp_path / "o.json"
    for folder, asked in (("train", ["1"]), ("train2014", [])):
        teacher = LimitedTeacher(32)
        contexts = [ImageContext("1", f"{folder}/1.png", ("A cup.",))]
        with Store(tmp_path / "s.sqlite") as store:
            run_datagen(contexts, teacher, store, out, config)
        assert teacher.asked == asked
        assert [s["image"] for s in json.loads(out.read_text())] == [f"{folder}/1.png"]

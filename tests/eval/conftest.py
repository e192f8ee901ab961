"""Fixtures for the evaluation tests: a scripted judge on loopback and a ScienceQA release.

`ScriptedJudge` is the datagen tests' loopback chat-completions server (`FakeChatServer`)
with replies scripted per question: the first script key found in the request's last
message picks a queue, and each request pops its next entry: a string is answered as HTTP
200 with that content, an int as that HTTP status with an error body. An exhausted or
unmatched queue answers `default` (or `default(messages)` when it is a function). With
`dies_after` N, request N + 1 and every later one get HTTP 503: an endpoint that went down.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from ..datagen.conftest import FakeChatServer

Reply = str | int | Callable[[list[dict]], str | int]


class ScriptedJudge(FakeChatServer):
    def __init__(
        self,
        script: dict[str, list[str | int]],
        default: Reply = "5 5",
        dies_after: int | None = None,
    ) -> None:
        self.script = {k: deque(v) for k, v in script.items()}
        self.default = default
        self.dies_after = dies_after
        super().__init__(self._scripted)

    @property
    def requests(self) -> list[dict]:
        return self.bodies

    def asked(self, key: str) -> int:
        """How many requests mentioned `key` in their last message."""
        return sum(key in r["messages"][-1]["content"] for r in self.requests)

    def _scripted(self, messages: list[dict]) -> str | int:
        text = messages[-1]["content"]
        with self.lock:
            if self.dies_after is not None and len(self.bodies) > self.dies_after:
                return 503
            queue = next((q for k, q in self.script.items() if k in text), None)
            if queue:
                return queue.popleft()
        return self.default(messages) if callable(self.default) else self.default


@pytest.fixture
def scripted_judge():
    servers: list[ScriptedJudge] = []

    def make(
        script: dict[str, list[str | int]], default: Reply = "5 5", dies_after: int | None = None
    ) -> ScriptedJudge:
        servers.append(ScriptedJudge(script, default, dies_after))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# (pid, subject, hint, image, grade, answer, n_choices) -- the 10 test problems of the
# ScienceQA fixture; their memberships are spelled out in test_scienceqa.py.
SQA_TEST = [
    ("1", "natural science", "", "image.png", "grade3", 0, 2),
    ("2", "natural science", "A hint.", "image.png", "grade8", 1, 3),
    ("3", "natural science", "", None, "grade5", 2, 4),
    ("4", "social science", "A hint.", None, "grade4", 0, 2),
    ("5", "social science", "", "image.png", "grade10", 1, 2),
    ("6", "social science", "", None, "grade7", 1, 3),
    ("7", "language science", "A hint.", None, "grade2", 0, 2),
    ("8", "language science", "", None, "grade6", 1, 2),
    ("9", "language science", "A hint.", "image.png", "grade12", 3, 4),
    ("10", "natural science", "", None, "grade9", 0, 2),
]


@pytest.fixture
def sqa_files(tmp_path: Path) -> tuple[Path, Path]:
    """problems.json + pid_splits.json in the release format (10 test + 1 train problem)."""
    root = tmp_path
    problems = {}
    rows = [*SQA_TEST, ("11", "natural science", "", None, "grade1", 0, 2)]
    for pid, subject, hint, image, grade, answer, n in rows:
        problems[pid] = {
            "question": f"Which is right for item {pid}?",
            "choices": [f"choice {pid}-{i}" for i in range(n)],
            "answer": answer,
            "hint": hint,
            "image": image,
            "task": "closed choice",
            "grade": grade,
            "subject": subject,
            "topic": "topic",
            "category": "category",
            "skill": "skill",
            "lecture": f"Lecture {pid}.",
            "solution": f"Solution {pid}.",
            "split": "train" if pid == "11" else "test",
        }
    splits = {"train": ["11"], "val": [], "test": [r[0] for r in SQA_TEST]}
    p, s = root / "problems.json", root / "pid_splits.json"
    p.write_text(json.dumps(problems))
    s.write_text(json.dumps(splits))
    return p, s


@pytest.fixture
def write_jsonl():
    def write(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return write

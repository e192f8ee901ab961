"""ScienceQA (Lu et al., 2022) in its official release format, as instruction data and as
evaluation prompts (paper §5.2, Tables 7-8).

The release is `problems.json` (pid -> {question, choices, answer (index), hint, image
(file name or null), task, grade ("grade1".."grade12"), subject, topic, category, skill,
lecture, solution, split}) and `pid_splits.json` (split name -> list of pids); images live
under `<image_root>/<pid>/<image>` (or `<image_root>/<split>/<pid>/<image>`).

The instruction follows the paper's setup: LLaVA's ScienceQA conversion in its "QCM" input
order (question, context, options: `--prompt-format QCM-LEA` in LLaVA's docs/ScienceQA.md,
with scripts/convert_sqa_to_llava.py's leading "Question: " removed)::

    <question>
    Context: <hint, or N/A when empty>
    Options: (A) <choice 0> (B) <choice 1> ...

With an image, the first user turn is "<image>\\n" + that text. The answer formats
(Table 8): `reasoning-first` = "<lecture> <solution> The answer is X." (LLaVA's LEA);
`answer-first` = "The answer is X. BECAUSE: <lecture> <solution>" (ALE); an empty
lecture or solution is left out.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vistune.data.conversation import IMAGE_PLACEHOLDER
from vistune.data.records import load_json
from vistune.errors import DataError

OPTIONS = "ABCDE"
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_REQUIRED = ("question", "choices", "answer")


@dataclass(frozen=True)
class ScienceQAProblem:
    pid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice (0 = A)."""
    hint: str = ""
    image: str | None = None
    """Image file name from the release (e.g. "image.png"), None for text-only problems."""
    image_rel: str | None = None
    """Image path relative to the image root (LLaVA's `<pid>/<image>`)."""
    image_path: Path | None = None
    """Absolute image path when an image root was given."""
    grade: str = ""
    subject: str = ""
    topic: str = ""
    category: str = ""
    skill: str = ""
    task: str = ""
    lecture: str = ""
    solution: str = ""
    split: str = ""

    @property
    def answer_letter(self) -> str:
        return OPTIONS[self.answer]

    @property
    def has_text(self) -> bool:
        """Official TXT column: the hint is non-empty (an image may be present too)."""
        return bool(self.hint)

    @property
    def has_image(self) -> bool:
        """Official IMG column: the problem has an image (a hint may be present too)."""
        return bool(self.image)

    @property
    def no_context(self) -> bool:
        """Official NO column: neither hint nor image."""
        return not self.hint and not self.image

    @property
    def grade_number(self) -> int | None:
        m = re.fullmatch(r"grade(\d+)", self.grade)
        return int(m.group(1)) if m else None


def _problem(pid: str, raw: object, split: str, problems: Path) -> ScienceQAProblem:
    if not isinstance(raw, dict):
        raise DataError(f"ScienceQA {problems}: problem {pid} is not an object")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise DataError(f"ScienceQA {problems}: problem {pid} lacks {', '.join(missing)}")
    choices = raw["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTIONS):
        raise DataError(f"ScienceQA {problems}: problem {pid} needs 2-{len(OPTIONS)} choices")
    answer = raw["answer"]
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(
            f"ScienceQA {problems}: problem {pid} has answer {answer!r} "
            f"outside its {len(choices)} choices"
        )
    image = raw.get("image") or None
    return ScienceQAProblem(
        pid=pid,
        question=str(raw["question"]),
        choices=tuple(str(c) for c in choices),
        answer=answer,
        hint=str(raw.get("hint") or ""),
        image=image,
        image_rel=f"{pid}/{image}" if image else None,
        grade=str(raw.get("grade") or ""),
        subject=str(raw.get("subject") or ""),
        topic=str(raw.get("topic") or ""),
        category=str(raw.get("category") or ""),
        skill=str(raw.get("skill") or ""),
        task=str(raw.get("task") or ""),
        lecture=str(raw.get("lecture") or ""),
        solution=str(raw.get("solution") or ""),
        split=str(raw.get("split") or split),
    )


def _listed(ids: list[str], limit: int = 20) -> str:
    more = f" ... and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def _with_image(p: ScienceQAProblem, image_root: Path) -> ScienceQAProblem | None:
    for rel in (f"{p.pid}/{p.image}", f"{p.split}/{p.pid}/{p.image}"):
        try:
            found = (image_root / rel).is_file()
        except OSError:  # a name too long, a folder we may not read: missing
            continue
        if found:
            return dataclasses.replace(p, image_rel=rel, image_path=image_root / rel)
    return None


def load_scienceqa(
    problems: Path,
    splits: Path,
    split: str,
    image_root: Path | None = None,
    strict_images: bool = True,
    skipped: Counter | None = None,
) -> list[ScienceQAProblem]:
    """The problems of one split, in pid_splits order.

    Raises DataError (naming the file and the offending pids) for a missing/malformed file,
    an unknown split, pids listed twice or absent from problems.json, and, with
    `image_root`, problems whose image file is not there. With `strict_images=False` those
    are kept instead (image_rel `<pid>/<image>`, image_path None) for a training loader
    that skips and counts rows whose image is missing. A malformed problem (missing keys,
    bad choices, an answer out of range) raises too, unless `skipped` is given: then it
    is left out and counted there as `malformed`.
    """
    problems, splits = Path(problems), Path(splits)
    all_problems = load_json(problems)
    all_splits = load_json(splits)
    if not isinstance(all_problems, dict) or not isinstance(all_splits, dict):
        raise DataError(f"ScienceQA files must hold JSON objects: {problems}, {splits}")
    if split not in all_splits:
        raise DataError(f"split {split!r} not in {splits}; valid: {', '.join(sorted(all_splits))}")
    if not isinstance(all_splits[split], list):
        raise DataError(f"split {split!r} in {splits} is not a list of pids")
    pids = [str(p) for p in all_splits[split]]
    if not pids:
        raise DataError(f"split {split!r} in {splits} is empty")
    dups = [pid for pid, n in Counter(pids).items() if n > 1]
    if dups:
        raise DataError(f"split {split!r} in {splits} lists pids twice: {_listed(dups)}")
    absent = [p for p in pids if p not in all_problems]
    if absent:
        raise DataError(f"pids of split {split!r} missing from {problems}: {_listed(absent)}")
    out = []
    for pid in pids:
        try:
            out.append(_problem(pid, all_problems[pid], split, problems))
        except DataError:
            if skipped is None:
                raise
            skipped["malformed"] += 1
    if image_root is None:
        return out
    image_root = Path(image_root)
    resolved, missing = [], []
    for p in out:
        if p.image is None:
            resolved.append(p)
            continue
        found = _with_image(p, image_root)
        if found is None:
            missing.append(p.pid)
        resolved.append(found or p)
    if missing and strict_images:
        raise DataError(f"images missing under {image_root} for pids: {_listed(missing)}")
    return resolved


def build_question(problem: ScienceQAProblem) -> str:
    """The instruction text (without the image placeholder); format in the module docstring."""
    context = problem.hint.strip() or "N/A"
    options = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem.choices))
    return f"{problem.question.strip()}\nContext: {context}\nOptions: {options}"


def build_instruction(problem: ScienceQAProblem) -> str:
    """The first user turn: "<image>\\n" + build_question when the problem has an image."""
    text = build_question(problem)
    return f"{IMAGE_PLACEHOLDER}\n{text}" if problem.has_image else text


def _reasoning(problem: ScienceQAProblem) -> str:
    return " ".join(part.strip() for part in (problem.lecture, problem.solution) if part.strip())


def _reasoning_first(problem: ScienceQAProblem) -> str:
    answer = f"The answer is {problem.answer_letter}."
    reasoning = _reasoning(problem)
    return f"{reasoning} {answer}" if reasoning else answer


def _answer_first(problem: ScienceQAProblem) -> str:
    answer = f"The answer is {problem.answer_letter}."
    reasoning = _reasoning(problem)
    return f"{answer} BECAUSE: {reasoning}" if reasoning else answer


ANSWER_FORMATS: dict[str, Callable[[ScienceQAProblem], str]] = {
    "reasoning-first": _reasoning_first,
    "answer-first": _answer_first,
}


def build_answer(problem: ScienceQAProblem, answer_format: str = "reasoning-first") -> str:
    """The supervised answer in one of ANSWER_FORMATS (paper Table 8)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"unknown answer_format {answer_format!r}; valid: {', '.join(ANSWER_FORMATS)}"
        )
    return ANSWER_FORMATS[answer_format](problem)


def to_llava_sample(problem: ScienceQAProblem, answer_format: str = "reasoning-first") -> dict:
    """A single-turn LLaVA JSON sample: {id, image?, conversations: [human, gpt]}."""
    sample: dict = {"id": problem.pid}
    if problem.has_image:
        sample["image"] = problem.image_rel
    sample["conversations"] = [
        {"from": "human", "value": build_instruction(problem)},
        {"from": "gpt", "value": build_answer(problem, answer_format)},
    ]
    return sample

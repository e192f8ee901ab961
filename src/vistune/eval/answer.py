"""Batched, resumable answering of a LLaVA-Bench-format question file (paper §5.1).

Each question {question_id, image, text, ...} becomes one single-turn request, the image
placeholder first as in LLaVA's model_vqa.py ("<image>\\n" + text; no placeholder for a
question without an image), answered through `vistune.serve.engine.Engine.answer_batch`.
Answers are appended to `<out>.partial` as each batch finishes (an interrupted run
resumes from it and never answers a question twice), then written atomically to `out` in
question order as LLaVA-Bench answer lines {question_id, prompt, text, answer_id,
model_id, metadata}.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from vistune.config import GenerationConfig
from vistune.errors import VistuneError
from vistune.eval.report import atomic_write_text, list_ids

IMAGE_PLACEHOLDER = "<image>"
"""Same string as vistune.data.conversation.IMAGE_PLACEHOLDER."""


class AnswerEngine(Protocol):
    def answer_batch(self, requests: list[tuple[list[dict], Any]], config: GenerationConfig
                     ) -> list[str]: ...  # fmt: skip


def require_engine() -> None:
    """A clear error when the generation engine is not part of this build."""
    if importlib.util.find_spec("vistune.serve.engine") is None:
        raise VistuneError(
            "answering needs the generation engine (vistune.serve.engine), which "
            "this build lacks; answer elsewhere and pass the answers file"
        )


def load_engine(model: str | Path, batch_size: int = 8) -> AnswerEngine:
    """`vistune.model.load_model(model)` (a folder or "default") in the serving engine (bf16).

    Loaded in bf16 directly, as `vistune chat` does: an fp32 load cast afterwards holds both
    copies at once (28 GB for a 7B LLM)."""
    require_engine()
    import torch

    from vistune.model import load_model
    from vistune.serve.engine import Engine

    return Engine(load_model(model, dtype=torch.bfloat16), batch_size=batch_size)


def messages_for(question: dict) -> list[dict]:
    text = str(question["text"])
    if question.get("image"):
        text = f"{IMAGE_PLACEHOLDER}\n{text}"
    return [{"role": "user", "content": text}]


def check_images(questions: Sequence[dict], image_root: Path) -> None:
    missing = [str(q["question_id"]) for q in questions
               if q.get("image") and not (image_root / str(q["image"])).is_file()]  # fmt: skip
    if missing:
        raise VistuneError(f"images missing under {image_root} for question ids: "
                           f"{list_ids(missing)}")  # fmt: skip


def _done(partial: Path) -> dict[str, dict]:
    """Answers already in the partial file (a torn last line from a kill is ignored)."""
    done = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[str(row["question_id"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return done


def answer_questions(
    engine: AnswerEngine,
    questions: Sequence[dict],
    image_root: Path,
    out: Path,
    config: GenerationConfig,
    model_id: str,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Answer every question not yet in `<out>.partial`, then write `out`; returns its rows."""
    from vistune.data.image import load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_images(questions, image_root)
    partial = out.with_name(out.name + ".partial")
    done = _done(partial)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    if progress is not None and len(done):
        progress(len(questions) - len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            requests = [(messages_for(q), load_image(image_root / q["image"]) if q.get("image")
                         else None) for q in batch]  # fmt: skip
            texts = engine.answer_batch(requests, config)
            for q, text in zip(batch, texts, strict=True):
                row = {"question_id": q["question_id"], "prompt": q["text"], "text": text.strip(),
                       "answer_id": f"{model_id}-{q['question_id']}", "model_id": model_id,
                       "metadata": {"max_new_tokens": config.max_new_tokens,
                                    "temperature": config.temperature}}  # fmt: skip
                done[str(q["question_id"])] = row
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            if progress is not None:
                progress(len(batch))
    rows = [done[str(q["question_id"])] for q in questions]
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    partial.unlink(missing_ok=True)
    return rows

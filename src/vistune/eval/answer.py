"""Batched, resumable answering of a LLaVA-Bench-format question file (paper §5.1).

Each question {question_id, image, text, ...} becomes one single-turn request, the image
placeholder first as in LLaVA's model_vqa.py ("<image>\\n" + text; no placeholder for a
question without an image), answered through `vistune.serve.engine.Engine.answer_batch`.
Answers are appended to `<out>.partial` as each batch finishes, each with the key of its
request (vistune.eval.journal: the model, the generation settings, the image and the
messages), then written atomically to `out` in question order as LLaVA-Bench answer lines
{question_id, prompt, text, answer_id, model_id, metadata}. An interrupted run resumes
from the partial file and never answers a question twice; an answer made for another
request (another model, --max-new-tokens, temperature, text or image) is answered again.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from vistune.config import AT_LEAST_1, GenerationConfig
from vistune.data.conversation import IMAGE_PLACEHOLDER
from vistune.data.records import list_ids, read_journal
from vistune.errors import VistuneError
from vistune.eval.journal import appender, prompt_key, requester_id
from vistune.files import write_jsonl


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


def load_engine(
    model: str | Path, batch_size: int = 8, template: str | None = None
) -> AnswerEngine:
    """`vistune.model.load_model(model)` (a folder or "default") in the serving engine (bf16).

    Loaded in bf16 directly, as `vistune chat` does: an fp32 load cast afterwards holds both
    copies at once (28 GB for a 7B LLM). `template`: a conversation template instead of the
    model's own (a stage-1 model's `plain` never shows the question)."""
    require_engine()
    import torch

    from vistune.model import load_model, model_notes
    from vistune.serve.engine import Engine

    loaded = load_model(model, dtype=torch.bfloat16)
    for note in model_notes(loaded, model, template):
        print(f"vistune: note: {note}", file=sys.stderr)
    return Engine(loaded, batch_size=batch_size, template=template)


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


def request_key(question: dict, config: GenerationConfig, model_key: str, model_id: str) -> str:
    """What an answer was made for: the model (and the id its rows carry), the settings
    that change it, the image and the messages (the seed only matters when sampling)."""
    settings = {"model_id": model_id, "max_new_tokens": config.max_new_tokens,
                "temperature": config.temperature, "top_p": config.top_p,
                "stop": list(config.stop)}  # fmt: skip
    if config.temperature > 0:
        settings["seed"] = config.seed
    image = question.get("image")
    messages = [{"image": str(image) if image else None}, *messages_for(question)]
    return prompt_key(messages, requester_id(model_key, **settings))


def _done(partial: Path, keys: dict[str, str]) -> dict[str, dict]:
    """question id -> answer row in the partial file made for the request now asked
    (`keys`, by question id). Lines from an older vistune (no key), for another request,
    torn by a kill or not JSON are skipped: their questions are answered again."""
    done = {}
    for record in read_journal(partial):
        row = record.get("row")
        if isinstance(row, dict) and "question_id" in row and isinstance(row.get("text"), str):
            qid = str(row["question_id"])
            if record.get("request_key") == keys.get(qid):
                done[qid] = row
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
    model_key: str | None = None,
) -> list[dict]:
    """Answer every question not yet in `<out>.partial`, then write `out`; returns its rows.

    `model_key` tells models apart for resuming (default `model_id`; give the full path
    where two models may share a folder name)."""
    from vistune.data.image import load_image

    AT_LEAST_1.check("batch_size", batch_size)
    check_images(questions, image_root)
    partial = out.with_name(out.name + ".partial")
    model_key = model_id if model_key is None else model_key
    keys = {str(q["question_id"]): request_key(q, config, model_key, model_id)
            for q in questions}  # fmt: skip
    done = _done(partial, keys)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    if progress is not None and len(done):
        progress(len(questions) - len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    with appender(partial) as log:
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
                log({"request_key": keys[str(q["question_id"])], "row": row})
            if progress is not None:
                progress(len(batch))
    rows = [done[str(q["question_id"])] for q in questions]
    write_jsonl(out, rows)
    partial.unlink(missing_ok=True)
    return rows

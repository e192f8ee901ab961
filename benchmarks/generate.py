"""Generation speed: time to first token with an image, and decode tokens/s (issue 2 item 11).

    .venv/bin/python benchmarks/generate.py --threads 1 --write

Model: the packaged default (DINOv2 ViT-S/14 at 224 px -> 256 image tokens, SmolLM2-135M
Instruct, `load_model("default")`), asked about skimage's astronaut photo. Rows:

- vistune bf16 / fp32: `Engine` (preprocess + tower + projector + splice + prefill + our
  decode loop, vistune.serve.generate), the LLM cast to that dtype;
- vistune fp32 + bf16 autocast: fp32 weights, forward passes under CPU autocast;
- transformers generate fp32: a plain `AutoModelForCausalLM` on the same LLM weights,
  `generate(input_ids, do_sample=False)` with a text prompt of the same length (the image
  span filled with text tokens); it has no image tower to run, so its first token is a
  lower bound for any LLaVA built on it.

Time to first token (TTFT) = from the PIL image and messages to the first sampled token.
Decode tokens/s = (N - 1) / (time for N tokens - TTFT). EOS and stop strings are off so
every row generates exactly N tokens. Each figure is the median of --repeats runs after a
warm-up round; the setups take turns (round-robin) so that other jobs on a shared machine
slow them alike. `--write` puts the table into docs/PERFORMANCE.md's "## Generation" section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
QUESTION = "What is happening in this picture? Describe it in detail."
TTFT_GOAL_S = 0.3
DECODE_GOAL_RATIO = 1.5


@dataclass
class Row:
    name: str
    ttft_s: float  # median
    decode_tps: float  # median
    ttft_best_s: float  # fastest run: the least disturbed by other jobs


def photo(name: str):
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def engine_run(engine, image, n: int, generator=None) -> Callable[[], tuple[float, float]]:
    """One timed request through Engine.prepare + the decode loop: (TTFT s, decode tok/s)."""
    from vistune.config import GenerationConfig

    gen = generator or engine.generator
    gen.eos = set()  # exactly n tokens per run
    config = GenerationConfig(max_new_tokens=n)
    messages = [{"role": "user", "content": QUESTION}]

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        inputs = engine.prepare([(messages, image)])
        steps = gen.steps(inputs.inputs_embeds, inputs.attention_mask, config)
        next(steps)
        first = time.perf_counter()
        count = 1 + sum(1 for _ in steps)
        end = time.perf_counter()
        if count != n:
            raise RuntimeError(f"expected {n} tokens, got {count}")
        return first - start, (n - 1) / (end - first)

    return run


def transformers_run(llm_dir: Path, length: int, n: int) -> Callable[[], tuple[float, float]]:
    """transformers' own generate in fp32 on a text prompt of `length` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    text = tokenizer.encode(QUESTION + " A photo of a person in a space suit.")
    ids = torch.tensor([(text * (length // len(text) + 1))[:length]])  # (1, length)
    mask = torch.ones_like(ids)

    def generate(tokens: int) -> float:
        start = time.perf_counter()
        out = llm.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens,
            min_new_tokens=tokens, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        assert out.shape[1] == length + tokens
        return time.perf_counter() - start

    def run() -> tuple[float, float]:
        one, full = generate(1), generate(n)
        return one, (n - 1) / (full - one)

    return run


def measure(args: argparse.Namespace) -> tuple[list[Row], int]:
    """Build every setup, then time them round-robin so load changes hit all alike."""
    from vistune.model import load_model
    from vistune.serve.engine import Engine
    from vistune.serve.generate import Generator
    from vistune.weights import ensure_default_weights

    weights = ensure_default_weights()
    image = photo(args.image)
    n = args.tokens
    bf16 = Engine(load_model("default", dtype=torch.bfloat16), dtype=torch.bfloat16)
    fp32 = Engine(load_model("default", dtype=torch.float32), dtype=torch.float32)
    amp = Generator(fp32.model.llm, fp32.tokenizer, autocast=torch.bfloat16)
    messages = [{"role": "user", "content": QUESTION}]
    length = bf16.prepare([(messages, image)]).inputs_embeds.shape[1]
    setups = {
        "vistune bf16 (default)": engine_run(bf16, image, n),
        "vistune fp32": engine_run(fp32, image, n),
        "vistune fp32 + bf16 autocast": engine_run(fp32, image, n, generator=amp),
        "transformers generate fp32 (LLM only)": transformers_run(weights.llm_dir, length, n),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    for repeat in range(args.repeats + 1):
        for name, run in setups.items():
            result = run()
            if repeat:  # round 0 warms up
                times[name].append(result)
    rows = [
        Row(
            name,
            statistics.median(t for t, _ in results),
            statistics.median(r for _, r in results),
            min(t for t, _ in results),
        )
        for name, results in times.items()
    ]
    return rows, length


def table(rows: list[Row]) -> str:
    ref = rows[-1]
    lines = [
        "| setup | first token (s) | fastest first token (s) | decode tok/s | decode vs transformers |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = r.decode_tps / ref.decode_tps
        lines.append(
            f"| {r.name} | {r.ttft_s:.3f} | {r.ttft_best_s:.3f} | {r.decode_tps:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


def section(rows: list[Row], length: int, args: argparse.Namespace) -> str:
    ours = rows[0]
    ratio = ours.decode_tps / rows[-1].decode_tps
    ttft_ok = "met" if ours.ttft_s <= TTFT_GOAL_S else "not met"
    decode_ok = "met" if ratio >= DECODE_GOAL_RATIO else "not met"
    command = " ".join(["python", "benchmarks/generate.py", *sys.argv[1:]])
    return f"""## Generation

What it measures: time to first token with an image, and decode speed, of the default
model (DINOv2 ViT-S/14 at 224 px -> 256 image tokens + SmolLM2-135M-Instruct) through the
`Engine` that the chat CLI, the API and the web UI use; beside it, transformers' own
`generate` on the same LLM weights (fp32, greedy, a text prompt of the same length), in
the same run.

```
.venv/bin/{command}
```

Prompt: {length} positions (chat template + skimage's `{args.image}` photo as 256 image
tokens + one question); {args.tokens} new tokens, EOS and stop strings off; median of
{args.repeats} runs after a warm-up, the setups taking turns. First token counts image
preprocessing, the vision tower, the projector, splicing and the prefill.
Machine: the development machine ({os.cpu_count()} CPU cores shared with other jobs,
AVX-512 BF16/AMX), torch {torch.__version__}, {torch.get_num_threads()} torch thread(s),
{date.today().isoformat()}:

{table(rows)}

Goals (judged on the medians): first token <= {TTFT_GOAL_S} s with 256 image tokens
({ttft_ok}: {ours.ttft_s:.3f} s, fastest run {ours.ttft_best_s:.3f} s); decode >=
{DECODE_GOAL_RATIO}x transformers' generate ({decode_ok}: {ratio:.2f}x).

Where the time goes (torch.profiler, 1 thread, bf16): a decode step takes about 43 ms, of
which 32 ms is `torch.mv` reading the 268 MB of bf16 weights (about 8 GB/s: decode is
bound by memory bandwidth, so bf16 can at best halve fp32's step); the first token is
about 50 ms of vision tower plus about 250 ms of prefill over {length} positions (120 ms
matrix products on AMX, 50 ms attention, the rest element-wise). Runs on this shared
machine vary by 10-30% with the other jobs' load.

Why it is faster: the LLM runs with bf16 weights (matrix products on the CPU's bf16/AMX
units: the prefill is about 3x faster than in fp32), and for Llama-family LLMs the whole
loop runs in `vistune.serve.decoder`: the model's own weights with q/k/v and gate/up
fused, a KV cache allocated once (transformers' DynamicCache concatenates the whole cache
every step), and for one-row decode steps `torch.mv` with an fp32 residual stream (for one
row, bf16 `mm` is slower than fp32 while bf16 `mv` reads half the bytes). bf16 autocast
over fp32 weights is the slowest option for decode (every weight is cast on every step),
so the engine casts the weights once instead; `vistune chat --dtype fp32` keeps fp32.
Threads: on this shared 2-core machine, 2 torch threads run many times slower than 1
whenever other jobs are busy, hence `--threads 1` (also a `vistune chat` flag).
"""


def write_section(text: str) -> None:
    """Replace (or add) the "## Generation" section of docs/PERFORMANCE.md, atomically."""
    from vistune.files import write_text

    doc = DOC.read_text() if DOC.exists() else "# Performance\n"
    start = doc.find("\n## Generation\n")
    if start < 0:
        new = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + 1)
        new = doc[: start + 1] + text + ("" if end < 0 else "\n" + doc[end + 1 :])
    write_text(DOC, new.rstrip("\n") + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--image", default="astronaut", help="skimage.data photo name")
    parser.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, length = measure(args)
    print(table(rows))
    if args.write:
        write_section(section(rows, length, args))
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving speed through the HTTP API (issue 18 item 4), beside references from the same run.

    .venv/bin/python benchmarks/serve.py --threads 2 [--write]

A real `vistune serve` app (uvicorn in this process, on loopback) over the packaged default
model (DINOv2 ViT-S/14 at 224 px -> 256 image tokens, SmolLM2-135M-Instruct, bf16), asked
about skimage's astronaut photo by streaming HTTP clients. EOS and stop strings are off so
every answer is exactly --tokens long. Figures and their goals:

- batching: 8 concurrent clients' aggregate tokens/s over one client's (goal >= 3x);
- prefix reuse: first-token time of a follow-up turn cold (prefix cache cleared) over the
  same request warm (goal >= 3x);
- one stream's decode tokens/s through the server over the engine's own decode loop on the
  same prompt (Generator.steps, no HTTP, no scheduler; after the server stopped, on a thread
  of its own, as the server decodes on one: vistune.serve.threads): the server's own
  per-step cost;
- one stream's decode tokens/s over llama.cpp's on the same LLM (llama-cpp-python on the
  packaged GGUF file, --threads threads; goal >= 0.5x). Optional: without the `llamacpp`
  extra (`pip install -e '.[llamacpp]'`, which builds llama.cpp: minutes) the row says so;
- the same decode with `--quantize int8` and `--quantize int4` (weight-only int8 / int4
  decode steps) over llama.cpp's, and how many of the questions' greedy answers equal
  bf16's (the difference stated);
- first token with an image, cold (goal <= 0.2 s); again for a model built the way `vistune
  demo` builds its own (its image size, projector and template, read from the demo's
  commands; a fresh projector, as fast as a trained one): 126 px, 81 image tokens against
  the default's 256;
- the same cold first token's matrix products and attention alone (`product_floor`: every
  linear, convolution and attention call of one cold request, recorded and replayed back to
  back on the same tensors, nothing between them): no design of the serving path around
  these kernels answers sooner. Beside it, the whole request, in-process (no HTTP).

Each figure is the median of --repeats runs; the CPU (model name, cores, load) is printed
with them. `--write` puts the table into docs/PERFORMANCE.md's "## Serving" section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
GOALS = {"batch": 3.0, "reuse": 3.0, "llama_cpp": 0.5, "ttft": 0.2}
QUANTIZED = ("int8", "int4")
QUESTIONS = [
    "What is happening in this picture?",
    "Describe the image in detail.",
    "What is the person wearing?",
    "What colours stand out?",
    "Where might this photo have been taken?",
    "What is in the background?",
    "Is it day or night?",
    "What could happen next?",
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def data_url() -> str:
    import base64
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Client:
    """Streaming requests to the server: (first-token s, decode tok/s, tokens, total s)."""

    def __init__(self, url: str, name: str, tokens: int) -> None:
        import httpx

        self.http = httpx.Client(base_url=url, timeout=600)
        self.name, self.tokens = name, tokens

    def ask(self, messages: list[dict]) -> tuple[float, float, int, float, str]:
        import json

        body = {"model": self.name, "messages": messages, "max_tokens": self.tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        start = time.perf_counter()
        first = last = None
        text, used = [], 0
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                first = first or time.perf_counter()  # the first chunk: the first token
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:  # the last one (finish) comes with the last token
                    last = time.perf_counter()
                    text.append(choice["delta"].get("content") or "")
        total = time.perf_counter() - start
        decode = (used - 1) / (last - first) if last and first and last > first else float("nan")
        return (first or start) - start, decode, used, total, "".join(text)


def user(text: str, image: str | None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                        {"type": "text", "text": text}]}  # fmt: skip


def aggregate(url: str, name: str, tokens: int, clients: int, image: str) -> float:
    """Tokens/s of `clients` concurrent clients, each asking two different questions."""

    def one(i: int) -> int:
        c = Client(url, name, tokens)
        return sum(c.ask([user(QUESTIONS[(i + k) % len(QUESTIONS)] + f" ({i}.{k})", image)])[2]
                   for k in range(2))  # fmt: skip

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(one, range(clients)))
    return done / (time.perf_counter() - start)


def llama_cpp_decode(tokens: int, threads: int, repeats: int) -> float | str:
    """llama.cpp's decode tokens/s on the packaged GGUF, or why it was not measured."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return ("not measured: llama-cpp-python is not installed "
                "(pip install -e '.[llamacpp]'; it builds llama.cpp from source, minutes)")  # fmt: skip
    from vistune.weights import GGUF_FILE, GGUF_PACKAGE, packaged_file

    llm = Llama(str(packaged_file(GGUF_PACKAGE, GGUF_FILE)), n_threads=threads, n_ctx=2048,
                verbose=False)  # fmt: skip
    # EOS and the chat markers banned, as EOS and stops are off for vistune: every run
    # decodes `tokens` tokens (SmolLM2: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2)
    banned = {llm.token_eos(): -1e9, 0: -1e9, 1: -1e9, 2: -1e9}
    speeds = []
    for _ in range(repeats + 1):  # the first is a warm-up
        stamps = []
        for _ in llm.create_completion("Describe a photo of an astronaut.", max_tokens=tokens,
                                       temperature=0, stream=True, logit_bias=banned):  # fmt: skip
            stamps.append(time.perf_counter())
        if len(stamps) < 2:
            return f"not measured: llama.cpp stopped after {len(stamps)} token(s)"
        speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(speeds[1:])


def engine_decode(engine, question: str, tokens: int) -> float:
    """Decode tokens/s of the engine's own loop (Generator.steps) on one image request."""
    from PIL import Image
    from skimage import data

    from vistune.config import GenerationConfig

    inputs = engine.prepare(
        [([{"role": "user", "content": question}], Image.fromarray(data.astronaut()))]
    )
    config = GenerationConfig(max_new_tokens=tokens, temperature=0)
    stamps = [time.perf_counter() for _ in engine.generator.steps(
        inputs.inputs_embeds, inputs.attention_mask, config, ())]  # fmt: skip
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(args: argparse.Namespace) -> dict:
    from vistune.model import load_model
    from vistune.serve.app import ThreadedServer, create_app
    from vistune.serve.engine import Engine
    from vistune.serve.settings import ServeConfig
    from vistune.serve.threads import on_own_thread

    # All torch work on threads of their own, as `vistune serve` does: the model loaded on a
    # thread that ends, the server's on its scheduler's, the engine loop's after the server
    # stopped (two threads keeping OpenMP teams slow every decode step: serve.threads)
    engine = on_own_thread(
        lambda: Engine(load_model("default", dtype=torch.bfloat16), dtype=torch.bfloat16)
    )
    engine.generator.eos.clear()  # every answer exactly --tokens long
    engine.stop = ()
    image, name = data_url(), "vistune-default"
    out: dict = {}
    with ThreadedServer(create_app(engine, ServeConfig(max_tokens=args.tokens), name)) as live:
        client = Client(live.url, name, args.tokens)
        client.ask([user("Warm up.", image)])
        cold_ttft, decode = [], []
        for i in range(args.repeats):
            engine.scheduler.clear_cache()
            ttft, tps, *_ = client.ask([user(QUESTIONS[i % len(QUESTIONS)], image)])
            cold_ttft.append(ttft)
            decode.append(tps)
        out["ttft_image_s"] = statistics.median(cold_ttft)
        out["ttft_image_size"] = engine.model.config.image_size
        out["ttft_image_tokens"] = engine.model.num_image_tokens
        out["decode_tps"] = statistics.median(decode)
        warm, cold = [], []
        for i in range(args.repeats):
            engine.scheduler.clear_cache()
            first = [user(QUESTIONS[i % len(QUESTIONS)] + f" [{i}]", image)]
            answer = client.ask(first)[4]
            follow = [*first, {"role": "assistant", "content": answer}, user("Tell me more.", None)]
            warm.append(client.ask(follow)[0])
            engine.scheduler.clear_cache()
            cold.append(client.ask(follow)[0])
        out["follow_warm_s"], out["follow_cold_s"] = (
            statistics.median(warm),
            statistics.median(cold),
        )
        out["one_client_tps"] = aggregate(live.url, name, args.tokens, 1, image)
        out["eight_clients_tps"] = aggregate(live.url, name, args.tokens, 8, image)
        out["peak_batch"] = engine.scheduler.stats["peak_batch"]
    direct = [on_own_thread(partial(engine_decode, engine, QUESTIONS[i % len(QUESTIONS)],
                                    args.tokens)) for i in range(args.repeats)]  # fmt: skip
    out["direct_tps"] = statistics.median(direct)
    out.update(on_own_thread(partial(first_token_floor, engine, max(args.repeats, 5))))
    out.update(demo_ttft(args, image))
    for quantize in QUANTIZED:
        out.update(quantized_figures(engine, args, image, name, quantize))
    out["llama_cpp_tps"] = llama_cpp_decode(args.tokens, args.threads or 2, args.repeats)
    return out


HEAVY_OPS = ("linear", "conv2d", "scaled_dot_product_attention", "matmul", "mm", "mv", "bmm")
"""The calls `product_floor` replays: under inference mode PyTorch's Python dispatch sees these
composite ops whole (a linear, not its mm), so the replay runs the same kernels."""


def product_floor(run, repeats: int = 9) -> tuple[float, int]:
    """Seconds of `run()`'s matrix products and attention alone: the calls in HEAVY_OPS it
    makes (recorded with their tensors on one pass), replayed back to back; the median of
    `repeats` replays, and how many calls one replay makes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    heavy = {getattr(torch.ops.aten, name).default for name in HEAVY_OPS}
    calls: list = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in heavy:
                calls.append((func, args, kwargs))
            return func(*args, **kwargs)

    with torch.inference_mode(), Record():
        run()
    if not calls:
        raise RuntimeError("product_floor recorded no product: nothing to replay")

    def replay() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for func, args, kwargs in calls:
                func(*args, **kwargs)
        return time.perf_counter() - start

    replay()
    return statistics.median(replay() for _ in range(repeats)), len(calls)


def first_token_floor(engine, repeats: int) -> dict:
    """The cold first token with an image in-process (prepare: the image through the tower
    and the projector; the prefill and its first token), whole and its products alone."""
    from PIL import Image
    from skimage import data

    from vistune.config import GenerationConfig

    photo = Image.fromarray(data.astronaut())
    config = GenerationConfig(max_new_tokens=1, temperature=0)
    messages = [{"role": "user", "content": QUESTIONS[0]}]

    def run() -> None:
        inputs = engine.prepare([(messages, photo)])
        engine.generator.run(inputs.inputs_embeds, inputs.attention_mask, config)

    run()
    whole = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        whole.append(time.perf_counter() - start)
    return {"ttft_inprocess_s": statistics.median(whole), "ttft_floor_s": product_floor(run)[0]}


def demo_config():
    """The ModelConfig `vistune demo` trains at its defaults: its stage-1 command's
    --image-size and --projector, its stage-2 command's --template."""
    from vistune.commands import demo
    from vistune.config import ModelConfig

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    plan = [step.argv for step in demo.steps(parser.parse_args([]))]
    stage1 = next(a for a in plan if a[:3] == ["train", "--stage", "pretrain"])
    stage2 = next(a for a in plan if a[:3] == ["train", "--stage", "finetune"])
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    return ModelConfig(
        projector=flag(stage1, "--projector"),
        image_size=int(flag(stage1, "--image-size")),
        template=flag(stage2, "--template"),
    )


def demo_ttft(args: argparse.Namespace, image: str) -> dict:
    """First token with an image, cold, through the server of a model at the demo's
    configuration (demo_config; the packaged weights, a fresh projector)."""
    from vistune.model.llava import LlavaModel
    from vistune.serve.app import ThreadedServer, create_app
    from vistune.serve.engine import Engine
    from vistune.serve.settings import ServeConfig
    from vistune.serve.threads import on_own_thread
    from vistune.weights import ensure_default_weights

    weights, config = ensure_default_weights(), demo_config()
    model = on_own_thread(lambda: LlavaModel.from_parts(
        weights.vision_dir, weights.llm_dir, config, seed=0, dtype=torch.bfloat16
    ).eval())  # fmt: skip
    engine = on_own_thread(lambda: Engine(model, dtype=torch.bfloat16))
    engine.generator.eos.clear()
    engine.stop = ()
    name = "vistune-demo-config"
    with ThreadedServer(create_app(engine, ServeConfig(max_tokens=args.tokens), name)) as live:
        client = Client(live.url, name, args.tokens)
        client.ask([user("Warm up.", image)])
        cold = []
        for i in range(args.repeats):
            engine.scheduler.clear_cache()
            cold.append(client.ask([user(QUESTIONS[i % len(QUESTIONS)], image)])[0])
    return {"demo_ttft_s": statistics.median(cold), "demo_image_size": config.image_size,
            "demo_image_tokens": model.num_image_tokens}  # fmt: skip


def quantized_figures(
    engine, args: argparse.Namespace, image: str, name: str, quantize: str
) -> dict:
    """`--quantize` (int8 or int4) on the same model: one stream's decode tokens/s through
    its own server, and how many greedy answers (--tokens long, the astronaut) equal bf16's."""
    from PIL import Image
    from skimage import data

    from vistune.config import GenerationConfig
    from vistune.serve.app import ThreadedServer, create_app
    from vistune.serve.engine import Engine
    from vistune.serve.settings import ServeConfig
    from vistune.serve.threads import on_own_thread

    quantized = on_own_thread(lambda: Engine(engine.model, dtype=torch.bfloat16, quantize=quantize))
    quantized.generator.eos.clear()
    quantized.stop = ()
    with ThreadedServer(create_app(quantized, ServeConfig(max_tokens=args.tokens), name)) as live:
        client = Client(live.url, name, args.tokens)
        client.ask([user("Warm up.", image)])
        speeds = []
        for i in range(args.repeats):
            quantized.scheduler.clear_cache()
            speeds.append(client.ask([user(QUESTIONS[i % len(QUESTIONS)], image)])[1])
    photo = Image.fromarray(data.astronaut())
    config = GenerationConfig(max_new_tokens=args.tokens, temperature=0)

    def answers(e) -> list[str]:  # the engines' own loops: their servers stopped their threads
        texts = []
        for question in QUESTIONS:
            inputs = engine.prepare([([{"role": "user", "content": question}], photo)])
            run = e.generator.run(inputs.inputs_embeds, inputs.attention_mask, config)
            texts.append(run[0].text)
        return texts

    same, first_diff = 0, []
    ours, theirs = on_own_thread(lambda: (answers(engine), answers(quantized)))
    for a, b in zip(ours, theirs, strict=True):
        same += a == b
        if a != b:
            first_diff.append(len(os.path.commonprefix([a, b])))
    return {f"{quantize}_decode_tps": statistics.median(speeds), f"{quantize}_same": same,
            f"{quantize}_first_diff": first_diff}  # fmt: skip


def table(r: dict) -> str:
    batch = r["eight_clients_tps"] / r["one_client_tps"]
    reuse = r["follow_cold_s"] / r["follow_warm_s"]
    ok = lambda good: "met" if good else "not met"  # noqa: E731
    lines = [
        "| figure | value | reference (same run) | ratio | goal |",
        "| --- | --- | --- | --- | --- |",
        f"| 8 concurrent clients, aggregate | {r['eight_clients_tps']:.1f} tok/s | one client "
        f"{r['one_client_tps']:.1f} tok/s | {batch:.2f}x | >= 3x: {ok(batch >= GOALS['batch'])} |",
        f"| follow-up turn, first token (prefix cached) | {r['follow_warm_s']:.3f} s | cold "
        f"{r['follow_cold_s']:.3f} s | {reuse:.2f}x sooner | >= 3x: {ok(reuse >= GOALS['reuse'])} |",
    ]
    own = r["decode_tps"] / r["direct_tps"]
    lines.append(f"| one stream, decode (server's own cost) | {r['decode_tps']:.1f} tok/s | engine "
                 f"loop, no HTTP {r['direct_tps']:.1f} tok/s | {own:.2f}x | - |")  # fmt: skip
    if isinstance(r["llama_cpp_tps"], float):
        ratio = r["decode_tps"] / r["llama_cpp_tps"]
        lines.append(f"| one stream, decode | {r['decode_tps']:.1f} tok/s | llama.cpp "
                     f"{r['llama_cpp_tps']:.1f} tok/s | {ratio:.2f}x | >= 0.5x: "
                     f"{ok(ratio >= GOALS['llama_cpp'])} |")  # fmt: skip
    else:
        lines.append(f"| one stream, decode | {r['decode_tps']:.1f} tok/s | llama.cpp "
                     f"{r['llama_cpp_tps']} | - | >= 0.5x: unknown |")  # fmt: skip
    for q in QUANTIZED:
        tps, label = r[f"{q}_decode_tps"], f"one stream, decode, `--quantize {q}`"
        if isinstance(r["llama_cpp_tps"], float):
            ratio = tps / r["llama_cpp_tps"]
            lines.append(f"| {label} | {tps:.1f} tok/s | llama.cpp {r['llama_cpp_tps']:.1f} "
                         f"tok/s | {ratio:.2f}x | >= 0.5x: {ok(ratio >= GOALS['llama_cpp'])} |")  # fmt: skip
        else:
            lines.append(f"| {label} | {tps:.1f} tok/s | llama.cpp {r['llama_cpp_tps']} | - | "
                         ">= 0.5x: unknown |")  # fmt: skip
    for q in QUANTIZED:
        differ = ", ".join(str(c) for c in r[f"{q}_first_diff"]) or "-"
        lines.append(f"| `--quantize {q}`: greedy answers equal to bf16's | {r[f'{q}_same']} of "
                     f"{len(QUESTIONS)} | first differing character: {differ} | - | equal or "
                     "stated |")  # fmt: skip
    lines.append(f"| first token with an image (cold) | {r['ttft_image_s']:.3f} s | - | - | "
                 f"<= 0.2 s: {ok(r['ttft_image_s'] <= GOALS['ttft'])} |")  # fmt: skip
    floor, whole = r["ttft_floor_s"], r["ttft_inprocess_s"]
    lines.append(f"| first token with an image (cold): its products and attention alone | "
                 f"{floor:.3f} s | the whole, in-process {whole:.3f} s | {floor / whole:.2f}x | "
                 f"<= 0.2 s: {ok(floor <= GOALS['ttft'])} |")  # fmt: skip
    sooner = r["ttft_image_s"] / r["demo_ttft_s"]
    lines.append(f"| first token with an image (cold), demo configuration ({r['demo_image_size']} "
                 f"px, {r['demo_image_tokens']} image tokens) | {r['demo_ttft_s']:.3f} s | default "
                 f"model ({r['ttft_image_size']} px, {r['ttft_image_tokens']}) "
                 f"{r['ttft_image_s']:.3f} s | {sooner:.2f}x sooner | <= 0.2 s: "
                 f"{ok(r['demo_ttft_s'] <= GOALS['ttft'])} |")  # fmt: skip
    return "\n".join(lines)


def machine(args: argparse.Namespace) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_name()}, {os.cpu_count()} cores (load average {load:.2f} at the start), "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"{date.today().isoformat()}")  # fmt: skip


def section(r: dict, args: argparse.Namespace, where: str) -> str:
    command = " ".join(["python", "benchmarks/serve.py", *sys.argv[1:]])
    return f"""## Serving

What it measures: the HTTP API of `vistune serve` (continuous batching, prefix reuse) with
the default model in bf16, streaming clients on loopback, {args.tokens} tokens per answer
(EOS and stops off), median of {args.repeats} runs; peak batch seen {r["peak_batch"]}.

```
.venv/bin/{command}
```

Machine: {where}.

{table(r)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument(
        "--threads", type=int, help="torch and llama.cpp threads (default: torch's; llama.cpp 2)"
    )
    parser.add_argument("--write", action="store_true", help="update docs/PERFORMANCE.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = machine(args)
    results = measure(args)
    print(f"machine: {where}")
    print(table(results))
    if args.write:
        from vistune.files import write_text

        doc = DOC.read_text() if DOC.exists() else "# Performance\n"
        start = doc.find("\n## Serving\n")
        text = section(results, args, where)
        if start < 0:
            new = doc.rstrip("\n") + "\n\n" + text
        else:
            end = doc.find("\n## ", start + 1)
            new = doc[: start + 1] + text + ("" if end < 0 else "\n" + doc[end + 1 :])
        write_text(DOC, new.rstrip("\n") + "\n")
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

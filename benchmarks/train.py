"""Training throughput of both stages vs a plain reference loop, and share of bf16 peak.

    .venv/bin/python benchmarks/train.py --threads 2 --json /tmp/train_bench.json

On the packaged default model (DINOv2 ViT-S/14 + SmolLM2-135M) and built-in scene data
(rendered here with `vistune scenes` + the rules teacher unless --data-dir is given):

- ours: `vistune.train.loop.train` itself (cached frozen features, length-grouped batches,
  bf16 autocast, logits on supervised positions only, eager attention on the CPU, fused
  AdamW; stage 1 keeps the frozen LLM in bf16). Feature extraction is a one-off per image
  (reported separately), not part of the step time.
- reference: a plain loop measured in the same run: LlavaModel.forward with pixel values
  (the tower runs every step), fp32, shuffled batches padded to the longest, full logits,
  transformers' default attention (sdpa), default AdamW.

Both train the same parameters (stage 1: projector; stage 2: projector + LLM) on the same
samples with the same batch size; the first step of each is warm-up and not counted.
Throughput counts real tokens (text + image tokens, no padding) and samples per second.

Model FLOPs per real token (the same useful work for both loops; tower excluded):
  stage 2: 6*N_dec + 6*N_proj*(T/L) + 6*V*D*s + 12*n_layer*d*C
  stage 1: 4*N_dec + 6*N_proj*(T/L) + 4*V*D*s + 12*n_layer*d*C
with N_dec the decoder's linear weights, N_proj the projector's, T image tokens, L the mean
sequence length, s the share of supervised tokens, V*D the LM head, n_layer*d the attention
width and C the mean causal context of a token, sum(L_i^2)/sum(L_i)/2 over the samples
(QK^T and AV: 2*d*C multiply-adds a token and layer, 2 FLOPs each, backward twice the
forward; PaLM's 12*n_layer*d*L, halved by the causal mask). Stage 1 has no weight gradients
for the frozen LLM (forward 2N + input gradients 2N); its attention backward is whole, as
the gradient reaches the image tokens through the keys and values.

The peak is the best bf16 torch.matmul rate over large squares and the products of the
decoder's own shapes on 4096 rows, measured before and after the loops (the shares use the
highest reading). This oneDNN runs its bf16 squares (1024..4096) at 70-80% of the rate of
some of those shapes, so a peak from squares alone would overstate every share.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vistune.config import ModelConfig
from vistune.data.dataset import build_samples
from vistune.data.formats import read_llava_rows
from vistune.data.image import load_image
from vistune.train.config import TrainConfig
from vistune.train.loop import train


def make_data(folder: Path, n: int) -> None:
    cli = [sys.executable, "-m", "vistune.cli"]
    subprocess.run(
        [*cli, "scenes", "--n", str(n), "--out", str(folder)], check=True, capture_output=True
    )
    for types, name in (("brief", "brief.json"), ("conversation,detail,complex", "instruct.json")):
        subprocess.run(
            [
                *cli,
                "datagen",
                "--coco",
                str(folder),
                "--split",
                "train",
                "--teacher",
                "rules",
                "--types",
                types,
                "--out",
                str(folder / name),
            ],
            check=True,
            capture_output=True,
        )


SQUARES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096))


def product_shapes(cfg, rows: int = 4096) -> list[tuple[int, int, int]]:
    """(m, k, n) of the decoder's products on `rows` tokens: every linear layer's forward
    (rows, in) x (in, out) and its input gradient (rows, out) x (out, in)."""
    d, inner = cfg.hidden_size, cfg.intermediate_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layers = ((q, d), (kv, d), (d, q), (2 * inner, d), (inner, d), (d, inner))
    shapes = {(rows, k, n) for n, k in layers} | {(rows, n, k) for n, k in layers}
    return sorted(shapes)


def bf16_peak(shapes, seconds: float = 0.5) -> dict:
    """Best bf16 matmul FLOP/s over `shapes` (m, k, n) (this CPU, these threads), each run
    for `seconds` into one output buffer (a fresh result per product page-faults)."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        out = torch.empty(m, n, dtype=torch.bfloat16)
        torch.mm(a, b, out=out)
        reps, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            torch.mm(a, b, out=out)
            reps += 1
        rates[(m, k, n)] = 2 * m * k * n * reps / (time.perf_counter() - began)
    best = max(rates, key=rates.get)
    return {
        "flops": rates[best],
        "shape": list(best),
        "squares_flops": max(rates.get(s, 0.0) for s in SQUARES),
    }


def model_sizes(model) -> dict[str, float]:
    llm = model.llm
    decoder = llm.get_decoder()
    n_dec = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    head = llm.get_output_embeddings().weight
    cfg = llm.config
    return {
        "n_dec": n_dec,
        "n_proj": sum(p.numel() for p in model.projector.parameters()),
        "head": head.numel(),
        "attn": cfg.num_hidden_layers * cfg.hidden_size,
        "image_tokens": model.num_image_tokens,
    }


def flops_per_token(
    sizes: dict, stage: str, mean_len: float, supervised: float, context: float
) -> float:
    """Model FLOPs per real token (formula in the module docstring)."""
    k = 6 if stage == "finetune" else 4  # frozen LLM: no weight gradients
    proj = 6 * sizes["n_proj"] * sizes["image_tokens"] / mean_len
    return k * sizes["n_dec"] + proj + k * sizes["head"] * supervised + 12 * sizes["attn"] * context


def reference(
    stage: str,
    data: Path,
    root: Path,
    steps: int,
    batch: int,
    micro: int,
    size: int,
    template: str,
) -> tuple[dict, object, list]:
    """The plain loop: tower in the loop, fp32, random batches padded to the longest."""
    from vistune.model.llava import LlavaModel
    from vistune.weights import ensure_default_weights

    weights = ensure_default_weights()
    model = LlavaModel.from_parts(
        weights.vision_dir, weights.llm_dir, ModelConfig(image_size=size, template=template)
    )
    model.vision.requires_grad_(False)
    model.llm.requires_grad_(stage == "finetune")
    model.llm.train()
    samples, _ = build_samples(
        read_llava_rows(data), model.tokenizer, template, root, model.num_image_tokens, 1024
    )
    random.Random(0).shuffle(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    tokens = count = 0
    seconds = 0.0
    for step in range(steps + 1):
        began = time.perf_counter()
        for start in range(step * batch, (step + 1) * batch, micro):
            items = samples[start : start + micro]
            pixels = model.image_processor([load_image(s.image) for s in items])
            out = model(
                [s.input_ids for s in items],
                labels=[s.labels for s in items],
                pixel_values=pixels,
            )
            (out.loss * len(items) / batch).backward()
            if step:
                tokens += sum(s.length for s in items)
                count += len(items)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:  # the first step is warm-up
            seconds += time.perf_counter() - began
    result = {
        "tokens_per_s": tokens / seconds,
        "samples_per_s": count / seconds,
        "attention": model.llm.config._attn_implementation,
    }
    return result, model, samples


def ours(
    stage: str,
    data: Path,
    root: Path,
    work: Path,
    steps: int,
    batch: int,
    micro: int,
    size: int,
    template: str,
) -> dict:
    cfg = TrainConfig(
        stage=stage,
        data=str(data),
        image_folder=str(root),
        out=str(work / f"out-{stage}"),
        init="default",
        model=ModelConfig(image_size=size, template=template),
        batch_size=batch,
        per_device_batch=micro,
        max_steps=steps + 1,
        save_every=10_000,
        plot=False,
        features=str(work / "features"),
        model_max_length=1024,
        lr=1e-5,
    )
    began = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - began
    records = [
        json.loads(x) for x in (work / f"out-{stage}" / "log.jsonl").read_text().split("\n") if x
    ]
    measured = records[1:]
    seconds = sum(r["seconds"] for r in measured)
    return {
        "tokens_per_s": sum(r["tokens"] for r in measured) / seconds,
        "samples_per_s": batch * len(measured) / seconds,
        "padding_share": sum(r["padded_tokens"] - r["tokens"] for r in measured)
        / sum(r["padded_tokens"] for r in measured),
        "wall_s_with_setup": wall,
    }


def run_stage(args, stage: str, data: Path, root: Path, work: Path, peak: float) -> dict:
    """Reference first: `train` tunes this process's allocator (loop.keep_large_buffers),
    and the plain loop must not profit from it."""
    template = "plain" if stage == "pretrain" else "vicuna_v0"
    batch, micro = args.pretrain_batch if stage == "pretrain" else args.finetune_batch
    ref, model, samples = reference(
        stage, data, root, args.steps, batch, micro, args.image_size, template
    )
    mean_len = sum(s.length for s in samples) / len(samples)
    supervised = sum(s.targets for s in samples) / sum(s.length for s in samples)
    context = sum(s.length**2 for s in samples) / sum(s.length for s in samples) / 2
    fpt = flops_per_token(model_sizes(model), stage, mean_len, supervised, context)
    return {
        "reference": ref,
        "flops_per_token": fpt,
        "mean_length": mean_len,
        "mean_causal_context": context,
        "reference_share_of_peak": ref["tokens_per_s"] * fpt / peak,
        "batch": [batch, micro],
    }


def add_ours(args, result: dict, stage: str, data: Path, root: Path, work: Path) -> None:
    template = "plain" if stage == "pretrain" else "vicuna_v0"
    batch, micro = result["batch"]
    mine = ours(stage, data, root, work, args.our_steps, batch, micro, args.image_size, template)
    result["ours"] = mine
    result["speedup_samples"] = mine["samples_per_s"] / result["reference"]["samples_per_s"]
    result["ours_share_of_peak"] = (
        mine["tokens_per_s"] * result["flops_per_token"] / result["peak_flops"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="measured steps of the reference loop")
    parser.add_argument(
        "--our-steps",
        type=int,
        default=32,
        help="measured steps of ours: oneDNN compiles a kernel per new matrix shape (~10 ms"
        " each); a run's first steps meet many new lengths, a long run reuses them",
    )
    pair = lambda text: tuple(int(x) for x in text.split("x"))  # noqa: E731
    parser.add_argument(
        "--pretrain-batch",
        type=pair,
        default=(32, 16),
        help="global x per-step micro-batch (configs/scenes: 32x16)",
    )
    parser.add_argument(
        "--finetune-batch",
        type=pair,
        default=(16, 16),
        help="global x per-step micro-batch (configs/scenes: 16x16)",
    )
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=120, help="scenes to render")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="existing scenes dir with brief.json, instruct.json (else rendered into a temp dir)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = args.data_dir or work / "scenes"
        if args.data_dir is None:
            make_data(root, args.images)
        from transformers import AutoConfig

        from vistune.weights import ensure_default_weights

        llm_cfg = AutoConfig.from_pretrained(ensure_default_weights().llm_dir)
        shapes = list(SQUARES) + product_shapes(llm_cfg)
        before = bf16_peak(shapes)
        peak = before["flops"]
        result = {
            "threads": torch.get_num_threads(),
            "bf16_peak_before": before,
            "image_size": args.image_size,
        }
        stages = (("pretrain", "brief.json"), ("finetune", "instruct.json"))
        for stage, name in stages:
            result[stage] = run_stage(args, stage, root / name, root, work, peak)
            result[stage]["peak_flops"] = peak
        for stage, name in stages:
            add_ours(args, result[stage], stage, root / name, root, work)
            print(f"{stage}: {json.dumps(result[stage], indent=1)}", file=sys.stderr)
        after = result["bf16_peak_after"] = bf16_peak(shapes)
    # The peak reads differently from one run to the next on these cores (turbo, other
    # tenants): the shares use the best of the readings before and after, the stricter.
    peak = max(peak, after["flops"])
    result["peak_used"] = peak
    for stage in ("pretrain", "finetune"):
        r = result[stage]
        r["peak_flops"] = peak
        for loop in ("reference", "ours"):
            r[f"{loop}_share_of_peak"] = r[loop]["tokens_per_s"] * r["flops_per_token"] / peak
    print(
        f"bf16 matmul peak: {peak / 1e9:.0f} GFLOP/s ({result['threads']} threads; best of "
        f"{before['flops'] / 1e9:.0f} before at {before['shape']}, "
        f"{after['flops'] / 1e9:.0f} after at {after['shape']}; squares alone: "
        f"{before['squares_flops'] / 1e9:.0f}, {after['squares_flops'] / 1e9:.0f})"
    )
    print("stage     loop       samples/s  tokens/s  share of peak")
    for stage in ("pretrain", "finetune"):
        r = result[stage]
        for loop in ("reference", "ours"):
            print(
                f"{stage:9} {loop:10} {r[loop]['samples_per_s']:9.2f} "
                f"{r[loop]['tokens_per_s']:9.0f} {r[f'{loop}_share_of_peak']:9.1%}"
            )
        print(f"{stage:9} speedup    {r['speedup_samples']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

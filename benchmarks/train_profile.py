"""Stage-2 steady-state throughput and a profile of one step (for work on the training speed).

    .venv/bin/python benchmarks/train_profile.py --data-dir DIR [--micro 16] [--profile]

DIR holds scenes + instruct.json as benchmarks/train.py renders them (its --data-dir). The
script builds the stage-2 run as `vistune train` does, runs the first `--steps` global
batches once (torch.compile and oneDNN build their kernels for these shapes), then runs
the same batches again and prints the tokens/s of that second pass: the speed of a long
run whose batch shapes have all been seen. `--profile` prints the torch profiler's table
for one more step; `--breakdown` times one more step by wall clock per ATen op and per
compiled glue function (the profiler's own overhead inflated the matmuls' share of a step
by a third here: use this for where the time goes, the profiler for what calls what);
`--shapes` adds the breakdown's matrix products by shape, with their GFLOP/s.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from vistune.data.dataset import global_batches
from vistune.train import loop
from vistune.train.config import TrainConfig
from vistune.train.distributed import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--micro", type=int, default=16, help="per-device micro-batch")
    parser.add_argument("--steps", type=int, default=6, help="global batches per pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--shapes", action="store_true", help="with --breakdown: per product")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            stage="finetune",
            data=str(args.data_dir / "instruct.json"),
            image_folder=str(args.data_dir),
            out=str(Path(tmp) / "out"),
            init="default",
            image_size=112,
            template="vicuna_v0",
            batch_size=16,
            per_device_batch=args.micro,
            max_steps=1000,
            save_every=10_000,
            plot=False,
            features=str(Path(tmp) / "features"),
            model_max_length=1024,
            lr=1e-5,
        )
        info = init_distributed(torch.device("cpu"))
        loop.keep_large_buffers()
        run = loop._setup(cfg, info, lambda _m: None, None)
        lengths = [s.length for s in run.samples]
        batches = global_batches(lengths, 16, 0, cfg.seed, cfg.group_by_length, cfg.length_group)
        batches = batches[: args.steps]
        for step, batch in enumerate(batches):
            record = loop._one_step(run, step, batch)
            print(f"first pass  step {step}: {record['tokens_per_s']:6.0f} tokens/s")
        tokens = seconds = 0.0
        for step, batch in enumerate(batches):
            record = loop._one_step(run, len(batches) + step, batch)
            tokens += record["tokens"]
            seconds += record["seconds"]
        print(f"second pass: {tokens / seconds:.0f} tokens/s over {tokens:.0f} tokens")
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                loop._one_step(run, 2 * len(batches), batches[-1])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        if args.breakdown:
            step = 2 * len(batches) + 1
            breakdown(lambda: loop._one_step(run, step, batches[-1]), args.shapes)


def _product(name: str, args) -> tuple[tuple, int] | None:
    """(shape key, FLOPs) of an mm / addmm / bmm call; None for other ops. The key has
    each operand's shape and strides (a transposed view multiplies at another speed)."""
    if name not in ("mm", "addmm", "bmm"):
        return None
    a, b = args[1:3] if name == "addmm" else args[:2]
    flops = 2 * a.numel() * b.shape[-1]
    return (name, tuple(a.shape), a.stride(), tuple(b.shape), b.stride()), flops


def breakdown(step, shapes: bool = False) -> None:
    """Wall time of one `step()` per ATen op (a dispatch mode) and per compiled glue
    function (each call timed whole, ops inside not counted twice); with `shapes`, also
    per matrix product shape."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from vistune.train import llama_glue

    times: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    products: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, 0])

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            began = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            entry = times[f"aten.{func.overloadpacket.__name__}"]
            entry[0] += 1
            entry[1] += time.perf_counter() - began
            found = _product(func.overloadpacket.__name__, args) if shapes else None
            if found is not None:
                entry = products[found[0]]
                entry[0] += 1
                entry[1] += time.perf_counter() - began
                entry[2] += found[1]
            return out

    plain = llama_glue._Compiled.__call__

    def glue_call(self, *args):
        began = time.perf_counter()
        with _disable_current_modes():
            out = plain(self, *args)
        entry = times[f"glue.{self.eager.__name__}"]
        entry[0] += 1
        entry[1] += time.perf_counter() - began
        return out

    llama_glue._Compiled.__call__ = glue_call
    try:
        began = time.perf_counter()
        with Timed():
            step()
        total = time.perf_counter() - began
    finally:
        llama_glue._Compiled.__call__ = plain
    counted = sum(seconds for _calls, seconds in times.values())
    print(
        f"one step: {total * 1e3:.0f} ms, {total - counted:.3f} s of it outside ATen ops and glue"
    )
    for name, (calls, seconds) in sorted(times.items(), key=lambda kv: -kv[1][1])[:30]:
        print(f"  {name:50} {calls:5d} calls {seconds * 1e3:8.1f} ms {seconds / total:6.1%}")
    if products:
        seconds = sum(entry[1] for entry in products.values())
        flops = sum(entry[2] for entry in products.values())
        print(f"matrix products: {seconds * 1e3:.0f} ms, {flops / seconds / 1e9:.0f} GFLOP/s")
        for key, (calls, secs, fl) in sorted(products.items(), key=lambda kv: -kv[1][1])[:20]:
            name, ashape, astride, bshape, bstride = key
            print(
                f"  {name:5} {ashape!s:16} {astride!s:10} x {bshape!s:16} {bstride!s:10}"
                f" {calls:4d} calls {secs * 1e3:7.1f} ms {fl / secs / 1e9:6.0f} GFLOP/s"
            )


if __name__ == "__main__":
    main()

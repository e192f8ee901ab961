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
`--shapes` adds the breakdown's matrix products by shape, with their GFLOP/s; `--ceiling`
(with `--breakdown`) times each of those products again on its own, operands in cache and
nothing else running, and prints the share of the measured bf16 peak (benchmarks/train.py's)
that the step would reach if it did nothing but its matrix products at those rates.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from vistune.config import ModelConfig
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
    parser.add_argument(
        "--ceiling", action="store_true", help="with --breakdown: products alone vs the peak"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            stage="finetune",
            data=str(args.data_dir / "instruct.json"),
            image_folder=str(args.data_dir),
            out=str(Path(tmp) / "out"),
            init="default",
            model=ModelConfig(image_size=112, template="vicuna_v0"),
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
            products = breakdown(
                lambda: loop._one_step(run, step, batches[-1]), args.shapes or args.ceiling
            )
            if args.ceiling:
                batch = [run.samples[i] for i in batches[-1]]
                useful = sum(s.length for s in batch) * _flops_per_token(run, batch)
                ceiling(products, useful, run.model.llm.config)


def _product(name: str, args) -> tuple[tuple, int] | None:
    """(shape key, FLOPs) of an mm / addmm / bmm call; None for other ops. The key has
    each operand's shape and strides (a transposed view multiplies at another speed)."""
    if name not in ("mm", "addmm", "bmm"):
        return None
    a, b = args[1:3] if name == "addmm" else args[:2]
    flops = 2 * a.numel() * b.shape[-1]
    return (name, tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), a.dtype), flops


def _operand(shape: tuple, stride: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor with this shape and these strides (a transposed or broadcast view
    of its storage where the strides say so)."""
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
    return torch.randn(size).to(dtype).as_strided(shape, stride)


def alone_seconds(key: tuple, seconds: float = 0.05) -> float:
    """Seconds per call of the product `key` (a `_product` key) on its own: random operands
    of its shapes and strides, repeated into one output buffer for `seconds` after two
    warm-up calls. An addmm is timed as its mm (the sum is not a product)."""
    name, ashape, astride, bshape, bstride, dtype = key
    a, b = _operand(ashape, astride, dtype), _operand(bshape, bstride, dtype)
    op = torch.bmm if name == "bmm" else torch.mm
    out = op(a, b)
    op(a, b, out=out)
    reps, began = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - began < seconds:
        op(a, b, out=out)
        reps += 1
    return (time.perf_counter() - began) / reps


def _flops_per_token(run, samples) -> float:
    """Stage 2's model FLOPs per real token of `samples`, by benchmarks/train.py's formula
    (the figure its shares of the peak use)."""
    bench = _train_benchmark()
    tokens = sum(s.length for s in samples)
    supervised = sum(s.targets for s in samples) / tokens
    context = sum(s.length**2 for s in samples) / tokens / 2
    sizes = bench.model_sizes(run.model)
    return bench.flops_per_token(sizes, "finetune", tokens / len(samples), supervised, context)


def _train_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_train", Path(__file__).with_name("train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ceiling(products: dict, useful_flops: float, cfg) -> dict:
    """How far the products alone could take the step: each product shape of the breakdown
    step timed on its own (`alone_seconds`), summed over its calls, against the step's
    useful (model) FLOPs and benchmarks/train.py's bf16 peak read now. Prints and returns
    the figures."""
    bench = _train_benchmark()
    in_step = sum(entry[1] for entry in products.values())
    each = {key: calls * alone_seconds(key) for key, (calls, _s, _f) in products.items()}
    alone = sum(each.values())
    peak = bench.bf16_peak(bench.product_shapes(cfg) + list(bench.SQUARES))["flops"]
    result = {
        "products_in_step_s": in_step,
        "products_alone_s": alone,
        "product_flops": sum(entry[2] for entry in products.values()),
        "useful_flops": useful_flops,
        "peak_flops": peak,
        "ceiling_share": useful_flops / alone / peak,
    }
    print(
        f"ceiling: the step's {len(products)} product shapes take {alone * 1e3:.0f} ms on their own"
        f" ({in_step * 1e3:.0f} ms in the step) for {result['product_flops'] / 1e9:.0f} GFLOP;"
        f" the step's model FLOPs are {useful_flops / 1e9:.0f} GFLOP; peak {peak / 1e9:.0f}"
        f" GFLOP/s. Products alone, nothing else: {result['ceiling_share']:.1%} of the peak;"
        f" 40% leaves {max(0.0, useful_flops / 0.4 / peak - alone) * 1e3:.0f} ms for all else."
    )
    for key, (calls, secs, fl) in sorted(products.items(), key=lambda kv: -kv[1][1])[:12]:
        print(
            f"  {key[0]:5} {key[1]!s:16} x {key[3]!s:16} {calls:4d} calls: in the step"
            f" {fl / secs / 1e9:5.0f} GFLOP/s, alone {fl / each[key] / 1e9:5.0f}"
        )
    return result


def breakdown(step, shapes: bool = False) -> dict:
    """Wall time of one `step()` per ATen op (a dispatch mode) and per compiled glue
    function (each call timed whole, ops inside not counted twice); with `shapes`, also
    per matrix product shape. Returns the products: `_product` key -> [calls, seconds,
    FLOPs] (empty without `shapes`)."""
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
            name, ashape, astride, bshape, bstride, _dtype = key
            print(
                f"  {name:5} {ashape!s:16} {astride!s:10} x {bshape!s:16} {bstride!s:10}"
                f" {calls:4d} calls {secs * 1e3:7.1f} ms {fl / secs / 1e9:6.0f} GFLOP/s"
            )

    return dict(products)


if __name__ == "__main__":
    main()

"""bf16 matrix products with operands in cache and evicted from it (2 threads by default).

    .venv/bin/python benchmarks/products_cold.py [--threads 2] [--rows 4096]

For each of stage 2's biggest product shapes (SmolLM2-135M on `--rows` tokens) it prints
the GFLOP/s of the product repeated on the same operands (warm: the reference) and on
operands evicted from the caches before each call (cold: a rotation of other operand pairs
and a 256 MB buffer written between calls), and cold / warm; warm and cold alternate.
Inside a training step the backward reads activations saved by the forward long before,
so its products see the cold case. Run it again under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for transparent huge pages.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {
    "gate/up/down weight gradient": lambda n: ((576, n), (n, 1536)),
    "gate/up forward": lambda n: ((n, 576), (576, 3072)),
    "down forward": lambda n: ((n, 1536), (1536, 576)),
}


def rates(
    a_shape, b_shape, calls: int = 10, rounds: int = 7, pool: int = 24, flush_mb: int = 256
) -> dict:
    """Median GFLOP/s of a bf16 (a_shape) x (b_shape) product, warm and cold, and the
    median of their per-round ratio: `rounds` alternations of `calls` warm then `calls` cold
    calls, so that a machine whose speed drifts (this one does) hits both alike."""
    pairs = [
        (torch.randn(a_shape).bfloat16(), torch.randn(b_shape).bfloat16()) for _ in range(pool)
    ]
    out = torch.empty(a_shape[0], b_shape[1], dtype=torch.bfloat16)
    flush = torch.zeros(flush_mb * 2**20, dtype=torch.uint8)
    flops = 2 * a_shape[0] * a_shape[1] * b_shape[1]
    for _ in range(3):
        torch.mm(*pairs[0], out=out)
    warm, cold, turn = [], [], 0
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(calls):
            torch.mm(*pairs[0], out=out)
        warm.append(flops * calls / (time.perf_counter() - began) / 1e9)
        seconds = 0.0
        for _ in range(calls):
            flush.add_(1)
            turn = turn % (pool - 1) + 1  # never pairs[0], the warm one
            began = time.perf_counter()
            torch.mm(*pairs[turn], out=out)
            seconds += time.perf_counter() - began
        cold.append(flops * calls / seconds / 1e9)
    ratios = [c / w for c, w in zip(cold, warm, strict=True)]
    return {
        "warm": statistics.median(warm),
        "cold": statistics.median(cold),
        "cold_over_warm": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, shapes in SHAPES.items():
        a_shape, b_shape = shapes(args.rows)
        r = rates(a_shape, b_shape)
        print(
            f"{name:30} {a_shape!s:13} x {b_shape!s:13} warm {r['warm']:5.0f} GFLOP/s,"
            f" cold {r['cold']:5.0f}, cold/warm {r['cold_over_warm']:.2f} (medians of 7 rounds)"
        )


if __name__ == "__main__":
    main()

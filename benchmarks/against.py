"""One benchmark from two commits, by turns in one run: is HEAD slower than BASE?

    .venv/bin/python benchmarks/against.py --base ea1fcca -- generate.py --threads 2
    .venv/bin/python benchmarks/against.py --base ea1fcca -- train.py --threads 2

BASE is checked out into a temporary git worktree. Each round runs BASE's copy of the
benchmark script with BASE's package, then HEAD's with HEAD's (the same venv; PYTHONPATH
picks the tree), so other jobs on a shared machine slow both alike. The figures compared:

- train.py: each stage's tokens/s of vistune's own loop ("ours", from its --json);
- generate.py: each row of its table, first token (s) and decode tok/s.

Prints every figure of every round, then the medians and HEAD / BASE (for times, BASE /
HEAD, so above 1 is faster either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tree: Path, script: str, extra: list[str], work: Path) -> dict[str, float]:
    """The figures of one run of `tree`'s benchmarks/`script` (name -> value, higher is
    better unless the name ends in ' s')."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    argv = [sys.executable, str(tree / "benchmarks" / script), *extra]
    if script == "train.py":
        out = work / "train.json"
        subprocess.run([*argv, "--json", str(out)], cwd=tree, env=env, check=True)
        result = json.loads(out.read_text())
        return {f"{stage} ours tokens/s": result[stage]["ours"]["tokens_per_s"]
                for stage in ("pretrain", "finetune")}  # fmt: skip
    if script == "generate.py":
        text = subprocess.run(argv, cwd=tree, env=env, check=True, capture_output=True,
                              text=True).stdout  # fmt: skip
        figures = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[1].replace(".", "", 1).isdigit():
                figures[f"{cells[0]} first token s"] = float(cells[1])
                figures[f"{cells[0]} decode tok/s"] = float(cells[3])
        if not figures:
            raise SystemExit(f"no table in {tree.name}'s generate.py output:\n{text}")
        return figures
    raise SystemExit(f"against.py knows train.py and generate.py, not {script}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree, by turns")
    parser.add_argument("script", help="train.py or generate.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    args = parser.parse_args()
    extra = [a for a in args.args if a != "--"]
    runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.base], check=True, capture_output=True)  # fmt: skip
        try:
            for round_ in range(args.rounds):
                for name, tree in (("base", base), ("head", ROOT)):
                    figures = _run(tree, args.script, extra, Path(tmp))
                    runs[name].append(figures)
                    print(f"round {round_ + 1} {name}: {json.dumps(figures)}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(base)], check=False)  # fmt: skip
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    print(f"\n| figure | {args.base} | {head_rev} | faster by |")
    print("| --- | ---: | ---: | ---: |")
    for key in runs["head"][0]:
        if not all(key in r for r in runs["base"]):
            continue
        b = statistics.median(r[key] for r in runs["base"])
        h = statistics.median(r[key] for r in runs["head"])
        ratio = b / h if key.endswith(" s") else h / b
        print(f"| {key} | {b:.3f} | {h:.3f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

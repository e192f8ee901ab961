"""Loading on a thread of its own leaves no OpenMP team behind (vistune.serve.threads).

The OS threads are counted in a fresh interpreter: other tests' servers come and go in this
one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vistune.serve.threads import on_own_thread

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/task").exists()
    or "OpenMP" not in torch.__config__.parallel_info()
    or torch.get_num_threads() < 2,
    reason="counts the OS threads of an OpenMP build of torch on 2+ threads (Linux)",
)

COUNT = textwrap.dedent(
    """
    import os, threading, time, torch
    from vistune.serve.threads import on_own_thread

    def threads_now(settle_to=None):
        # the workers of an ended thread's team end on their own, soon after it: wait for
        # them (up to 10 s on a busy machine) before counting
        deadline = time.monotonic() + 10
        while True:
            n = len(os.listdir("/proc/self/task"))
            if settle_to is None or n <= settle_to or time.monotonic() > deadline:
                return n
            time.sleep(0.01)

    def compute():  # large enough for ATen to run it as a parallel region
        return float(torch.ones(1 << 22).mul_(2).sum())

    torch.set_num_threads(2)
    before = threads_now()
    assert on_own_thread(compute) == 2.0 * (1 << 22)
    after_own = threads_now(settle_to=before)
    done, hold = threading.Event(), threading.Event()

    def stay():
        compute()
        done.set()
        hold.wait()

    thread = threading.Thread(target=stay)
    thread.start()
    done.wait()
    staying = threads_now()
    hold.set()
    thread.join()
    print(before, after_own, staying, threads_now(settle_to=before))
    """
)


def test_on_own_thread_leaves_no_team_behind_where_a_staying_thread_keeps_one():
    out = subprocess.run([sys.executable, "-c", COUNT], capture_output=True, text=True, check=True)
    before, after_own, staying, after = map(int, out.stdout.split())
    assert after_own == before  # the thread and its OpenMP workers ended together
    assert staying >= before + 2  # the contrast: a thread that lives keeps its workers
    assert after == before


def test_on_own_thread_returns_the_value_or_raises_the_error():
    assert on_own_thread(lambda: 41 + 1) == 42

    def fail() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        on_own_thread(fail)

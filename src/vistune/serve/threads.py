"""Why a server does its torch work on one thread, and `on_own_thread` to keep it so.

PyTorch's CPU build parallelises with GNU OpenMP, which keeps a team of worker threads for
every thread that has run a parallel region, until that thread ends. While the teams hold
more threads than there are CPUs, libgomp's workers spin 1,000 times instead of 300,000
before they sleep, so every one of a decode step's ~1,400 small operations pays a sleep and
a wake-up. Measured here (2 cores, the default model, one stream, int4 decode steps): 80
tok/s while one thread computes, 34 once a second thread has computed too, even an idle
one. `vistune serve` decodes on the scheduler's thread; the model is loaded on a thread of
its own that ends (`on_own_thread`), so the scheduler's is the only team while serving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[[], T], name: str = "vistune-load") -> T:
    """`fn()` on a new thread that ends when it returns (taking its OpenMP team with it);
    its result, or its exception raised here."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = err

    # a daemon: Ctrl-C during a load stops the process without waiting for the load
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]

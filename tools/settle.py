"""Let the process settle before a timed call: shared by the benchmarks that time several runtimes in one process.

ONNX Runtime's intra-op thread pool keeps spinning for tens of ms of CPU after every run, and libgomp's threads
briefly after every torch op; on a 2-core machine that spinning is charged to whichever route runs next. Each
route is timed as if it ran alone: after `settle()` no thread of the previous route burns CPU any more.
"""
from __future__ import annotations

import time

__all__ = ["settle"]


def settle(max_s: float = 0.3, window_s: float = 0.005, idle_cpu_s: float = 0.0005, quiet_windows: int = 2) -> None:
    """Sleep until this process's threads stop burning CPU (a spinning thread pool of the previous call), at most
    `max_s`: quiet means `quiet_windows` windows in a row in which the whole process used under `idle_cpu_s`."""
    deadline = time.perf_counter() + max_s
    quiet = 0
    while quiet < quiet_windows and time.perf_counter() < deadline:
        cpu = time.process_time()
        time.sleep(window_s)
        quiet = quiet + 1 if time.process_time() - cpu < idle_cpu_s else 0

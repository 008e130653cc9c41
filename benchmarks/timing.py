"""Shared by the benchmark scripts: time a callable after building it, the way every child process does."""

from __future__ import annotations

import resource
import time
from typing import Callable


def measure(build: Callable[[], Callable[[], object]], warmup: int = 1, repeats: int = 3) -> dict:
    """Build the runner (timed as load_s), run it `warmup` times (the first timed as first_s), then `repeats`
    timed runs; peak_rss_gb is this process's high-water mark."""
    t0 = time.perf_counter()
    run = build()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"load_s": load, "first_s": first, "times": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

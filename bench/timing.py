"""The one timing loop the benchmarks share: warm-up calls, then the median wall time of ``repeats`` calls."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Median seconds of ``fn()``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each call when given."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

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


def paired_seconds(fn_a, fn_b, repeats: int, warmup: int = 1) -> tuple[float, float, float]:
    """Medians of ``fn_a()`` and ``fn_b()`` timed in alternation, and the median of their per-pair ratios (b / a):
    on a shared, noisy machine a slow spell then hits both sides of a pair instead of one whole series."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    pairs = []
    for _ in range(repeats):
        times = []
        for fn in (fn_a, fn_b):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        pairs.append(times)
    a, b = zip(*pairs)
    return statistics.median(a), statistics.median(b), statistics.median(y / x for x, y in pairs)

"""The process memory figures the benchmarks report: resident set now and at its peak."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

MIB = 1 << 20


def rss_mib() -> float | None:
    """The process's resident set now (Linux: /proc/self/statm), or None where unknown."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024

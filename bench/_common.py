"""What the bench scripts share. They run as `python bench/<name>.py` from the repository root, so
their own folder is first on `sys.path` and this module imports as `_common`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (a, b, c, a, b, c, ...) `repeats`
    times after one warm-up call of each, so that drift (thermal, other load) hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}

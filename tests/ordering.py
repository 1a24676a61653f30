"""Test order for `make test`'s pytest-xdist workers (``--dist worksteal``).

worksteal hands worker k the k-th contiguous share of the collected tests and lets an idle
worker steal from the *end* of another's queue. In collection order (e2e, integration, unit)
the first worker gets every slow tier and the run ends on whichever slow tests are left, with
the other worker idle. Here the slow files (e2e and integration) are dealt out over the shares
heaviest first, each to the share with the fewest seconds so far (longest processing time
first), by the seconds in ``tests/durations.json`` (file -> seconds of one measured run; a file
not listed counts as the mean). Each share is its slow files, heaviest first, then unit tests,
so the run ends on short tests whoever steals them. The order never changes what runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
DURATIONS = Path(__file__).with_name("durations.json")


def recorded_durations() -> dict[str, float]:
    """File -> seconds, as recorded in tests/durations.json."""
    return {name: float(seconds) for name, seconds in json.loads(DURATIONS.read_text()).items()}


def shares(count: int, workers: int) -> list[int]:
    """How many tests worksteal first sends each worker: what is left ÷ workers left."""
    sizes, left = [], count
    for remaining in range(workers, 0, -1):
        sizes.append(left // remaining)
        left -= sizes[-1]
    return sizes


def order_for_workers(
    items: Sequence[T],
    workers: int,
    file_of: Callable[[T], str],
    slow: Callable[[T], bool],
    seconds: Mapping[str, float],
) -> list[T]:
    """``items`` reordered so that each worker's first share starts with its slow files."""
    if workers < 2:
        return list(items)
    files: dict[str, list[T]] = {}
    for item in items:
        if slow(item):
            files.setdefault(file_of(item), []).append(item)
    fast = [item for item in items if not slow(item)]
    default = sum(seconds.values()) / len(seconds) if seconds else 1.0
    sizes = shares(len(items), workers)
    heads: list[list[T]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for name in sorted(files, key=lambda f: (-seconds.get(f, default), f)):
        target = min(range(workers), key=lambda k: (load[k], k))
        heads[target] += files[name]
        load[target] += seconds.get(name, default)
    if any(len(head) > size for head, size in zip(heads, sizes, strict=True)):
        return [test for tests in files.values() for test in tests] + fast
    ordered: list[T] = []
    for head, size in zip(heads, sizes, strict=True):
        take = size - len(head)
        ordered += head + fast[:take]
        fast = fast[take:]
    return ordered + fast

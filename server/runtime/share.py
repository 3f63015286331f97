"""What one server process may use of the machine: its cores, and where its GPU instances start.

A plain ``cnn-serve`` owns the machine. Under ``--workers N`` each worker is told its place once,
at start (``take_share``): it then sees ``usable_cpus() // N`` cores, so onnxruntime's intra-op
threads and the decode pool of N workers add up to the machine instead of N times it, and its
``--gpus`` list starts at its own index (``worker_gpus``): instances are placed over that list in
order, so N workers on a multi-GPU host start their instances on different GPUs instead of all on
the first.

This module imports nothing heavy: the supervisor, which never loads onnxruntime, uses it too.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Share:
    index: int = 0  # this worker's number, 0 .. count - 1
    count: int = 1  # workers sharing the machine


_share = Share()


def machine_cpus() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota (docker --cpus)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def usable_cpus() -> int:
    """This process's part of ``machine_cpus()``: all of it, or 1/N of it in a worker of N."""
    return max(1, machine_cpus() // _share.count)


def take_share(index: int, count: int) -> None:
    """Called once by a worker before it builds its server."""
    global _share
    if not 0 <= index < count:
        raise ValueError(f"worker index {index} is not in [0, {count})")
    _share = Share(index, count)


def current_share() -> Share:
    return _share


def worker_gpus(gpus: tuple[int, ...]) -> tuple[int, ...]:
    """``--gpus`` as this process uses it: rotated to start at its worker index (0, 1 -> 1, 0 for
    worker 1); the same GPUs, so a config.pbtxt ``instance_group`` naming some still finds them."""
    if not gpus:
        return gpus
    k = _share.index % len(gpus)
    return gpus[k:] + gpus[:k]

"""What one server process may use of the machine: its cores, and where its GPU instances start.

A plain ``cnn-serve`` owns the machine. Under ``--workers N`` each worker is told its place once,
at start (``take_share``): it then sees ``usable_cpus() // N`` cores, so onnxruntime's intra-op
threads and the decode pool of N workers add up to the machine instead of N times it, and its
model instances start at CUDA device ``index`` (instance i on device ``(index + i) % count``), so
N workers on a multi-GPU host spread their instances over the GPUs instead of all using device 0.

This module imports nothing heavy: the supervisor, which never loads onnxruntime, uses it too.
"""

from __future__ import annotations

import math
import os
import re
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


def cuda_device_count(environ: dict[str, str] | None = None, dev: Path = Path("/dev")) -> int:
    """GPUs this process can see, without loading CUDA: ``CUDA_VISIBLE_DEVICES`` when set, else the
    ``/dev/nvidiaN`` nodes (what the NVIDIA container runtime or device plugin exposes); at least 1."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    try:
        nodes = [p for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name)]
    except OSError:
        nodes = []
    return max(1, len(nodes))


def instance_device(instance: int, devices: int | None = None) -> int:
    """CUDA device of model instance ``instance`` of this process: the worker's offset, then round robin."""
    count = cuda_device_count() if devices is None else devices
    return (_share.index + instance) % max(1, count)

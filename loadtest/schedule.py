"""Open-loop send schedules, drawn before a step starts so sending never depends on the server.

Three kinds (``--distribution``, ``--request-intervals``):

- ``poisson``: exponential gaps at the step's rate (independent arrivals, the default);
- ``constant``: gaps of exactly 1 / rate;
- ``replay``: recorded gaps read from a file (``read_intervals``), cycled when the file ends.

A schedule is a list of send offsets (s from the step start), at most ``limit`` of them, all below
``horizon_s``. With P client processes, ``part`` of ``parts`` is this process's share: its own
Poisson process at rate / P (a sum of independent Poisson processes is one of the full rate), or
every P-th send of the one constant or replayed schedule, so the processes together send it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from pathlib import Path

DISTRIBUTIONS = ("poisson", "constant")
REPLAY = "replay"


def poisson_schedule(rate: float, horizon_s: float, seed: int, limit: int) -> list[float]:
    """Send offsets of a Poisson process of ``rate``/s over ``horizon_s``, at most ``limit``."""
    rng = random.Random(seed)
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < horizon_s and len(out) < limit:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def gap_schedule(
    gaps_s: Sequence[float], horizon_s: float, limit: int, part: int = 0, parts: int = 1
) -> list[float]:
    """Offsets of sends separated by ``gaps_s`` (cycled; the first send one gap after the start),
    keeping sends ``part``, ``part + parts``, ... of them: this process's share."""
    if not gaps_s or sum(gaps_s) <= 0:
        raise ValueError("gaps must be non-empty with a positive sum")
    out: list[float] = []
    t = 0.0
    for i, gap in enumerate(itertools.cycle(gaps_s)):
        t += gap
        if t >= horizon_s or len(out) >= limit:
            break
        if i % parts == part:
            out.append(t)
    return out


def build_schedule(
    distribution: str,
    rate: float,
    intervals_s: Sequence[float],
    horizon_s: float,
    seed: int,
    limit: int,
    part: int = 0,
    parts: int = 1,
) -> list[float]:
    """This process's offsets; ``rate`` is this process's share (the step's rate / ``parts``)."""
    if distribution == "poisson":
        return poisson_schedule(rate, horizon_s, seed, limit)
    if distribution == "constant":
        return gap_schedule([1.0 / (rate * parts)], horizon_s, limit, part, parts)
    if distribution == REPLAY:
        return gap_schedule(intervals_s, horizon_s, limit, part, parts)
    raise ValueError(f"unknown distribution {distribution!r}")


def read_intervals(path: Path) -> tuple[float, ...]:
    """A ``--request-intervals`` file: one gap in milliseconds per line (the time from one send to
    the next; the first send comes one gap after the step starts); blank lines and lines starting
    with ``#`` are skipped. Returns the gaps in seconds. ValueError names the first bad line."""
    gaps: list[float] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            gap = float(text)
        except ValueError:
            raise ValueError(f"line {number}: {text[:40]!r} is not a number of milliseconds") from None
        if not math.isfinite(gap) or gap < 0:
            raise ValueError(f"line {number}: a gap must be a finite number of ms >= 0, got {text[:40]!r}")
        gaps.append(gap / 1e3)
    if not gaps or sum(gaps) <= 0:
        raise ValueError("no gaps with a positive sum (one gap in ms per line)")
    return tuple(gaps)


def mean_rate(intervals_s: Sequence[float]) -> float:
    """Requests/s that replaying ``intervals_s`` offers."""
    return len(intervals_s) / sum(intervals_s)

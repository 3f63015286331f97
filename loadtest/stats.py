"""Latency percentiles, per-window summaries and perf_analyzer-style stability detection.

Percentile method: **nearest rank**. The p-th percentile of n sorted samples is the sample at
1-based rank ``ceil(p / 100 * n)`` (rank 1 for p = 0). Every reported latency is one a request
actually saw; linear interpolation (numpy's default) would invent values between two samples and
under-report a sparse tail. ``max`` is p100.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already-sorted values; NaN for an empty sequence."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    # Rounded before the ceiling: 99.9 / 100 * 1000 is 999.0000000000001 in binary floating point.
    rank = max(1, math.ceil(round(p / 100.0 * n, 9)))
    return float(sorted_values[rank - 1])


def percentile_key(p: float) -> str:
    """The summary's key for percentile ``p``: 99 -> "p99_ms", 99.9 -> "p99.9_ms"."""
    return f"p{p:g}_ms"


def latency_summary(latencies_s: Sequence[float], extra: Sequence[float] = ()) -> dict[str, float]:
    """p50/p90/p95/p99/max/mean in milliseconds (NaN when there are no samples), plus the
    percentiles in ``extra`` (e.g. an SLO's p99.9)."""
    values = sorted(latencies_s)
    out = {percentile_key(p): percentile(values, p) * 1e3 for p in (*PERCENTILES, *extra)}
    out["max_ms"] = values[-1] * 1e3 if values else math.nan
    out["mean_ms"] = sum(values) / len(values) * 1e3 if values else math.nan
    return out


@dataclass(frozen=True)
class Window:
    """One measurement window: successful requests completed in [start_s, start_s + length_s)."""

    start_s: float
    length_s: float
    ok: int
    images: int
    p99_s: float

    @property
    def throughput(self) -> float:
        return self.ok / self.length_s if self.length_s > 0 else 0.0


def summarize_window(start_s: float, length_s: float, latencies_s: Sequence[float], images: int) -> Window:
    return Window(
        start_s=start_s,
        length_s=length_s,
        ok=len(latencies_s),
        images=images,
        p99_s=percentile(sorted(latencies_s), 99.0),
    )


def _within(values: Sequence[float], percent: float) -> bool:
    mean = sum(values) / len(values)
    if mean <= 0 or any(math.isnan(v) for v in values):
        return False
    return all(abs(v - mean) <= percent / 100.0 * mean for v in values)


def is_stable(windows: Sequence[Window], count: int, percent: float) -> bool:
    """True when each of the last ``count`` windows has throughput and p99 within ``percent`` % of
    their mean over those windows (the rule of Triton's perf_analyzer). A window with no
    completed request is never stable: a stalled server must not look steady."""
    if count < 1:
        raise ValueError("stability window count must be >= 1")
    if len(windows) < count:
        return False
    last = windows[-count:]
    if any(w.ok == 0 for w in last):
        return False
    return _within([w.throughput for w in last], percent) and _within([w.p99_s for w in last], percent)

"""Percentile math, stability rule, Poisson schedule and load sharing, on known data."""

from __future__ import annotations

import math
import random

import pytest

from loadtest.runner import StepSpec
from loadtest.schedule import poisson_schedule
from loadtest.stats import Window, is_stable, latency_summary, percentile


def test_nearest_rank_percentiles_on_known_data() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 90) == 90.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.5) == 100.0  # ceil(99.5) = rank 100
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    ten = [float(v) for v in range(10, 0, -1)][::-1]  # 1..10 sorted
    # ceil(0.95 * 10) = rank 10, ceil(0.9 * 10) = rank 9, ceil(0.5 * 10) = rank 5.
    assert (percentile(ten, 95), percentile(ten, 90), percentile(ten, 50)) == (10.0, 9.0, 5.0)
    # Always a value that was observed: no interpolation between 1 and 1000.
    assert percentile([1.0, 1000.0], 75) == 1000.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_latency_summary_in_ms_from_unsorted_seconds() -> None:
    lats = [i / 1000 for i in range(200, 0, -1)]  # 1..200 ms, reversed
    random.Random(0).shuffle(lats)
    s = latency_summary(lats)
    assert s["p50_ms"] == pytest.approx(100.0)
    assert s["p90_ms"] == pytest.approx(180.0)
    assert s["p95_ms"] == pytest.approx(190.0)
    assert s["p99_ms"] == pytest.approx(198.0)
    assert s["max_ms"] == pytest.approx(200.0)
    assert s["mean_ms"] == pytest.approx(100.5)
    assert all(math.isnan(v) for v in latency_summary([]).values())


def _w(throughput: float, p99_ms: float, ok: int | None = None) -> Window:
    n = int(throughput) if ok is None else ok
    return Window(start_s=0.0, length_s=1.0, ok=n, images=n, p99_s=p99_ms / 1e3)


def test_stability_needs_last_windows_within_percent_for_throughput_and_p99() -> None:
    steady = [_w(1000, 10), _w(1040, 10.4), _w(980, 9.8)]
    assert is_stable(steady, 3, 5.0)
    assert not is_stable(steady[:2], 3, 5.0)  # not enough windows yet
    assert not is_stable([*steady[:2], _w(1200, 10)], 3, 5.0)  # throughput jumped 20%
    assert not is_stable([*steady[:2], _w(1000, 14)], 3, 5.0)  # p99 drifted
    # Only the last windows count: an early ramp-up does not prevent stability.
    assert is_stable([_w(10, 100), *steady], 3, 5.0)
    # A stalled server (nothing completed) is never "stable at zero".
    assert not is_stable([_w(0, math.nan, ok=0)] * 3, 3, 5.0)


def test_poisson_schedule_has_the_rate_and_is_bounded() -> None:
    sched = poisson_schedule(rate=500.0, horizon_s=20.0, seed=1, limit=1_000_000)
    assert sched == sorted(sched) and sched[-1] < 20.0
    assert len(sched) / 20.0 == pytest.approx(500.0, rel=0.03)
    gaps = [b - a for a, b in zip(sched, sched[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv == pytest.approx(1.0, abs=0.05)  # exponential gaps: std == mean
    assert len(poisson_schedule(500.0, 20.0, seed=1, limit=100)) == 100
    assert poisson_schedule(500.0, 20.0, seed=1, limit=10**6) == sched  # deterministic per seed


def test_load_is_shared_among_processes() -> None:
    spec = StepSpec("closed", 10, 0, 1, 1, 100, 1)
    assert [spec.share(i, 3).load for i in range(3)] == [4, 3, 3]
    open_spec = StepSpec("open", 300.0, 0, 1, 1, 100, 1, seed=2)
    shares = [open_spec.share(i, 2) for i in range(2)]
    assert [s.load for s in shares] == [150.0, 150.0]
    assert shares[0].seed != shares[1].seed  # independent arrival processes


def test_latency_summary_adds_an_slos_percentile() -> None:
    lats = [i / 1000 for i in range(1, 1001)]  # 1..1000 ms
    s = latency_summary(lats, (99.9, 99.0))
    assert s["p99.9_ms"] == pytest.approx(999.0) and s["p99_ms"] == pytest.approx(990.0)
    assert set(s) == {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "p99.9_ms", "max_ms", "mean_ms"}

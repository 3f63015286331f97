"""The capacity search without a server: ``measure`` is a model of one (latency as a function of load)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loadtest.controller import StepResult
from loadtest.search import (
    FOUND,
    HIGHEST_MEETS,
    LOWEST_BREAKS,
    STOPPED,
    SearchSpace,
    Slo,
    find_capacity,
    judge,
)
from loadtest.stats import latency_summary


def step(load: float, p99_ms: float, mode: str = "closed", **kw: object) -> StepResult:
    lat = latency_summary([p99_ms / 1e3] * 10, (99.9,))
    fields: dict = dict(
        mode=mode,
        load=load,
        processes=1,
        stable=True,
        windows=3,
        measured_s=6.0,
        requests_per_s=min(load, 40.0) * 100,  # saturates at 40 in flight
        images_per_s=min(load, 40.0) * 100,
        latency_ms=lat,
        errors={},
        sent=1000,
        ok=1000,
        errors_total={},
    )
    return StepResult(**{**fields, **kw})  # type: ignore[arg-type]


def server(knee: float, mode: str = "closed") -> tuple[Callable[[float], StepResult], list[float]]:
    """p99 of 5 ms up to ``knee``, growing with the load beyond it; and the loads it was asked."""
    asked: list[float] = []

    def measure(load: float) -> StepResult:
        asked.append(load)
        return step(load, 5.0 if load <= knee else 5.0 * load / knee + 5.0, mode)

    return measure, asked


def test_closed_loop_search_finds_the_highest_concurrency_within_the_slo() -> None:
    measure, asked = server(knee=37)
    seen = []
    result = find_capacity(measure, Slo(10.0), SearchSpace("closed", 1, 256), on_probe=seen.append)
    assert result.outcome == FOUND
    assert asked[:7] == [1, 2, 4, 8, 16, 32, 64]  # the climb doubles until a probe breaks the SLO
    assert result.meets == 37 and result.breaks == 38  # then bisects to adjacent concurrencies
    assert result.knee is not None and result.knee.result.load == 37
    assert all(a == b for a, b in zip(asked[7:], [48, 40, 36, 38, 37], strict=True))
    assert seen == result.probes and len(result.probes) == len(asked)
    assert [p.meets for p in result.probes] == [p.result.load <= 37 for p in result.probes]
    assert result.summary() == [
        "knee: c=37: 3700.0 req/s (3700.0 images/s), p99 5.00 ms <= 10 ms",
        "boundary: c=37 meets the SLO, c=38 breaks: p99 10.14 ms > 10 ms",
    ]


def test_open_loop_search_stops_within_its_precision() -> None:
    measure, asked = server(knee=1234.0, mode="open")
    result = find_capacity(measure, Slo(10.0), SearchSpace("open", 100, 10_000, precision=0.05))
    assert result.outcome == FOUND
    assert result.meets is not None and result.breaks is not None
    assert result.meets <= 1234.0 < result.breaks and result.breaks - result.meets <= 0.05 * result.meets
    assert asked[:5] == [100, 200, 400, 800, 1600]
    assert result.knee is not None and result.knee.result.label.startswith("r=")


def test_even_the_lowest_load_breaking_the_slo_is_said_plainly() -> None:
    measure, asked = server(knee=0.5)
    result = find_capacity(measure, Slo(10.0), SearchSpace("closed", 1, 64))
    assert result.outcome == LOWEST_BREAKS and asked == [1] and result.knee is None
    (line,) = result.summary()
    assert "even the lowest load, c=1, breaks p99 <= 10 ms (p99 15.00 ms > 10 ms)" in line
    assert "--concurrency" in line and "--latency-threshold" in line


def test_the_highest_load_still_meeting_the_slo_is_said_plainly() -> None:
    measure, asked = server(knee=1000)
    result = find_capacity(measure, Slo(10.0), SearchSpace("closed", 2, 24))
    assert result.outcome == HIGHEST_MEETS and asked == [2, 4, 8, 16, 24]
    assert result.knee is not None and result.knee.result.load == 24
    assert "c=24, still meets p99 <= 10 ms" in result.summary()[0] and "high bound" in result.summary()[0]


def test_max_probes_bounds_the_search_and_says_where_the_knee_lies() -> None:
    measure, asked = server(knee=37)
    result = find_capacity(measure, Slo(10.0), SearchSpace("closed", 1, 256, max_probes=8))
    assert len(asked) == 8 and result.outcome == STOPPED
    assert result.stopped_by == "--max-probes (8)"
    assert "the knee lies between c=32 (meets) and c=48 (breaks)" in result.summary()[0]


def test_the_time_budget_is_checked_before_each_probe_with_the_longest_probe_so_far() -> None:
    now = [0.0]
    measure, asked = server(knee=37)

    def slow(load: float) -> StepResult:
        now[0] += 10.0 if load < 8 else 25.0  # each probe advances the fake clock
        return measure(load)

    result = find_capacity(
        slow, Slo(10.0), SearchSpace("closed", 1, 256, budget_s=75.0), clock=lambda: now[0]
    )
    # 1, 2, 4 take 10 s each, 8 takes 25 s (ends at 55 s); 55 + 25 > 75: 16 never starts.
    assert asked == [1, 2, 4, 8] and result.outcome == STOPPED
    assert result.stopped_by == "--search-budget (75 s)"
    assert "between c=8 (meets) and the range's high bound" in result.summary()[0]


def test_a_probe_with_failed_requests_breaks_the_slo_and_instability_is_said() -> None:
    slo = Slo(10.0)
    assert judge(step(4, 5.0), slo) == (True, "meets: p99 5.00 ms <= 10 ms")
    failed = step(4, 5.0, errors_total={"UNAVAILABLE": 11}, sent=1011)
    assert judge(failed, slo) == (False, "breaks: 11 failed (UNAVAILABLE=11)")
    assert judge(step(4, 5.0, stable=False), slo) == (True, "meets: p99 5.00 ms <= 10 ms (not stable)")
    nothing = step(4, 5.0, latency_ms=latency_summary([]))
    assert judge(nothing, slo)[1] == "breaks: no request answered"
    both = judge(step(4, 12.0, stable=False, errors_total={"DEADLINE_EXCEEDED": 2}), slo)[1]
    assert both == "breaks: 2 failed (DEADLINE_EXCEEDED=2); p99 12.00 ms > 10 ms (not stable)"


def test_an_unstable_probe_at_the_knee_is_named_in_the_summary() -> None:
    measure, _ = server(knee=5)

    def shaky(load: float) -> StepResult:
        r = measure(load)
        r.stable = load != 6
        return r

    result = find_capacity(shaky, Slo(10.0), SearchSpace("closed", 1, 16))
    assert result.knee is not None and result.knee.result.load == 5
    assert result.summary()[-1].startswith("note: a probe at the knee was not stable")
    steady = find_capacity(server(knee=5)[0], Slo(10.0), SearchSpace("closed", 1, 16))
    assert not any(line.startswith("note:") for line in steady.summary())


def test_any_percentile_can_be_the_slo() -> None:
    slo = Slo(4.0, percentile=99.9)
    r = step(4, 3.0)
    assert str(slo) == "p99.9 <= 4 ms" and slo.value(r) == pytest.approx(3.0)
    assert judge(r, slo) == (True, "meets: p99.9 3.00 ms <= 4 ms")
    assert not judge(step(4, 4.5), slo)[0]


def test_the_search_report_lists_every_probe() -> None:
    measure, _ = server(knee=5)
    doc = find_capacity(measure, Slo(10.0), SearchSpace("closed", 1, 16)).to_dict()
    assert doc["outcome"] == FOUND and doc["knee_load"] == 5 and doc["lowest_breaking_load"] == 6
    assert [p["load"] for p in doc["probes"]] == [1, 2, 4, 8, 6, 5]
    assert doc["summary"] and doc["threshold_ms"] == 10.0 and doc["percentile"] == 99.0

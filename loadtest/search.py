"""Capacity within a latency budget: the highest throughput whose latency percentile stays within
a threshold (an SLO such as "p99 <= 10 ms"), found by a bounded search over one kind of load.

``find_capacity(measure, slo, space)`` knows nothing of servers: ``measure(load)`` runs one step
(closed loop: that concurrency; open loop: that request rate) to a stable measurement and returns
its ``StepResult``. The CLI passes a load-test client's step; a configuration search passes the
same for each candidate setting. Each probe either meets the SLO (no failed request, the
percentile within the threshold) or breaks it, and says why. A probe that ran to ``--duration``
without becoming stable is judged on its last windows all the same (an unstable step far below
the threshold must not end a search on a busy machine), and its verdict says "not stable"; the
summary names the knee's and its neighbour's instability, the cue to measure longer.

The search: probe the lowest load (if it breaks the SLO, nothing in the range meets it); double
the load until a probe breaks it or the highest load is reached (then the capacity is above the
range); then bisect between the highest load that met it and the lowest that broke it, until the
two are within ``precision`` of each other (closed loop: adjacent concurrencies). The knee is the
probe that met the SLO with the highest throughput. ``max_probes`` and ``budget_s`` bound it:
no probe starts once as many probes have run, or when the time spent plus the longest probe so
far would pass the budget; the result then says between which loads the knee lies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loadtest.controller import StepResult
from loadtest.stats import percentile_key

FOUND = "found"
LOWEST_BREAKS = "lowest-breaks"
HIGHEST_MEETS = "highest-meets"
STOPPED = "stopped"


@dataclass(frozen=True)
class Slo:
    threshold_ms: float
    percentile: float = 99.0

    @property
    def name(self) -> str:
        return f"p{self.percentile:g}"

    def value(self, r: StepResult) -> float:
        """The step's latency at this percentile (ms; NaN when nothing was answered)."""
        return r.latency_ms.get(percentile_key(self.percentile), math.nan)

    def __str__(self) -> str:
        return f"{self.name} <= {self.threshold_ms:g} ms"


@dataclass(frozen=True)
class SearchSpace:
    mode: str  # "closed": concurrency; "open": requests/s
    low: float
    high: float
    max_probes: int = 16
    budget_s: float = 600.0
    precision: float = 0.05  # bisect until high - low <= precision * low

    @property
    def flag(self) -> str:
        return "--concurrency" if self.mode == "closed" else "--request-rate"

    def label(self, load: float) -> str:
        return f"c={int(load)}" if self.mode == "closed" else f"r={load:g}/s"

    def up(self, load: float) -> float:
        """The next load of the climb: twice this one, at most ``high``."""
        return min(self.high, float(math.floor(2 * load)) if self.mode == "closed" else 2 * load)

    def between(self, meets: float, breaks: float) -> float | None:
        """The next load to bisect at, or None once the two are close enough."""
        if breaks - meets <= self.precision * meets:
            return None
        if self.mode == "closed":
            mid = float((int(meets) + int(breaks)) // 2)
            return mid if meets < mid < breaks else None
        rounded = float(f"{(meets + breaks) / 2:.3g}")  # a readable rate, well within precision
        return rounded if meets < rounded < breaks else (meets + breaks) / 2


@dataclass
class Probe:
    result: StepResult
    meets: bool
    verdict: str  # e.g. "meets: p99 8.12 ms <= 10 ms" or "breaks: p99 12.40 ms > 10 ms"
    seconds: float  # how long the probe took, warm-up and drain included

    def to_dict(self) -> dict[str, Any]:
        return {
            "load": self.result.load,
            "meets": self.meets,
            "verdict": self.verdict,
            "seconds": self.seconds,
        }


def judge(r: StepResult, slo: Slo) -> tuple[bool, str]:
    """Whether a step meets the SLO, and why (every reason it does not)."""
    value = slo.value(r)
    why = []
    if r.failed:
        codes = " ".join(f"{k}={v}" for k, v in sorted(r.errors_total.items()))
        why.append(f"{r.failed} failed ({codes})")
    if math.isnan(value):
        why.append("no request answered")
    elif value > slo.threshold_ms:
        why.append(f"{slo.name} {value:.2f} ms > {slo.threshold_ms:g} ms")
    unstable = "" if r.stable else " (not stable)"
    if why:
        return False, "breaks: " + "; ".join(why) + unstable
    return True, f"meets: {slo.name} {value:.2f} ms <= {slo.threshold_ms:g} ms{unstable}"


@dataclass
class SearchResult:
    slo: Slo
    space: SearchSpace
    probes: list[Probe] = field(default_factory=list)
    outcome: str = STOPPED
    stopped_by: str = ""  # "--max-probes" or "--search-budget" when the bounds ended the search
    meets: float | None = None  # the highest load that met the SLO
    breaks: float | None = None  # the lowest load above it that broke it

    @property
    def knee(self) -> Probe | None:
        """The probe that met the SLO with the highest throughput."""
        good = [p for p in self.probes if p.meets]
        return max(good, key=lambda p: p.result.requests_per_s) if good else None

    def summary(self) -> list[str]:
        """What the search found, in sentences."""
        s, knee = self.space, self.knee
        lines = []
        if self.outcome == LOWEST_BREAKS:
            why = self.probes[0].verdict.removeprefix("breaks: ")
            lines.append(
                f"even the lowest load, {s.label(s.low)}, breaks {self.slo} ({why}): no load "
                f"in the range meets it; lower {s.flag}'s low bound or raise --latency-threshold"
            )
        elif self.outcome == HIGHEST_MEETS:
            lines.append(
                f"the highest load probed, {s.label(s.high)}, still meets {self.slo}: the capacity is above "
                f"the searched range; raise {s.flag}'s high bound"
            )
        elif self.outcome == STOPPED:
            above = (
                s.label(self.breaks) + " (breaks)" if self.breaks is not None else "the range's high bound"
            )
            below = s.label(self.meets) + " (meets)" if self.meets is not None else "the range's low bound"
            lines.append(
                f"the search stopped at {self.stopped_by}: the knee lies between {below} and {above}"
            )
        if knee is not None:
            r = knee.result
            lines.append(
                f"knee: {r.label}: {r.requests_per_s:.1f} req/s ({r.images_per_s:.1f} images/s), "
                f"{self.slo.name} {self.slo.value(r):.2f} ms <= {self.slo.threshold_ms:g} ms"
            )
        if self.outcome == FOUND and self.meets is not None and self.breaks is not None:
            lines.append(
                f"boundary: {s.label(self.meets)} meets the SLO, {s.label(self.breaks)} "
                f"{self._verdict(self.breaks)}"
            )
        edge = [p for p in self.probes if p is knee or p.result.load == self.breaks]
        if any(not p.result.stable for p in edge):
            lines.append(
                "note: a probe at the knee was not stable: on a busy machine, measure longer "
                "(--duration, --window) or allow more spread (--stability-percent)"
            )
        return lines

    def _verdict(self, load: float) -> str:
        """The last verdict at ``load``, e.g. "breaks: p99 12.40 ms > 10 ms"."""
        return next(p.verdict for p in reversed(self.probes) if p.result.load == load)

    def to_dict(self) -> dict[str, Any]:
        knee = self.knee
        return {
            "threshold_ms": self.slo.threshold_ms,
            "percentile": self.slo.percentile,
            "mode": self.space.mode,
            "low": self.space.low,
            "high": self.space.high,
            "max_probes": self.space.max_probes,
            "budget_s": self.space.budget_s,
            "outcome": self.outcome,
            "stopped_by": self.stopped_by,
            "knee_load": knee.result.load if knee else None,
            "knee_requests_per_s": knee.result.requests_per_s if knee else None,
            "knee_images_per_s": knee.result.images_per_s if knee else None,
            "highest_meeting_load": self.meets,
            "lowest_breaking_load": self.breaks,
            "probes": [p.to_dict() for p in self.probes],
            "summary": self.summary(),
        }


class _Stop(Exception):
    """The search's bounds (probes, time) allow no further probe."""


def find_capacity(
    measure: Callable[[float], StepResult],
    slo: Slo,
    space: SearchSpace,
    on_probe: Callable[[Probe], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Search ``space`` for the highest load meeting ``slo``; see the module's docstring."""
    out = SearchResult(slo, space)
    start = clock()

    def probe(load: float) -> bool:
        longest = max((p.seconds for p in out.probes), default=0.0)
        if len(out.probes) >= space.max_probes:
            out.stopped_by = f"--max-probes ({space.max_probes})"
            raise _Stop
        if out.probes and clock() - start + longest > space.budget_s:
            out.stopped_by = f"--search-budget ({space.budget_s:g} s)"
            raise _Stop
        t = clock()
        r = measure(load)
        meets, verdict = judge(r, slo)
        p = Probe(r, meets, verdict, clock() - t)
        out.probes.append(p)
        if on_probe is not None:
            on_probe(p)
        return meets

    try:
        out.outcome = _climb_and_bisect(probe, space, out)
    except _Stop:
        out.outcome = STOPPED
    return out


def _climb_and_bisect(probe: Callable[[float], bool], space: SearchSpace, out: SearchResult) -> str:
    if not probe(space.low):
        out.breaks = space.low
        return LOWEST_BREAKS
    out.meets = load = space.low
    while load < space.high:
        load = space.up(load)
        if not probe(load):
            out.breaks = load
            break
        out.meets = load
    else:
        return HIGHEST_MEETS
    assert out.breaks is not None
    while (mid := space.between(out.meets, out.breaks)) is not None:
        if probe(mid):
            out.meets = mid
        else:
            out.breaks = mid
    return FOUND

"""Merging windows from the client processes, deciding when a step is done, and its result."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.runner import ProcessTotals, StepSpec, WindowData
from loadtest.stats import Window, is_stable, latency_summary, percentile, summarize_window


@dataclass
class StepResult:
    mode: str
    load: float  # concurrency or offered requests/s, all processes together
    processes: int
    stable: bool
    windows: int  # measurement windows run
    measured_s: float  # length of the windows the numbers below come from
    requests_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]  # p50/p90/p95/p99/max/mean over the reported windows
    errors: dict[str, int]  # by code (gRPC status name, or HTTP_<status>), in the reported windows
    sent: int  # whole step, warm-up included, all processes
    ok: int
    errors_total: dict[str, int]  # by code, the whole step (warm-up and unreported windows included)
    send_lag_ms: dict[str, float] | None = None  # open loop: how late requests left vs. schedule
    # Open loop: latency from the actual send (``latency_ms`` counts from the scheduled send; the
    # difference is the time requests waited to be sent, i.e. queueing ahead of the server).
    service_ms: dict[str, float] | None = None
    distribution: str | None = None  # open loop: poisson, constant or replay
    window_series: list[dict[str, float]] = field(default_factory=list)
    server: dict[str, float] | None = None  # from --metrics-url

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"c={int(self.load)}"
        if self.distribution == "replay":
            return f"replay {self.load:.0f}/s"
        return f"r={self.load:g}/s"

    @property
    def failed(self) -> int:
        """Requests of the whole step that got no good answer."""
        return sum(self.errors_total.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StepController:
    """Collects windows from ``sources`` client processes. Window k counts once every process has
    delivered it; the step is done when the last ``stability_windows`` are stable (throughput and
    p99 within ``stability_percent``) or after ``max_windows``."""

    def __init__(
        self,
        spec: StepSpec,
        sources: int,
        stability_windows: int,
        stability_percent: float,
        images_per_request: int,
    ) -> None:
        self.spec = spec
        self.sources = sources
        self.count = stability_windows
        self.percent = stability_percent
        self.k = images_per_request
        self.max_windows = max(stability_windows, int(spec.duration_s / spec.window_s + 1e-9))
        self._parts: dict[int, list[WindowData]] = {}
        self._partials: list[WindowData] = []
        self.windows: list[Window] = []
        self._data: list[list[WindowData]] = []  # merged, parallel to ``windows``
        self.stable = False
        self.done = False

    def add(self, w: WindowData) -> None:
        if w.partial:
            self._partials.append(w)
            return
        parts = self._parts.setdefault(w.index, [])
        parts.append(w)
        # Windows close in order in every process, so index len(windows) is the next to complete.
        while len(self._parts.get(len(self.windows), ())) == self.sources:
            idx = len(self.windows)
            merged = self._parts.pop(idx)
            lats = [x for p in merged for x in p.latencies]
            start = idx * self.spec.window_s
            self.windows.append(
                summarize_window(start, self.spec.window_s, lats, sum(p.images for p in merged))
            )
            self._data.append(merged)
            if not self.done:
                self.stable = is_stable(self.windows, self.count, self.percent)
                self.done = self.stable or len(self.windows) >= self.max_windows

    def result(self, load: float, processes: int, totals: list[ProcessTotals]) -> StepResult:
        """Numbers from the last ``stability_windows`` windows (the stable ones, when stable);
        if the run ended before any window closed, from everything after the warm-up."""
        if self._data:
            chosen = [p for parts in self._data[-self.count :] for p in parts]
            measured = min(self.count, len(self._data)) * self.spec.window_s
        else:
            chosen = self._partials
            measured = max((p.length_s for p in self._partials), default=0.0)
        lats = [x for p in chosen for x in p.latencies]
        extra = (self.spec.percentile,)
        errors: Counter[str] = Counter()
        for p in chosen:
            errors.update(p.errors)
        errors_total: Counter[str] = Counter()
        for t in totals:
            errors_total.update(t.errors)
        lag = sorted(x for t in totals for x in t.send_lag_s)
        send_lag = service = None
        if self.spec.mode == "open":
            send_lag = {
                "p50_ms": percentile(lag, 50) * 1e3,
                "p99_ms": percentile(lag, 99) * 1e3,
                "max_ms": lag[-1] * 1e3 if lag else math.nan,
            }
            service = latency_summary([x for p in chosen for x in p.service], extra)
        return StepResult(
            mode=self.spec.mode,
            load=load,
            processes=processes,
            stable=self.stable,
            windows=len(self.windows),
            measured_s=measured,
            requests_per_s=len(lats) / measured if measured > 0 else 0.0,
            images_per_s=sum(p.images for p in chosen) / measured if measured > 0 else 0.0,
            latency_ms=latency_summary(lats, extra),
            errors=dict(errors),
            sent=sum(t.sent for t in totals),
            ok=sum(t.ok for t in totals),
            errors_total=dict(errors_total),
            send_lag_ms=send_lag,
            service_ms=service,
            distribution=self.spec.distribution if self.spec.mode == "open" else None,
            window_series=[{"requests_per_s": w.throughput, "p99_ms": w.p99_s * 1e3} for w in self.windows],
        )

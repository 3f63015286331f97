"""Outputs: a table on stdout, warnings on stderr, JSON (everything), CSV (one row per step); the
PNG plots are in ``loadtest.plots``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.controller import StepResult
from loadtest.search import SearchResult

CSV_FIELDS = (
    "mode",
    "load",
    "processes",
    "stable",
    "windows",
    "measured_s",
    "requests_per_s",
    "images_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "errors",
    "errors_total",
    "sent",
    "ok",
    "send_lag_p99_ms",
    "service_p50_ms",
    "service_p99_ms",
    "server_queue_wait_ms",
    "server_compute_ms",
    "server_batch_size",
    "slo",
)
# The client fell behind its open-loop schedule when its reported requests typically left late
# (median latency from the schedule minus median latency from the send) by this share of the
# median latency, and by more than LAG_WARN_MIN_MS: the event loop's timer jitter (a tail of a few
# ms on a busy machine) is not falling behind, and the "from send" row shows what it adds.
LAG_WARN_SHARE = 0.10
LAG_WARN_MIN_MS = 1.0


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _errors(e: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(e.items())) or "0"


def table_header(with_server: bool) -> str:
    cols = (
        f"{'step':>12} {'req/s':>9} {'img/s':>9} {'p50':>8} {'p90':>8} {'p95':>8} {'p99':>8} {'max':>8}"
        "  stable  errors (whole step)"
    )
    if with_server:
        cols += "   | srv queue  compute  batch"
    return cols + "\n" + "-" * len(cols)


def _percentiles(lat: dict[str, float]) -> str:
    return " ".join(f"{_fmt(lat[k]):>8}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"))


def table_row(r: StepResult) -> str:
    """One step: throughput, latency percentiles, stable, and the errors of the *whole* step (its
    warm-up and the windows not reported included: a failure anywhere in the step shows)."""
    row = (
        f"{r.label:>12} {_fmt(r.requests_per_s, 1):>9} {_fmt(r.images_per_s, 1):>9} {_percentiles(r.latency_ms)}"
        f"  {'yes' if r.stable else 'NO':>6}  {_errors(r.errors_total)}"
    )
    if r.server is not None:
        s = r.server
        row += f"   | {_fmt(s.get('queue_wait_ms')):>9} {_fmt(s.get('compute_ms')):>8} {_fmt(s.get('batch_size'), 1):>6}"
    if r.service_ms is not None:
        # Open loop: the same requests' latency from the actual send, under the schedule-based one.
        row += f"\n{'from send':>12} {'':>9} {'':>9} {_percentiles(r.service_ms)}"
    return row


def warnings(r: StepResult) -> list[str]:
    """What a reader must not miss about a step: failed requests, and an open-loop client that
    fell behind its schedule."""
    out = []
    if r.failed:
        out.append(
            f"{r.label}: {r.failed} of {r.sent} requests failed ({_errors(r.errors_total)}); "
            "latency and throughput count answered requests only"
        )
    lag, svc, p50 = r.send_lag_ms, r.service_ms, r.latency_ms["p50_ms"]
    behind = p50 - svc["p50_ms"] if svc is not None else math.nan
    if lag is not None and behind > max(LAG_WARN_MIN_MS, LAG_WARN_SHARE * p50):
        out.append(
            f"{r.label}: the client fell behind its schedule: its requests typically left {behind:.1f} ms "
            f"late (send lag over the step: p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms, "
            f"max {lag['max_ms']:.1f} ms), and that much of the latency is the client's; add --processes "
            "or use a less busy client machine"
        )
    return out


def write_json(
    path: Path, meta: dict[str, Any], results: Sequence[StepResult], search: SearchResult | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [{**r.to_dict(), "warnings": warnings(r)} for r in results]
    doc = {**meta, "percentile_method": "nearest-rank", "steps": steps}
    if search is not None:
        doc["search"] = search.to_dict()
    # NaN (no samples) is not JSON: write null.
    text = json.dumps(doc, indent=2, default=str).replace("NaN", "null")
    path.write_text(text + "\n")


def csv_row(r: StepResult, slo: str = "") -> dict[str, Any]:
    s = r.server or {}
    svc = r.service_ms or {}
    row = {
        "mode": r.mode,
        "load": r.load,
        "processes": r.processes,
        "stable": r.stable,
        "windows": r.windows,
        "measured_s": round(r.measured_s, 3),
        "requests_per_s": round(r.requests_per_s, 2),
        "images_per_s": round(r.images_per_s, 2),
        **{k: round(v, 3) for k, v in r.latency_ms.items()},
        "errors": _errors(r.errors),
        "errors_total": _errors(r.errors_total),
        "sent": r.sent,
        "ok": r.ok,
        "send_lag_p99_ms": round(r.send_lag_ms["p99_ms"], 3) if r.send_lag_ms else "",
        "service_p50_ms": round(svc["p50_ms"], 3) if svc else "",
        "service_p99_ms": round(svc["p99_ms"], 3) if svc else "",
        "server_queue_wait_ms": s.get("queue_wait_ms", ""),
        "server_compute_ms": s.get("compute_ms", ""),
        "server_batch_size": s.get("batch_size", ""),
        "slo": slo,
    }
    return row


def write_csv(path: Path, results: Sequence[StepResult], search: SearchResult | None = None) -> None:
    """One row per step; in a search, ``slo`` holds each probe's verdict."""
    verdicts = [p.verdict for p in search.probes] if search is not None else [""] * len(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r, verdict in zip(results, verdicts, strict=True):
            w.writerow(csv_row(r, verdict))

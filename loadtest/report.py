"""Outputs: a table on stdout, JSON (everything), CSV (one row per step), PNG (latency vs throughput)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.controller import StepResult

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
    "sent",
    "ok",
    "send_lag_p99_ms",
    "server_queue_wait_ms",
    "server_compute_ms",
    "server_batch_size",
)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _errors(e: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(e.items())) or "0"


def table_header(with_server: bool) -> str:
    cols = f"{'step':>12} {'req/s':>9} {'img/s':>9} {'p50':>8} {'p90':>8} {'p95':>8} {'p99':>8} {'max':>8}  stable  errors"
    if with_server:
        cols += "   | srv queue  compute  batch"
    return cols + "\n" + "-" * len(cols)


def table_row(r: StepResult) -> str:
    lat = r.latency_ms
    row = (
        f"{r.label:>12} {_fmt(r.requests_per_s, 1):>9} {_fmt(r.images_per_s, 1):>9} {_fmt(lat['p50_ms']):>8} "
        f"{_fmt(lat['p90_ms']):>8} {_fmt(lat['p95_ms']):>8} {_fmt(lat['p99_ms']):>8} {_fmt(lat['max_ms']):>8}  "
        f"{'yes' if r.stable else 'NO':>6}  {_errors(r.errors)}"
    )
    if r.server is not None:
        s = r.server
        row += f"   | {_fmt(s.get('queue_wait_ms')):>9} {_fmt(s.get('compute_ms')):>8} {_fmt(s.get('batch_size'), 1):>6}"
    return row


def format_table(results: Sequence[StepResult]) -> str:
    with_server = any(r.server is not None for r in results)
    return "\n".join([table_header(with_server), *(table_row(r) for r in results)]) + "\n(latencies in ms)"


def write_json(path: Path, meta: dict[str, Any], results: Sequence[StepResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "percentile_method": "nearest-rank", "steps": [r.to_dict() for r in results]}
    # NaN (no samples) is not JSON: write null.
    text = json.dumps(doc, indent=2, default=str).replace("NaN", "null")
    path.write_text(text + "\n")


def csv_row(r: StepResult) -> dict[str, Any]:
    s = r.server or {}
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
        "sent": r.sent,
        "ok": r.ok,
        "send_lag_p99_ms": round(r.send_lag_ms["p99_ms"], 3) if r.send_lag_ms else "",
        "server_queue_wait_ms": s.get("queue_wait_ms", ""),
        "server_compute_ms": s.get("compute_ms", ""),
        "server_batch_size": s.get("batch_size", ""),
    }
    return row


def write_csv(path: Path, results: Sequence[StepResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(csv_row(r))


def write_plot(path: Path, results: Sequence[StepResult], title: str) -> None:
    """Latency percentiles (y, ms, log) against achieved throughput (x, images/s), one line per
    loop kind and percentile; each point is labelled with its step. matplotlib is not in [serve]
    (the server does not need it): it comes with the [plot] extra."""
    try:
        import matplotlib
    except ImportError as e:
        from loadtest.config import PLOT_HINT

        raise RuntimeError(f"--plot needs matplotlib: {PLOT_HINT}") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"p50_ms": "tab:blue", "p90_ms": "tab:orange", "p99_ms": "tab:red"}
    for mode, style in (("closed", "-o"), ("open", "--s")):
        rs = sorted((r for r in results if r.mode == mode), key=lambda r: r.images_per_s)
        if not rs:
            continue
        x = [r.images_per_s for r in rs]
        for key, color in colors.items():
            ax.plot(x, [r.latency_ms[key] for r in rs], style, color=color, label=f"{mode} loop {key[:-3]}")
        for r in rs:
            ax.annotate(
                r.label,
                (r.images_per_s, r.latency_ms["p99_ms"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

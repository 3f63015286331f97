"""PNG plots: a sweep's latency percentiles against throughput, and a capacity search's chosen
percentile against throughput with the threshold drawn. matplotlib is not in [serve] (the server
does not need it): it comes with the [plot] extra."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest.controller import StepResult
from loadtest.search import SearchResult


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        from loadtest.config import PLOT_HINT

        raise RuntimeError(f"--plot needs matplotlib: {PLOT_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _point_label(r: StepResult) -> str:
    """The step, and its failed requests by code where it had any (a reader must see them)."""
    if not r.failed:
        return r.label
    return r.label + "\n" + " ".join(f"{k}={v}" for k, v in sorted(r.errors_total.items()))


def _annotate(ax: Any, r: StepResult, y: float, right_half: bool) -> None:
    """The point's label, leaning inwards (left of points in the right half), kept out of the
    layout so a long error list never shrinks the axes."""
    color = "tab:red" if r.failed else "black"
    ha, dx = ("right", -3) if right_half else ("left", 3)
    text = ax.annotate(
        _point_label(r),
        (r.images_per_s, y),
        fontsize=7,
        color=color,
        ha=ha,
        xytext=(dx, 3),
        textcoords="offset points",
    )
    text.set_in_layout(False)


def _right_half(results: Sequence[StepResult]) -> Callable[[StepResult], bool]:
    xs = [r.images_per_s for r in results]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    return lambda r: len(xs) > 1 and r.images_per_s > middle


def _finish(fig: Any, ax: Any, path: Path, title: str, ylabel: str = "latency (ms)") -> None:
    import matplotlib.ticker

    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_plot(path: Path, results: Sequence[StepResult], title: str) -> None:
    """Latency percentiles (y, ms, log) against achieved throughput (x, images/s), one line per
    loop kind and percentile; each point is labelled with its step and, in red, its failed
    requests by code; open-loop steps add their p99 from the actual send (dotted)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"p50_ms": "tab:blue", "p90_ms": "tab:orange", "p99_ms": "tab:red"}
    for mode, style in (("closed", "-o"), ("open", "--s")):
        rs = sorted((r for r in results if r.mode == mode), key=lambda r: r.images_per_s)
        if not rs:
            continue
        x = [r.images_per_s for r in rs]
        for key, color in colors.items():
            ax.plot(x, [r.latency_ms[key] for r in rs], style, color=color, label=f"{mode} loop {key[:-3]}")
        if mode == "open":
            svc = [r.service_ms["p99_ms"] if r.service_ms else float("nan") for r in rs]
            ax.plot(x, svc, ":^", color="tab:purple", label="open loop p99 from send")
        right = _right_half(rs)
        for r in rs:
            _annotate(ax, r, r.latency_ms["p99_ms"], right(r))
    _finish(fig, ax, path, title)
    plt.close(fig)


def write_search_plot(path: Path, search: SearchResult, title: str) -> None:
    """Each probe's SLO percentile (y, ms, log) against its throughput (x, images/s), in probe
    order of load; green where it met the SLO, red where it broke it; the threshold as a dashed
    line and the knee as a star."""
    plt = _pyplot()
    slo = search.slo
    fig, ax = plt.subplots(figsize=(8, 5))
    probes = sorted(search.probes, key=lambda p: p.result.load)
    x = [p.result.images_per_s for p in probes]
    y = [slo.value(p.result) for p in probes]
    ax.plot(x, y, "-", color="tab:gray", alpha=0.6)
    for met, color, word in ((True, "tab:green", "meets"), (False, "tab:red", "breaks")):
        pts = [(xi, yi) for xi, yi, p in zip(x, y, probes, strict=True) if p.meets == met]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o", color=color, label=f"{word} {slo}")
    right = _right_half([p.result for p in probes])
    for p, yi in zip(probes, y, strict=True):
        _annotate(ax, p.result, yi, right(p.result))
    ax.axhline(slo.threshold_ms, color="tab:red", linestyle="--", label=f"threshold {slo.threshold_ms:g} ms")
    if (knee := search.knee) is not None:
        ax.plot(
            [knee.result.images_per_s],
            [slo.value(knee.result)],
            "*",
            color="gold",
            markersize=16,
            markeredgecolor="black",
            label=f"knee {knee.result.label}",
        )
    _finish(fig, ax, path, title, f"{slo.name} latency (ms)")
    plt.close(fig)

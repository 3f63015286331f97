"""bench/serve_bench.py's report: what is measured, the targets, the Markdown tables and ratios."""

from __future__ import annotations

from typing import Any

MODELS = {  # name -> (arch, dataset, input shape)
    "lenet": ("lenet5", "fashion-mnist", (1, 28, 28)),
    "resnet18": ("resnet18", "cifar10", (3, 32, 32)),
}
TARGETS = {
    "resnet18 c=64 1-img: ours / in-process max batch": 0.75,
    "resnet18 c=64 32-img: ours / in-process max batch": 0.9,
    "resnet18 c=64: ours / naive": 1.8,
    "lenet c=64 1-img: ours / bare echo": 0.8,
    "lenet c=64 1-img: ours / bare echo (h2load client)": 0.8,
}
C1_EXCESS_MS = 0.5  # concurrency 1: our p50 may exceed in-process batch-1 p50 by at most this
H2 = " (h2load client)"  # label suffix of the rows measured with h2load instead of cnn-loadtest


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one setup, the one with the median images/s (a real run, not a blend)."""
    key = "images_per_s"
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def merge_repeats(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": reps[0]["shape"], "repeats": len(reps)}
    for key in ("inprocess_b1", "inprocess_max", "ours_big"):
        out[key] = median_run([r[key] for r in reps])
    for key in ("echo", "naive", "ours", "echo_h2", "ours_h2"):
        if key in reps[0]:
            out[key] = {c: median_run([r[key][c] for r in reps]) for c in reps[0][key]}
    return out


def ratios(results: dict[str, Any], top: int) -> list[dict[str, Any]]:
    rows: list[tuple[str, float]] = []
    if (r18 := results.get("resnet18")) is not None:
        best = r18["inprocess_max"]["images_per_s"]
        rows += [
            ("resnet18 c=64 1-img: ours / in-process max batch", r18["ours"][top]["images_per_s"] / best),
            ("resnet18 c=64 32-img: ours / in-process max batch", r18["ours_big"]["images_per_s"] / best),
            (
                "resnet18 c=64: ours / naive",
                r18["ours"][top]["images_per_s"] / r18["naive"][top]["images_per_s"],
            ),
        ]
    if (lenet := results.get("lenet")) is not None:
        for suffix, ours, echo in (("", "ours", "echo"), (H2, "ours_h2", "echo_h2")):
            if ours in lenet and top in lenet[ours] and top in lenet[echo]:
                value = lenet[ours][top]["requests_per_s"] / lenet[echo][top]["requests_per_s"]
                rows.append((f"lenet c=64 1-img: ours / bare echo{suffix}", value))
    out = [{"ratio": k, "value": v, "target": TARGETS[k], "pass": v >= TARGETS[k]} for k, v in rows]
    for name in MODELS:
        if (m := results.get(name)) is None:
            continue
        for suffix, ours in (("", "ours"), (H2, "ours_h2")):
            if 1 not in m.get(ours, {}):
                continue
            p50, base = m[ours][1]["latency_ms"]["p50_ms"], m["inprocess_b1"]["p50_ms"]
            out.append(
                {
                    "ratio": f"{name} c=1: ours p50 - in-process batch-1 p50 (ms){suffix}",
                    "value": p50 - base,
                    "target": C1_EXCESS_MS,
                    "pass": p50 - base <= C1_EXCESS_MS,
                    "lower_is_better": True,
                }
            )
    return out


def _srv(s: dict[str, Any]) -> str:
    srv = s.get("server") or {}
    if not srv:
        return ""
    nan = float("nan")
    return f"{srv.get('batch_size', nan):.1f} / {srv.get('queue_wait_ms', nan):.2f} / {srv.get('compute_ms', nan):.2f}"


def table(results: dict[str, Any], max_batch: int, concurrency: tuple[int, ...], big_request: int) -> str:
    """Markdown: one row per setup; server columns from cnn-serve's /metrics for our server."""
    lines = [
        "| model | setup | req/s | img/s | p50 ms | p99 ms | server CPU us/req | server batch / queue ms / compute ms |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in MODELS:
        if (m := results.get(name)) is None:
            continue
        for label, key in (
            ("in-process batch 1", "inprocess_b1"),
            (f"in-process batch {max_batch}", "inprocess_max"),
        ):
            lines.append(
                f"| {name} | {label} | | {m[key]['images_per_s']:.1f} | {m[key]['p50_ms']:.2f} | | |"
            )
        steps = [(f"bare echo c={c}", s) for c, s in m["echo"].items()]
        steps += [(f"naive c={c}", s) for c, s in m["naive"].items()]
        steps += [(f"ours c={c}", s) for c, s in m["ours"].items()]
        steps.append((f"ours c={max(concurrency)} x {big_request} images", m["ours_big"]))
        steps += [(f"bare echo c={c}{H2}", s) for c, s in m.get("echo_h2", {}).items()]
        steps += [(f"ours c={c}{H2}", s) for c, s in m.get("ours_h2", {}).items()]
        for label, s in steps:
            lat = s["latency_ms"]
            lines.append(
                f"| {name} | {label} | {s['requests_per_s']:.1f} | {s['images_per_s']:.1f} | "
                f"{lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {s['server_cpu_us_per_request']:.0f} | "
                f"{_srv(s)} |"
            )
    return "\n".join(lines)


def ratio_table(rat: list[dict[str, Any]]) -> str:
    lines = ["| ratio | measured | target | |", "|---|---:|---:|---|"]
    for r in rat:
        op = "<=" if r.get("lower_is_better") else ">="
        lines.append(
            f"| {r['ratio']} | {r['value']:.2f} | {op} {r['target']} | {'ok' if r['pass'] else 'MISSED'} |"
        )
    return "\n".join(lines)

"""bench/serve_report.py: the ratios against the targets, from both clients' rows."""

from __future__ import annotations

from bench.serve_report import merge_repeats, ratio_table, ratios, table


def step(req_s: float, p50: float, k: int = 1) -> dict:
    return {
        "requests_per_s": req_s,
        "images_per_s": req_s * k,
        "latency_ms": {"p50_ms": p50, "p99_ms": 2 * p50},
        "server_cpu_us_per_request": 100.0,
    }


def lenet_run(scale: float = 1.0) -> dict:
    return {
        "shape": [1, 28, 28],
        "inprocess_b1": {"images_per_s": 20000.0 * scale, "p50_ms": 0.05},
        "inprocess_max": {"images_per_s": 70000.0 * scale, "p50_ms": 0.9},
        "echo": {1: step(2000 * scale, 0.5), 64: step(5000 * scale, 12.0)},
        "naive": {1: step(1500 * scale, 0.7), 64: step(2000 * scale, 30.0)},
        "ours": {1: step(1200 * scale, 0.8), 16: step(3500 * scale, 4.0), 64: step(4000 * scale, 16.0)},
        "ours_big": step(900 * scale, 70.0, 32),
        "echo_h2": {1: step(2700 * scale, 0.35), 64: step(9000 * scale, 7.0)},
        "ours_h2": {1: step(1700 * scale, 0.52), 64: step(7500 * scale, 9.0)},
    }


def test_ratios_cover_both_clients_with_their_targets() -> None:
    rows = {r["ratio"]: r for r in ratios({"lenet": merge_repeats([lenet_run()])}, 64)}
    echo = rows["lenet c=64 1-img: ours / bare echo"]
    assert echo["value"] == 4000 / 5000 and echo["pass"]  # exactly at the 0.8 target passes
    h2 = rows["lenet c=64 1-img: ours / bare echo (h2load client)"]
    assert h2["value"] == 7500 / 9000 and h2["pass"]
    lat = rows["lenet c=1: ours p50 - in-process batch-1 p50 (ms)"]
    assert abs(lat["value"] - 0.75) < 1e-9 and not lat["pass"]
    lat_h2 = rows["lenet c=1: ours p50 - in-process batch-1 p50 (ms) (h2load client)"]
    assert abs(lat_h2["value"] - 0.47) < 1e-9 and lat_h2["pass"]
    assert "| lenet c=1: ours p50 - in-process batch-1 p50 (ms) | 0.75 | <= 0.5 | MISSED |" in ratio_table(
        list(rows.values())
    )


def test_repeats_report_the_median_run_of_each_setup() -> None:
    merged = merge_repeats([lenet_run(1.0), lenet_run(0.5), lenet_run(2.0)])
    assert merged["repeats"] == 3
    assert merged["ours"][64]["requests_per_s"] == 4000 and merged["ours_h2"][1]["requests_per_s"] == 1700
    md = table({"lenet": merged}, 64, (1, 16, 64), 32)
    assert "| lenet | ours c=64 (h2load client) | 7500.0 |" in md

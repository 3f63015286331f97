"""Server-side numbers from two /metrics scrapes, against the server's own metric definitions."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from loadtest.metrics_scrape import parse, step_summary
from server.metrics import ServerMetrics


def _text(m: ServerMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_step_summary_diffs_the_servers_histograms_for_one_model() -> None:
    m = ServerMetrics()
    lenet = m.version_loaded("lenet", "1", "CPUExecutionProvider", "lenet5", "fmnist", lambda: 0)
    other = m.version_loaded("other", "1", "CPUExecutionProvider", "resnet18", "cifar10", lambda: 0)
    # Before the step: history that must not leak into the step's means.
    lenet.observe_batch(64, 0.5, [1.0] * 64)
    lenet.observe_request("Classify", "OK", 1.0)
    before = parse(_text(m), {"model": "lenet"})
    # The step: two batches (8 and 4 images, 12 requests), plus another model's traffic.
    lenet.observe_batch(8, 0.004, [0.001] * 8)
    lenet.observe_batch(4, 0.002, [0.003] * 4)
    for _ in range(12):
        lenet.observe_request("Classify", "OK", 0.01)
    lenet.observe_request("Classify", "RESOURCE_EXHAUSTED", 0.0)
    other.observe_batch(32, 9.0, [5.0] * 32)
    after = parse(_text(m), {"model": "lenet"})
    s = step_summary(before, after)
    assert s["batch_size"] == pytest.approx(6.0)
    assert s["batches"] == 2
    assert s["compute_ms"] == pytest.approx(3.0)
    assert s["queue_wait_ms"] == pytest.approx((8 * 1.0 + 4 * 3.0) / 12)
    assert s["requests_ok"] == 12


def test_no_traffic_gives_no_means() -> None:
    m = ServerMetrics()
    m.version_loaded("lenet", "1", "CPUExecutionProvider", "lenet5", "fmnist", lambda: 0)
    snap = parse(_text(m), {"model": "lenet"})
    assert step_summary(snap, snap) == {"requests_ok": 0.0}

"""bench/protocol_bench.py's report: the ratios it prints are the right quotients of its rows."""

from __future__ import annotations

import pytest

from bench import protocol_bench


def _row(client: str, wire: str, c: int, rps: float) -> dict:
    return {
        "client": client,
        "wire": wire,
        "concurrency": c,
        "rounds": 3,
        "requests_per_s": rps,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
    }


def test_ratios_compare_wires_at_the_highest_concurrency() -> None:
    rows = [
        _row("cnn-loadtest", "grpc", 1, 10.0),
        _row("cnn-loadtest", "http binary", 1, 99.0),
        _row("cnn-loadtest", "grpc", 64, 100.0),
        _row("cnn-loadtest", "http binary", 64, 80.0),
        _row("cnn-loadtest", "http json", 64, 50.0),
        _row("cnn-loadtest", "grpc + TLS", 64, 90.0),
        _row("cnn-loadtest", "http binary + TLS", 64, 60.0),
        _row("h2load", "grpc", 64, 200.0),
        _row("h2load", "http binary", 64, 300.0),
    ]
    r = protocol_bench.ratios(rows, 64)
    assert r["cnn-loadtest: http binary / grpc at c=64"] == pytest.approx(0.8)
    assert r["cnn-loadtest: http json / grpc at c=64"] == pytest.approx(0.5)
    assert r["cnn-loadtest: grpc + TLS / grpc at c=64"] == pytest.approx(0.9)
    assert r["cnn-loadtest: http binary + TLS / http binary at c=64"] == pytest.approx(0.75)
    assert r["h2load: http binary / grpc at c=64"] == pytest.approx(1.5)
    assert "h2load: http json / grpc at c=64" not in r  # a wire not measured has no ratio
    md = protocol_bench.markdown({"model": "lenet", "cpu": "x", "date": "d", "rows": rows, "ratios": r})
    assert "| cnn-loadtest | http binary | 64 | 80 | 1.00 | 2.00 |" in md and "| 0.80x |" in md

"""bench/cache_bench.py: the ratios it prints are the right quotients of its rows, a run that took
another path than its name says stops it, and the repository copy it serves enables the cache."""

from __future__ import annotations

import pytest

from bench import cache_bench
from cnnstack.contract import scan_repository
from tests.server.helpers import publish, tiny_model


def _row(model: str, mode: str, c: int, rps: float, p50: float, p99: float) -> dict:
    return {
        "model": model,
        "mode": mode,
        "concurrency": c,
        "rounds": 3,
        "requests_per_s": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "server_mean_ms": 0.1,
        "hit_ratio": 1.0 if mode == "hit" else 0.0,
    }


def test_ratios_compare_hit_with_miss_and_miss_with_off() -> None:
    rows = [
        _row("lenet", "off", 1, 1000.0, 0.5, 2.0),
        _row("lenet", "miss", 1, 800.0, 0.6, 3.0),
        _row("lenet", "hit", 1, 2000.0, 0.3, 1.0),
        _row("fmnist", "hit", 16, 500.0, 1.0, 2.0),  # no miss row: no ratio
    ]
    r = cache_bench.ratios(rows)
    assert r["lenet c=1: hit / miss req/s"] == pytest.approx(2.5)
    assert r["lenet c=1: miss / hit p50"] == pytest.approx(2.0)
    assert r["lenet c=1: miss / hit p99"] == pytest.approx(3.0)
    assert r["lenet c=1: miss / hit server mean"] == pytest.approx(1.0)
    assert r["lenet c=1: miss / off req/s"] == pytest.approx(0.8)
    assert not any(k.startswith("fmnist") for k in r)
    hashes = [{"hash": "xxh3_128", "images": 1, "bytes": 3136, "us": 0.5}]
    md = cache_bench.markdown({"cpu": "x", "date": "d", "rows": rows, "ratios": r, "hashes": hashes})
    assert "| lenet | hit | 1 | 2,000 | 0.300 | 1.000 | 0.100 | 1.000 |" in md
    assert "| lenet c=1: hit / miss req/s | 2.50x |" in md and "| xxh3_128 | 1 | 3,136 | 0.50 |" in md


@pytest.mark.parametrize(
    "mode, hits, misses, ok",
    [
        ("off", 0, 0, True),
        ("off", 0, 5, False),
        ("miss", 0, 900, True),
        ("miss", 2, 900, True),  # the preflight's request (repeating the last run's), then its first worker's
        ("miss", 3, 900, False),
        ("hit", 900, 64, True),
        ("hit", 900, 65, False),
        ("hit", 0, 0, False),
    ],
)
def test_a_run_on_another_path_stops_the_benchmark(mode: str, hits: int, misses: int, ok: bool) -> None:
    if ok:
        cache_bench.check_path(mode, hits, misses)
    else:
        with pytest.raises(RuntimeError, match=f"the {mode} run took another path"):
            cache_bench.check_path(mode, hits, misses)


def test_the_served_copy_enables_the_cache_and_leaves_the_source_alone(tmp_path) -> None:
    src = tmp_path / "src"
    data, tm = tiny_model()
    publish(src, "lenet", 1, data, tm.meta)
    repo = cache_bench.cached_repository(src, ("lenet",), tmp_path / "copy")
    copy, original = scan_repository(repo)["lenet"], scan_repository(src)["lenet"]
    assert copy.config_error is None and copy.config.response_cache.enable
    assert not original.config.response_cache.enable and list(copy.versions) == [1]

"""bench/workers_bench.py without servers: its arguments and its table (median round, ratio)."""

from __future__ import annotations

import pytest

from bench.workers_bench import parse_args, table


def rnd(rps: float, split: list[float]) -> dict:
    return {
        "requests_per_s": rps,
        "latency_ms": {"p50_ms": 1.0, "p99_ms": 2.0},
        "split": split,
        "server_cores": 1.0,
        "cpu_us_per_request": 300.0,
    }


def test_the_table_reports_the_median_round_of_each_worker_count_against_the_first() -> None:
    cfg = parse_args(["--workers", "1,2", "--rounds", "3"])
    results = {
        1: [rnd(900, [1.0]), rnd(1000, [1.0]), rnd(1100, [1.0])],
        2: [rnd(1500, [1.0, 0.0]), rnd(1800, [0.5, 0.5]), rnd(1700, [0.75, 0.25])],
    }
    rows = table(cfg, results).splitlines()
    assert rows[2].startswith("| 1 | 1000 | 1.00x |")
    assert rows[3].startswith("| 2 | 1700 | 1.70x |") and "1800 (0.50/0.50)" in rows[3]


@pytest.mark.parametrize(
    "argv", [["--workers", "0"], ["--rounds", "0"], ["--concurrency", "10", "--connections", "4"]]
)
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2

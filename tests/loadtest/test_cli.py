"""The CLI end to end against the fake server: reports written, multi-process, errors, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import grpc
import pytest

from loadtest.__main__ import main
from loadtest.config import parse_args
from tests.loadtest.fakes import FAKE_MODEL, FakeServer

FAST = ["--warmup", "0.1", "--window", "0.3", "--duration", "0.9", "--quiet"]


def test_cli_writes_json_csv_and_plot(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.behaviour.delay_s = 0.002
    out, table, plot = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    argv = [
        "--target",
        fake_server.target,
        "--model",
        FAKE_MODEL,
        "--concurrency",
        "1,4",
        "--request-rate",
        "100",
        "--images-per-request",
        "2",
        "--out",
        str(out),
        "--csv",
        str(table),
        "--plot",
        str(plot),
        *FAST,
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["input_shape"] == [1, 8, 8] and doc["images_per_request"] == 2
    assert doc["percentile_method"] == "nearest-rank"
    steps = doc["steps"]
    assert [(s["mode"], s["load"]) for s in steps] == [("closed", 1.0), ("closed", 4.0), ("open", 100.0)]
    for s in steps:
        assert s["images_per_s"] == pytest.approx(2 * s["requests_per_s"])
        lat = s["latency_ms"]
        assert 2.0 <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert s["sent"] == s["ok"] and s["errors_total"] == {}
    # The server answered every request the client counted (the pre-flight request is one more).
    assert fake_server.behaviour.answered["OK"] == 1 + sum(s["ok"] for s in steps)
    assert steps[2]["send_lag_ms"]["p50_ms"] < 5.0  # sent on schedule (see test_runner for stalls)
    rows = list(csv.DictReader(table.open()))
    assert [r["mode"] for r in rows] == ["closed", "closed", "open"]
    assert float(rows[1]["requests_per_s"]) == pytest.approx(steps[1]["requests_per_s"], rel=1e-3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_cli_prints_a_table(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", fake_server.target, "--model", FAKE_MODEL, "--concurrency", "2", *FAST[:-1]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "req/s" in out and "p99" in out
    assert any(line.strip().startswith("c=2") for line in out.splitlines())


def test_two_client_processes_share_the_load(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.behaviour.delay_s = 0.01
    out = tmp_path / "r.json"
    argv = [
        "--target",
        fake_server.target,
        "--model",
        FAKE_MODEL,
        "--concurrency",
        "4",
        "--processes",
        "2",
        "--max-requests",
        "60",
        "--duration",
        "10",
        "--window",
        "0.5",
        "--warmup",
        "0",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    (step,) = json.loads(out.read_text())["steps"]
    assert step["processes"] == 2
    assert step["sent"] == step["ok"] == 120  # --max-requests bounds each process
    assert fake_server.behaviour.answered["OK"] == 1 + 120


@pytest.mark.parametrize("processes", [1, 2])
def test_connections_spread_requests_round_robin_over_that_many_connections(
    fake_server: FakeServer, tmp_path: Path, processes: int
) -> None:
    out = tmp_path / "r.json"
    argv = [
        "--target",
        fake_server.target,
        "--model",
        FAKE_MODEL,
        "--concurrency",
        "8",
        "--connections",
        "3",
        "--processes",
        str(processes),
        "--max-requests",
        "90",
        "--duration",
        "10",
        "--window",
        "0.5",
        "--warmup",
        "0",
        "--quiet",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads(out.read_text())["connections"] == 3
    peers = fake_server.behaviour.peers
    # The pre-flight request has a channel of its own; each client process has 3 more, used in turn.
    loaded = sorted(n for n in peers.values() if n > 1)
    assert len(peers) == 1 + 3 * processes and len(loaded) == 3 * processes
    assert loaded == [30] * (3 * processes)


def test_cli_reports_target_problems_with_status_1(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", fake_server.target, "--model", "missing", *FAST]) == 1
    assert "no model 'missing'" in capsys.readouterr().err
    # A server that rejects the request: the pre-flight request fails before any load is sent.
    fake_server.behaviour.fail_every = 1
    assert main(["--target", fake_server.target, "--model", FAKE_MODEL, *FAST]) == 1
    assert "pre-flight" in capsys.readouterr().err
    assert fake_server.behaviour.received == 1


def test_unreadable_input_file_is_an_error_naming_it_not_a_traceback(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "images.idx"
    bogus.write_bytes(b"\x00\x00\x08\x01" + bytes(8))  # an IDX *labels* header
    assert main(["--target", fake_server.target, "--model", FAKE_MODEL, "--input", str(bogus), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"--input {bogus}" in err and "not an IDX3 ubyte images file" in err
    assert fake_server.behaviour.received == 0  # nothing was sent


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "m"],  # no target
        ["--target", "localhost", "--model", "m"],  # no port
        ["--target", "h:1", "--model", "m", "--concurrency", "0"],
        ["--target", "h:1", "--model", "m", "--concurrency", "a,b"],
        ["--target", "h:1", "--model", "m", "--request-rate", "-5"],
        ["--target", "h:1", "--model", "m", "--api", "rest"],
        ["--target", "h:1", "--model", "m", "--api", "kserve", "--encoding", "png"],
        ["--target", "h:1", "--model", "m", "--window", "5", "--duration", "2"],
        ["--target", "h:1", "--model", "m", "--concurrency", "1,4", "--processes", "2"],
        ["--target", "h:1", "--model", "m", "--input", "/nonexistent/images.gz"],
        ["--target", "h:1", "--model", "m", "--metrics-url", "localhost:8002/metrics"],
        ["--target", "h:1", "--model", "m", "--connections", "0"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults_sweep_concurrencies_1_4_16_64() -> None:
    cfg = parse_args(["--target", "h:1", "--model", "m"])
    assert cfg.concurrency == (1, 4, 16, 64) and cfg.request_rates == ()
    cfg = parse_args(["--target", "h:1", "--model", "m", "--request-rate", "10,20.5"])
    assert cfg.concurrency == () and cfg.request_rates == (10.0, 20.5)


@pytest.mark.parametrize(
    "flags",
    [[], ["--shape", "1,28,28"], ["--api", "kserve", "--protocol", "http"]],
    ids=["asks-the-server", "shape-given", "http"],
)
def test_unreachable_target_fails_fast_with_status_1(flags, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--target", f"127.0.0.1:{port}", "--model", "m", "--timeout", "2", *flags, *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"127.0.0.1:{port}" in err[0]
    assert any(word in err[0] for word in ("UNAVAILABLE", "not reachable", "ClientConnectorError"))


def test_dataset_input_is_sent_as_png_of_the_models_size(fake_server: FakeServer, tmp_path: Path) -> None:
    import gzip
    import io
    import struct

    import numpy as np
    from PIL import Image

    # A 5-image IDX file of 12x12 images; the fake model takes (1, 8, 8): the client resizes.
    raw = np.arange(5 * 12 * 12, dtype=np.uint8).reshape(5, 12, 12)
    idx = tmp_path / "t10k-images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 5, 12, 12) + raw.tobytes()))
    argv = [
        "--target",
        fake_server.target,
        "--model",
        FAKE_MODEL,
        "--concurrency",
        "1",
        "--input",
        str(idx),
        "--encoding",
        "png",
        "--images-per-request",
        "3",
        "--max-requests",
        "4",
        *FAST,
    ]
    assert main(argv) == 0
    req = fake_server.behaviour.last_request
    assert req is not None and len(req.images) == 3
    img = Image.open(io.BytesIO(req.images[0].encoded))
    assert img.format == "PNG" and img.size == (8, 8) and img.mode == "L"


def test_plot_without_matplotlib_is_refused_before_the_sweep(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    with pytest.raises(SystemExit) as e:
        parse_args(["--target", "h:1", "--model", "m", "--plot", "p.png"])
    assert e.value.code == 2
    assert "cnnstack[plot]" in capsys.readouterr().err


def test_errors_outside_the_reported_windows_are_in_the_table_json_and_stderr(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Requests 2..12 fail (request 1 is the pre-flight one): the first of the step, deep in its 1 s
    # warm-up at c=4, long before the measured windows, which see no error at all.
    b = fake_server.behaviour
    b.delay_s, b.fail_from, b.fail_until, b.fail_code = 0.002, 2, 13, grpc.StatusCode.UNAVAILABLE
    out = tmp_path / "r.json"
    argv = ["--target", fake_server.target, "--model", FAKE_MODEL, "--concurrency", "4", "--warmup", "1"]
    assert main([*argv, "--window", "0.3", "--duration", "0.9", "--out", str(out)]) == 0
    (step,) = json.loads(out.read_text())["steps"]
    assert step["errors_total"] == {"UNAVAILABLE": 11} and step["errors"] == {}
    assert step["warnings"] == [
        f"c=4: 11 of {step['sent']} requests failed (UNAVAILABLE=11); latency and throughput count answered requests only"
    ]
    captured = capsys.readouterr()
    (row,) = [line for line in captured.out.splitlines() if line.strip().startswith("c=4")]
    assert row.endswith("UNAVAILABLE=11") and "errors (whole step)" in captured.out
    assert f"warning: {step['warnings'][0]}" in captured.err


def test_open_loop_reports_service_time_beside_the_schedule_based_latency(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server.behaviour.delay_s = 0.003
    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["--target", fake_server.target, "--model", FAKE_MODEL, "--request-rate", "100", *FAST[:-1]]
    assert main([*argv, "--out", str(out), "--csv", str(table)]) == 0
    (step,) = json.loads(out.read_text())["steps"]
    lat, svc = step["latency_ms"], step["service_ms"]
    assert step["distribution"] == "poisson"
    # The same requests, timed from the actual send: never longer than from the schedule.
    for key in ("p50_ms", "p99_ms", "max_ms"):
        assert 3.0 <= svc[key] <= lat[key]
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.strip().startswith("r=100/s"))
    assert lines[i + 1].strip().startswith("from send")
    (row,) = csv.DictReader(table.open())
    assert float(row["service_p50_ms"]) == pytest.approx(svc["p50_ms"], abs=1e-3)


@pytest.mark.parametrize("distribution", ["constant", "replay"])
def test_constant_and_replayed_schedules_offer_their_rate(
    fake_server: FakeServer, tmp_path: Path, distribution: str
) -> None:
    out, gaps = tmp_path / "r.json", tmp_path / "gaps.txt"
    gaps.write_text("# ms between sends, cycled\n5\n15\n")  # 100/s on average
    flags = ["--request-intervals", str(gaps)] if distribution == "replay" else ["--request-rate", "100"]
    flags += ["--distribution", "constant"] if distribution == "constant" else []
    argv = ["--target", fake_server.target, "--model", FAKE_MODEL, *flags, "--processes", "2"]
    argv += ["--warmup", "0.2", "--window", "0.5", "--duration", "2", "--stability-windows", "100"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (step,) = doc["steps"]
    assert doc["distribution"] == step["distribution"] == distribution
    assert step["mode"] == "open" and step["load"] == pytest.approx(100.0)
    # Both processes together send the one schedule: 100/s, 50 sends in every 0.5 s window.
    assert step["sent"] == step["ok"] and step["requests_per_s"] == pytest.approx(100.0, rel=0.2)


def test_send_lag_warning_names_a_client_behind_its_schedule() -> None:
    from loadtest import report
    from loadtest.stats import latency_summary
    from tests.loadtest.test_search import step

    lag = {"p50_ms": 0.2, "p99_ms": 6.0, "max_ms": 9.0}
    # Timer jitter in the tail is not falling behind: the typical request left on time.
    on_time = step(100.0, 20.0, mode="open", send_lag_ms=lag, service_ms=latency_summary([0.0198] * 10))
    assert report.warnings(on_time) == []
    late = step(100.0, 20.0, mode="open", send_lag_ms=lag, service_ms=latency_summary([0.014] * 10))
    (warning,) = report.warnings(late)
    assert warning.startswith(
        "r=100/s: the client fell behind its schedule: its requests typically left 6.0 ms late"
    )
    assert "--processes" in warning

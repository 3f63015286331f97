"""``--log-format json`` and ``--access-log`` (server/logs.py, server/api/observe.py): one JSON
object per stderr line with the request's model, version and trace ids where known, one access
line per request in either format, the stdout event lines unchanged, and the flags reaching every
worker of ``--workers``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import grpc
import pytest

from bench.otlp_sink import OtlpSink
from cnnstack.serverproc import ServerProcess
from server.logs import REQUEST, JsonFormatter, event
from tests.server.test_tracing import TRACE_ID, grpc_infer, http_infer, traceparent

ROOT = Path(__file__).resolve().parents[2]
BASE = ("--device", "cpu", "--metrics-port", "-1", "--poll-interval-s", "0")


class FakeRequest:
    def log_fields(self) -> dict[str, object]:
        return {"model": "lenet", "version": 3, "trace_id": TRACE_ID, "span_id": "00f067aa0ba902b7"}


def record(message: str, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("server.x", logging.WARNING, __file__, 1, message, (), exc_info)
    rec.__dict__.update(extra)
    return rec


class Writes:
    """A stdout that records each ``write`` call, as an unbuffered stream passes them to the OS."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_an_event_line_is_one_write_so_workers_sharing_stdout_never_glue_lines(monkeypatch) -> None:
    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    event("listening", grpc_port=1, http_port=2)
    event("stopped", drained=3)
    assert len(out.calls) == 2 and all(c.endswith("\n") and c.count("\n") == 1 for c in out.calls)
    assert [json.loads(c)["event"] for c in out.calls] == ["listening", "stopped"]


def test_json_lines_carry_the_request_being_handled() -> None:
    fmt = JsonFormatter({"worker": 1})
    outside = json.loads(fmt.format(record("hello %s")))
    assert set(outside) == {"time", "level", "logger", "message", "worker"}
    assert outside["level"] == "WARNING" and outside["logger"] == "server.x" and outside["worker"] == 1
    assert outside["time"].endswith("Z") and "T" in outside["time"]
    token = REQUEST.set(FakeRequest())
    try:
        inside = json.loads(fmt.format(record("a line", fields={"status": "OK", "duration_ms": 1.5})))
    finally:
        REQUEST.reset(token)
    assert inside["model"] == "lenet" and inside["version"] == 3
    assert inside["trace_id"] == TRACE_ID and inside["span_id"] == "00f067aa0ba902b7"
    assert inside["status"] == "OK" and inside["duration_ms"] == 1.5
    try:
        raise ValueError("boom")
    except ValueError:
        failed = json.loads(fmt.format(record("failed", exc_info=sys.exc_info())))
    assert "ValueError: boom" in failed["exception"] and "\n" not in json.dumps(failed)


def access_lines(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == "server.access"]


def json_lines(server: ServerProcess) -> list[dict]:
    lines = [line for line in server.stderr if line.strip()]
    docs = [json.loads(line) for line in lines]  # every stderr line is one JSON object
    for doc in docs:
        assert {"time", "level", "logger", "message"} <= set(doc), doc
    return docs


@pytest.mark.integration
def test_json_logs_and_access_log_with_trace_ids(repo) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        trace = ("--trace-config", "level=TIMESTAMPS", "--trace-config", f"opentelemetry,url={sink.url}")
        server = ServerProcess(
            *BASE, "--log-format", "json", "--access-log", "true", *trace, repository=root, cwd=ROOT
        )
        server.start()
        try:
            assert grpc_infer(server.target, (("traceparent", traceparent()),)) == grpc.StatusCode.OK
            assert http_infer(server.http_url) == 200
            assert http_infer(server.http_url, model="missing") == 404
        finally:
            assert server.stop() == 0
        lines = json_lines(server)
    assert server.listening["models"][0]["name"] == "tiny"  # stdout: the event lines as before
    assert server.stopped["admitted_ok"] == 2
    grpc_line, http_line, missing = access_lines(lines)
    assert grpc_line["protocol"] == "grpc" and grpc_line["rpc"] == "ModelInfer"
    assert (grpc_line["model"], grpc_line["version"], grpc_line["status"]) == ("tiny", 1, "OK")
    assert grpc_line["trace_id"] == TRACE_ID and len(grpc_line["span_id"]) == 16
    assert grpc_line["peer"].startswith("ipv4:127.0.0.1:") and grpc_line["duration_ms"] > 0
    # The default rate (every 1000th) does not trace the HTTP request: no ids then.
    assert http_line["protocol"] == "http" and http_line["peer"] == "127.0.0.1"
    assert http_line["trace_id"] is None and "span_id" not in http_line
    assert missing["status"] == "NOT_FOUND" and missing["model"] is None
    assert [s.trace_id for s in sink.spans() if s.name == "ModelInfer"] == [TRACE_ID]


@pytest.mark.integration
def test_access_log_in_text_whatever_the_log_level(repo) -> None:
    root, _ = repo
    server = ServerProcess(*BASE, "--access-log", "true", "--log-level", "WARNING", repository=root, cwd=ROOT)
    server.start()
    try:
        assert grpc_infer(server.target) == grpc.StatusCode.OK
    finally:
        assert server.stop() == 0
    (line,) = [line for line in server.stderr if " server.access: " in line]
    assert " INFO server.access: grpc ModelInfer tiny/1 OK " in line and "trace_id=-" in line
    assert not [line for line in server.stderr if line.startswith("{")]


@pytest.mark.integration
def test_without_the_flags_there_is_no_access_line(repo) -> None:
    root, _ = repo
    server = ServerProcess(*BASE, repository=root, cwd=ROOT)
    server.start()
    try:
        assert grpc_infer(server.target) == grpc.StatusCode.OK
    finally:
        assert server.stop() == 0
    assert not [line for line in server.stderr if "server.access" in line]
    assert any(" INFO server.app: stopped in " in line for line in server.stderr)  # text, as before


@pytest.mark.integration
def test_the_flags_reach_every_worker(repo) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        flags = ("--log-format", "json", "--access-log", "true", "--trace-config", "level=TIMESTAMPS")
        trace = ("--trace-config", "rate=1", "--trace-config", f"opentelemetry,url={sink.url}")
        server = ServerProcess(*BASE, "--workers", "2", *flags, *trace, repository=root, cwd=ROOT)
        server.start()
        try:
            for _ in range(4):
                assert grpc_infer(server.target) == grpc.StatusCode.OK
        finally:
            assert server.stop() == 0
        spans = sink.spans()
        lines = json_lines(server)
    workers = set(server.listening["workers"])
    started = [line for line in lines if "tracing: OpenTelemetry to" in line["message"]]
    assert sorted(line["worker"] for line in started) == [0, 1]  # each worker has its tracer
    served = access_lines(lines)
    assert len(served) == 4 and {line["worker"] for line in served} <= {0, 1}
    assert len(workers) == 2
    assert len([s for s in spans if s.name == "ModelInfer"]) == 4
    assert {line["trace_id"] for line in served} == {s.trace_id for s in spans}

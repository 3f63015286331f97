"""bench/trace_bench.py's report and bench/otlp_sink.py's receiver: the ratios are the right
quotients of the median rounds; the sink decodes what an OTLP/HTTP exporter posts and prints it
as a tree."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench import trace_bench
from bench.otlp_sink import OtlpSink, render_tree


def test_rows_are_median_rounds_and_ratios_compare_with_off() -> None:
    def run(rps: float, cpu: float) -> dict[str, float]:
        return {"requests_per_s": rps, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_us_per_request": cpu}

    rows = [
        trace_bench.summary("off", [run(1000, 200), run(900, 250), run(1100, 190)], 0, 5000),
        trace_bench.summary("on, 100%", [run(500, 400), run(400, 500), run(450, 420)], 20000, 5000),
        trace_bench.summary("on, 1%", [run(990, 205), run(980, 210), run(1000, 200)], 200, 5000),
    ]
    assert rows[0]["requests_per_s"] == 1000 and rows[0]["cpu_us_per_request"] == 200
    assert rows[1]["spans_per_request"] == 4.0 and rows[2]["spans_per_request"] == pytest.approx(0.04)
    r = trace_bench.ratios(rows)
    assert r["req/s, on, 100% / off"] == pytest.approx(0.45)
    assert r["server CPU per request, on, 100% / off"] == pytest.approx(2.1)
    assert r["req/s, on, 1% / off"] == pytest.approx(0.99)
    doc = {
        "model": "lenet",
        "concurrency": 16,
        "client": "h2load",
        "cpu": "x",
        "date": "d",
        "load_before": 1.0,
    }
    md = trace_bench.markdown({**doc, "rows": rows, "ratios": r})
    assert "| on, 100% | 450 | 1.00 | 2.00 | 420 | 4.000 |" in md and "| 0.45x |" in md


@pytest.mark.parametrize("decode", [True, False])
def test_the_sink_decodes_an_export_and_prints_its_tree(decode: bool) -> None:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "cnn-serve"
    spans = rs.scope_spans.add().spans
    trace_id = bytes(range(16))
    for name, sid, parent, start, end in [
        ("ModelInfer", b"\x01" * 8, b"\x09" * 8, 1_000_000, 3_000_000),
        ("compute", b"\x03" * 8, b"\x01" * 8, 1_500_000, 2_000_000),
        ("queue", b"\x02" * 8, b"\x01" * 8, 1_200_000, 1_500_000),
    ]:
        s = spans.add(name=name, trace_id=trace_id, span_id=sid, parent_span_id=parent)
        s.start_time_unix_nano, s.end_time_unix_nano = start, end
        s.attributes.add(key="batch.images").value.int_value = 1
    with OtlpSink(decode=decode) as sink:
        post = urllib.request.Request(sink.url, request.SerializeToString(), method="POST")
        post.add_header("Content-Type", "application/x-protobuf")
        with urllib.request.urlopen(post, timeout=10) as reply:
            assert reply.status == 200
        got = sink.wait_for(3, timeout_s=10) if decode else sink.spans()
    assert sink.posts == 1 and len(got) == 3
    assert {s.resource["service.name"] for s in got} == {"cnn-serve"}
    lines = render_tree(got).splitlines()
    assert lines[0] == f"trace {trace_id.hex()} (caller's span {'09' * 8})"
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["ModelInfer", "queue", "compute"]  # children by start time, indented under it
    assert lines[1].startswith("  ModelInfer") and lines[2].startswith("    queue")
    assert "2.000 ms" in lines[1] and "+0.200" in lines[2]

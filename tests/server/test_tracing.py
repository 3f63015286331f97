"""Tracing (server/tracing.py, server/otel.py) against a real OTLP/HTTP receiver (bench.otlp_sink,
which decodes what it gets with opentelemetry-proto): Triton's ``--trace-config`` settings, the
caller's W3C trace context over gRPC and HTTP, the spans' names, parents, times and attributes,
sampling, the flush at shutdown, and a server with tracing off that never loads opentelemetry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.otlp_sink import FlatSpan, OtlpSink
from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server.config import ServerConfig
from server.tracing import DEFAULT_URL, TraceSettings, parse_trace_config
from tests.server.helpers import server_config
from tests.server.http_helpers import request

ROOT = Path(__file__).resolve().parents[2]
X = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
TRACE_ID, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CHILDREN = ("queue", "compute", "postprocess")


def traceparent(trace_id: str = TRACE_ID, span_id: str = CALLER_SPAN, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def traced(sink: OtlpSink, *items: str) -> tuple[str, ...]:
    """--trace-config on, to ``sink``; the processor's delay is long, so spans reach the sink
    only through the flush at shutdown (what these tests check they do)."""
    return (
        "mode=opentelemetry",
        "level=TIMESTAMPS",
        f"opentelemetry,url={sink.url}",
        "opentelemetry,bsp_schedule_delay=600000",
        *items,
    )


def infer_request(model: str = "tiny") -> ks.ModelInferRequest:
    tensor = ks.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(X.shape))
    return ks.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[X.tobytes()])


def grpc_infer(target: str, metadata: tuple = (), model: str = "tiny") -> grpc.StatusCode:
    with grpc.insecure_channel(target) as ch:
        try:
            ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                infer_request(model), metadata=metadata, timeout=30
            )
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def http_infer(url: str, headers: dict[str, str] | None = None, model: str = "tiny") -> int:
    doc = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]
    }
    body = json.dumps(doc).encode()
    return request(
        f"{url}/v2/models/{model}/infer", body, {"Content-Type": "application/json", **(headers or {})}
    ).status


def by_trace(spans: list[FlatSpan]) -> dict[str, list[FlatSpan]]:
    out: dict[str, list[FlatSpan]] = {}
    for s in spans:
        out.setdefault(s.trace_id, []).append(s)
    return out


def check_request_trace(spans: list[FlatSpan], protocol: str, trace_id: str, caller: str) -> None:
    """One request's spans: its SERVER span under the caller's, its three children under it,
    each within its time, in order."""
    (root,) = [s for s in spans if s.parent_id == caller]
    assert root.name == "ModelInfer" and root.trace_id == trace_id
    assert root.kind == 2  # SPAN_KIND_SERVER
    assert root.attributes == {
        "rpc.method": "ModelInfer",
        "protocol": protocol,
        "model.name": "tiny",
        "model.version": "1",
        "status": "OK",
    }
    assert root.resource["service.name"] == "cnn-serve"  # no OTEL_* in the test environment
    children = {s.name: s for s in spans if s.parent_id == root.span_id}
    assert sorted(children) == sorted(CHILDREN) and len(spans) == 4
    for child in children.values():
        assert child.trace_id == trace_id
        assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns, child
    queue, compute, post = (children[n] for n in CHILDREN)
    assert queue.end_ns == compute.start_ns  # the wait ends when its batch starts
    assert compute.end_ns <= post.start_ns
    assert compute.attributes["batch.images"] >= 1 and compute.attributes["batch.requests"] >= 1
    assert compute.attributes["instance"] == 0
    assert compute.attributes["device"] == "cpu"
    assert compute.attributes["provider"] == "CPUExecutionProvider"


def test_trace_config_reads_tritons_settings() -> None:
    settings, problems = parse_trace_config(
        [
            "mode=opentelemetry",
            "level=TIMESTAMPS",
            "rate=100",
            "count=5",
            "opentelemetry,url=http://collector:4318/v1/traces",
            "opentelemetry,resource=service.name=fmnist",
            "opentelemetry,resource=deployment.environment=prod",
            "opentelemetry,bsp_schedule_delay=200",
            "opentelemetry,bsp_max_queue_size=4096",
        ]
    )
    assert problems == []
    assert settings.enabled and settings.rate == 100 and settings.count == 5
    assert settings.url == "http://collector:4318/v1/traces" and settings.bsp_schedule_delay == 200
    assert dict(settings.resource) == {"service.name": "fmnist", "deployment.environment": "prod"}
    assert settings.bsp_max_queue_size == 4096
    # Off unless level says TIMESTAMPS, as in Triton; Triton's defaults otherwise.
    default, problems = parse_trace_config(["mode=opentelemetry", f"opentelemetry,url={DEFAULT_URL}"])
    assert problems == [] and not default.enabled and default.rate == 1000 and default.count == -1


@pytest.mark.parametrize(
    "item, says",
    [
        ("mode=triton", "only mode=opentelemetry"),
        ("triton,file=/tmp/trace.json", "only mode=opentelemetry"),
        ("level=TENSORS", "TENSORS"),
        ("level=LOUD", "level must be one of"),
        ("rate=-1", "rate must be an integer >= 0"),
        ("rate=often", "rate must be an integer"),
        ("count=-2", "count must be an integer >= -1"),
        ("opentelemetry,url=collector:4318", "url must be an http"),
        ("opentelemetry,resource=service.name", "resource takes KEY=VALUE"),
        ("opentelemetry,bsp_schedule_delay=0", "bsp_schedule_delay must be an integer >= 1"),
        ("opentelemetry,exporter=grpc", "unknown opentelemetry setting"),
        ("jaeger,url=http://x", "unknown mode"),
        ("sample", "expected KEY=VALUE"),
        ("verbosity=2", "unknown setting"),
    ],
)
def test_trace_config_problems_name_the_item(item: str, says: str) -> None:
    _, problems = parse_trace_config([item])
    assert len(problems) == 1 and item in problems[0] and says in problems[0], problems


def test_trace_config_flag_repeats_and_the_command_line_replaces_the_environment(tmp_path: Path) -> None:
    env = {"CNN_SERVE_TRACE_CONFIG": "level=TIMESTAMPS rate=10"}
    argv = ["--repository", str(tmp_path)]
    from_env = ServerConfig.from_args(argv, env)
    assert from_env.trace_config == ("level=TIMESTAMPS", "rate=10") and from_env.trace_settings.rate == 10
    cli = ServerConfig.from_args(
        [*argv, "--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1"], env
    )
    assert cli.trace_config == ("level=TIMESTAMPS", "rate=1")
    assert ServerConfig.from_args(argv, {}).trace_settings == TraceSettings()
    with pytest.raises(SystemExit):  # a bad item is a usage error, as every flag's
        ServerConfig.from_args([*argv, "--trace-config", "mode=triton"], {})


@pytest.mark.integration
def test_grpc_and_http_requests_continue_the_callers_trace(repo, start_server) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        server = start_server(server_config(root, trace_config=traced(sink, "rate=1")))
        http_trace, http_caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        assert grpc_infer(server.target, (("traceparent", traceparent()),)) == grpc.StatusCode.OK
        assert http_infer(server.http_url, {"traceparent": traceparent(http_trace, http_caller)}) == 200
        assert sink.posts == 0  # nothing exported before shutdown (the processor's delay is 10 min)
        server.stop()  # the graceful stop flushes
        traces = by_trace(sink.wait_for(8, timeout_s=10))
    assert set(traces) == {TRACE_ID, http_trace}
    check_request_trace(traces[TRACE_ID], "grpc", TRACE_ID, CALLER_SPAN)
    check_request_trace(traces[http_trace], "http", http_trace, http_caller)


@pytest.mark.integration
def test_sampling_follows_the_caller_then_the_rate_and_count(repo, start_server) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        # rate=2: the server starts a trace for every 2nd request of its own; count=2 of them at most.
        server = start_server(server_config(root, trace_config=traced(sink, "rate=2", "count=2")))
        unsampled = "11111111111111111111111111111111"
        assert (
            grpc_infer(server.target, (("traceparent", traceparent(unsampled, sampled=False)),)).name == "OK"
        )
        assert http_infer(server.http_url, {"traceparent": "00-zz-not-a-traceparent"}) == 200  # request 1
        for _ in range(5):  # requests 2..6: the 2nd and 4th are traced, then count is spent
            assert grpc_infer(server.target) == grpc.StatusCode.OK
        # A caller's sampled trace is followed whatever the rate and count.
        assert grpc_infer(server.target, (("traceparent", traceparent()),)) == grpc.StatusCode.OK
        server.stop()
        traces = by_trace(sink.wait_for(12, timeout_s=10))
    assert unsampled not in traces
    assert len(traces) == 3 and TRACE_ID in traces
    roots = [s for s in sink.spans() if s.name == "ModelInfer"]
    assert sorted(s.parent_id for s in roots) == ["", "", CALLER_SPAN]


@pytest.mark.integration
def test_a_failed_request_is_one_span_with_its_status(repo, start_server) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        server = start_server(server_config(root, trace_config=traced(sink, "rate=1")))
        assert grpc_infer(server.target, model="missing") == grpc.StatusCode.NOT_FOUND
        assert http_infer(server.http_url, model="missing") == 404
        server.stop()
        spans = sink.wait_for(2, timeout_s=10)
    assert len(spans) == 2
    for span in spans:
        assert span.name == "ModelInfer" and span.parent_id == ""
        assert span.attributes["status"] == "NOT_FOUND" and "model.name" not in span.attributes
        assert span.status_code == 2  # STATUS_CODE_ERROR
    assert {s.attributes["protocol"] for s in spans} == {"grpc", "http"}


@pytest.mark.integration
def test_every_message_of_a_stream_is_its_own_request_span_under_the_streams_caller(
    repo, start_server
) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        server = start_server(server_config(root, trace_config=traced(sink, "rate=0")))
        image = pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=X.tobytes()))
        messages = [pb.ClassifyRequest(model="tiny", images=[image], request_id=str(i)) for i in range(3)]
        with grpc.insecure_channel(server.target) as ch:
            replies = list(
                pb_grpc.ClassifierStub(ch).ClassifyStream(
                    iter(messages), metadata=(("traceparent", traceparent()),), timeout=30
                )
            )
        assert [r.error_code for r in replies] == [0, 0, 0]
        server.stop()
        spans = sink.wait_for(12, timeout_s=10)
    roots = [s for s in spans if s.parent_id == CALLER_SPAN]
    assert [s.name for s in roots] == ["ClassifyStream"] * 3
    assert all(s.trace_id == TRACE_ID for s in spans)
    for r in roots:
        assert sorted(s.name for s in spans if s.parent_id == r.span_id) == sorted(CHILDREN)


# What a server with tracing off loads and sends: run in a fresh interpreter, so that nothing the
# test process imported (bench.otlp_sink imports opentelemetry.proto) hides an import.
OFF_SCRIPT = """
import asyncio, json, sys, urllib.request
from pathlib import Path
import grpc, numpy as np
from server.app import create_server
from server.config import ServerConfig
from protos.inference import grpc_service_pb2 as ks, grpc_service_pb2_grpc as ks_grpc

async def main():
    repo, url, traceparent = sys.argv[1:4]
    cfg = ServerConfig(repository=Path(repo), port=0, http_port=0, metrics_port=-1, poll_interval_s=0,
                       trace_config=("mode=opentelemetry", f"opentelemetry,url={url}", "rate=1"))
    handle, port = await create_server(cfg)
    x = np.zeros((1, 1, 28, 28), np.float32)
    tensor = ks.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    req = ks.ModelInferRequest(model_name="tiny", inputs=[tensor], raw_input_contents=[x.tobytes()])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=(("traceparent", traceparent),))
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                   "data": x.ravel().tolist()}]}).encode()
    http = urllib.request.Request(f"http://127.0.0.1:{handle.http_port}/v2/models/tiny/infer", body,
                                  {"traceparent": traceparent, "Content-Type": "application/json"})
    status = (await asyncio.to_thread(urllib.request.urlopen, http, timeout=30)).status
    summary = await handle.stop(2.0)
    otel = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry" or m == "server.otel")
    print(json.dumps({"status": status, "summary": summary, "otel": otel}))

asyncio.run(main())
"""


@pytest.mark.integration
def test_tracing_off_loads_no_opentelemetry_and_sends_nothing(repo, tmp_path: Path) -> None:
    root, _ = repo
    with OtlpSink() as sink:
        # Every setting but level=TIMESTAMPS: tracing stays off, as Triton's level OFF.
        done = subprocess.run(
            [sys.executable, "-c", OFF_SCRIPT, str(root), sink.url, traceparent()],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.splitlines()[-1])
        assert out["status"] == 200 and out["summary"]["admitted_ok"] == 2
        assert out["otel"] == []
        assert sink.posts == 0


def test_service_name_comes_from_the_settings_then_the_environment_then_cnn_serve(monkeypatch) -> None:
    from server.otel import resource

    def service(*items: str) -> object:
        return resource(parse_trace_config(items)[0]).attributes["service.name"]

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert service() == "cnn-serve"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=fleet,team=vision")
    assert service() == "fleet"
    assert service("opentelemetry,resource=service.name=fmnist") == "fmnist"


class BrokenTrace:
    """A trace whose every recording fails (an SDK bug, say): requests must not notice."""

    trace_id, span_id = "1" * 32, "1" * 16

    def enqueued(self) -> None:
        pass

    def batch(self, *args: object) -> None:
        raise RuntimeError("span processor gone")

    def outputs_ready(self) -> None:
        pass

    def finish(self, *args: object) -> None:
        raise RuntimeError("span processor gone")


class BrokenTracer:
    def start(self, *args: object) -> None:
        raise RuntimeError("propagator gone")

    def shutdown(self, timeout_s: float) -> bool:
        return True


def test_a_failing_trace_never_fails_its_request() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from server.api.dataplane import Call
    from server.api.observe import Observer
    from server.runtime.batcher import Batcher
    from server.runtime.queue import QueuePolicy, RequestQueue

    async def batch_with_a_broken_trace() -> list[np.ndarray]:
        queue = RequestQueue(QueuePolicy.simple(8))
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(queue, lambda x: [x * 2], pool, max_batch_size=4, max_delay_s=0)
            task = asyncio.create_task(batcher.run())
            outputs = await queue.submit(np.ones((1, 1, 2, 2), np.float32), trace=BrokenTrace())
            queue.put_stop()
            await task
        return outputs

    (out,) = asyncio.run(batch_with_a_broken_trace())
    assert out.shape == (1, 1, 2, 2) and float(out.max()) == 2.0
    observer = Observer(BrokenTracer(), log_context=False, access_log=False)
    call = Call()
    observer.begin(call, "ModelInfer", "grpc", None)
    assert call.span is None
    call.span = BrokenTrace()
    observer.end(call, "ModelInfer", "grpc", "OK", 0.001, None, None)  # logs, does not raise

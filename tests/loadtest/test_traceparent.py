"""``cnn-loadtest --traceparent F``: that fraction of requests carries a new sampled W3C
traceparent, over gRPC and HTTP. Against a real cnn-serve that traces only callers' sampled
contexts (``rate=0``) and exports to a local OTLP receiver: with F = 1, every request the server
answered is one trace of its own under the client's span; with F = 0, none is."""

from __future__ import annotations

import pytest

from bench.otlp_sink import OtlpSink
from loadtest.__main__ import main
from loadtest.metrics_scrape import REQUESTS, fetch, parse
from loadtest.transport import Transport
from tests.server.helpers import RunningServer, publish, server_config, tiny_model

pytestmark = pytest.mark.integration

SHAPE = (1, 8, 8)
STEPS = ["--concurrency", "4", "--max-requests", "60", "--duration", "2", "--window", "0.5"]
STEPS += ["--warmup", "0.1", "--stability-windows", "100", "--quiet"]


def test_traceparent_is_a_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Transport(traceparent=1.5)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("fraction", ["1", "0"])
def test_requests_carry_a_sampled_traceparent(tmp_path, protocol: str, fraction: str) -> None:
    data, tm = tiny_model(input_shape=SHAPE, class_names=("a", "b", "c"), arch="tiny", dataset="synthetic")
    publish(tmp_path / "repo", "tiny", 1, data, tm.meta)
    with OtlpSink() as sink:
        trace = ("level=TIMESTAMPS", "rate=0", f"opentelemetry,url={sink.url}")
        server = RunningServer(server_config(tmp_path / "repo", trace_config=trace))
        try:
            port = server.port if protocol == "grpc" else server.handle.http_port
            flags = ["--api", "kserve", "--protocol", protocol, "--traceparent", fraction, *STEPS]
            assert main(["--target", f"127.0.0.1:{port}", "--model", "tiny", *flags]) == 0
            text = fetch(f"http://127.0.0.1:{server.handle.metrics_port}/metrics")
            labels = {"model": "tiny", "protocol": protocol, "rpc": "ModelInfer"}
            served = int(parse(text, labels).get(f"{REQUESTS}:OK", 0.0))
        finally:
            server.stop(1.0)
        roots = [s for s in sink.spans() if s.name == "ModelInfer"]
    assert served > 0
    if fraction == "0":
        assert roots == [] and sink.posts == 0
        return
    assert len(roots) == served
    assert len({s.trace_id for s in roots}) == served  # a trace per request
    assert all(s.parent_id and s.attributes["protocol"] == protocol for s in roots)

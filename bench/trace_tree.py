"""Print what cnn-serve's tracing records for one gRPC and one HTTP request, as trees.

Starts ``cnn-serve`` (a subprocess, as a user runs it) with ``--trace-config level=TIMESTAMPS
--trace-config rate=0`` exporting to a local OTLP/HTTP receiver (bench.otlp_sink), sends a few
untraced warm-up requests, then one KServe v2 ModelInfer over gRPC and one over HTTP (the binary
tensor extension), each with its own sampled W3C ``traceparent`` as a caller's tracer would send
it; stops the server (the graceful stop flushes its spans) and prints each trace: span names,
durations, start offsets from the request span, and attributes.

    .venv/bin/python -m bench.trace_tree --repository artifacts/repository --model lenet
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.otlp_sink import OtlpSink, render_tree
from cnnstack.serverproc import ServerProcess
from loadtest.client import describe_model
from loadtest.payload import KSERVE_METHOD, infer_path, kserve_http_request, kserve_request, load_images

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5
PROTOCOLS = ("grpc", "http")


@dataclass(frozen=True)
class TraceTree:
    repository: Path
    model: str


def new_traceparent() -> tuple[str, str]:
    """(traceparent header, its trace id): a caller's sampled span."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id


def send(server: ServerProcess, model: str, protocol: str, traceparent: str | None) -> None:
    """One KServe v2 ModelInfer over ``protocol``, with ``traceparent`` when given."""
    shape = describe_model(server.target, "kserve", model, 0).shape
    assert shape is not None, f"{model}: the server's metadata gives no input shape"
    images = load_images("synthetic", shape, 1, seed=0)  # (1, C, H, W)
    if protocol == "grpc":
        metadata = (("traceparent", traceparent),) if traceparent else ()
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(KSERVE_METHOD, request_serializer=None, response_deserializer=None)
            call(kserve_request(images, model, 0), metadata=metadata, timeout=30)
        return
    payload = kserve_http_request(images, model, 0)
    headers = {**payload.headers, **({"traceparent": traceparent} if traceparent else {})}
    url = f"{server.http_url}{infer_path(model, 0)}"
    with urllib.request.urlopen(urllib.request.Request(url, payload.body, headers), timeout=30) as r:
        assert r.status == 200, r.status


def run(cfg: TraceTree) -> str:
    with OtlpSink() as sink:
        trace = ("level=TIMESTAMPS", "rate=0", f"opentelemetry,url={sink.url}")
        args = ["--device", "cpu", "--metrics-port", "-1", "--poll-interval-s", "0", "--log-level", "WARNING"]
        for item in trace:
            args += ["--trace-config", item]
        server = ServerProcess(*args, repository=cfg.repository, cwd=ROOT)
        server.start()
        traces = {}
        try:
            for protocol in PROTOCOLS:
                for _ in range(WARMUP):
                    send(server, cfg.model, protocol, None)  # rate=0: not traced
                traceparent, traces[protocol] = new_traceparent()
                send(server, cfg.model, protocol, traceparent)
        finally:
            server.stop()
        spans = sink.wait_for(4 * len(PROTOCOLS), timeout_s=30)
    out = []
    for protocol, trace_id in traces.items():
        out += [f"{cfg.model}, ModelInfer over {protocol}:", render_tree(spans, trace_id), ""]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> TraceTree:
    p = argparse.ArgumentParser(prog="python -m bench.trace_tree", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "repository")
    p.add_argument("--model", default="lenet")
    a = p.parse_args(argv)
    if not (a.repository / a.model).is_dir():
        p.error(f"no model {a.model!r} in {a.repository}: run cnn-pipeline (or cnn-export) first")
    return TraceTree(a.repository, a.model)


def main(argv: list[str] | None = None) -> int:
    print(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

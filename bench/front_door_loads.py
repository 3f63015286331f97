"""The four loads of the front-door comparison, the real test images their requests carry, and how
one server is driven at one load over both wires (h2load). bench/front_door_bench.py drives
cnn-serve and the echo servers with them, bench/torchserve_peer.py TorchServe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import h2load_client
from bench.procs import tree_cpu
from loadtest.payload import load_images

# (model, images per request, requests in flight)
LOADS = [("lenet", 1, 1), ("lenet", 1, 64), ("lenet", 32, 64), ("fmnist", 1, 64)]
MODELS = sorted({model for model, _, _ in LOADS})
SHAPES = {"lenet": (1, 28, 28), "fmnist": (1, 28, 28)}
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def test_images(model: str, images: int) -> np.ndarray:
    """The first ``images`` real test images (synthetic without the dataset), (images, C, H, W)."""
    source = str(FASHION_TEST) if FASHION_TEST.is_file() else "synthetic"
    return load_images(source, SHAPES[model], images, seed=0)


@dataclass(frozen=True)
class Wires:
    """How one server is called at one load: a gRPC unary method with its serialized message, and
    an HTTP/1.1 POST (``blank_reason_is_ok``: see ``h2load_client.run_h2load_http1``)."""

    grpc_target: str
    grpc_method: str
    grpc_message: bytes
    http_url: str
    http_body: bytes
    http_headers: dict[str, str] = field(default_factory=dict)
    blank_reason_is_ok: bool = False


def drive(
    pid: int, wires: Wires, load: tuple[str, int, int], connections: int, duration_s: float, warmup_s: float
) -> dict[str, dict[str, float]]:
    """Both wires at one load, server ``pid`` alone on the machine: {protocol: {"rate" (images/s),
    "cpu_us" (the server tree's CPU per request), "p99_ms", "failed"}}; gRPC over ``connections``."""
    _, images, inflight = load
    out = {}
    for protocol in ("grpc", "http"):
        c0 = tree_cpu(pid)
        if protocol == "grpc":
            r = h2load_client.run_h2load(
                wires.grpc_target,
                wires.grpc_method,
                wires.grpc_message,
                concurrency=inflight,
                connections=min(connections, inflight),
                duration_s=duration_s,
                warmup_s=warmup_s,
            )
        else:
            r = h2load_client.run_h2load_http1(
                wires.http_url,
                wires.http_body,
                wires.http_headers,
                concurrency=inflight,
                duration_s=duration_s,
                warmup_s=warmup_s,
                blank_reason_is_ok=wires.blank_reason_is_ok,
            )
        spent = tree_cpu(pid) - c0
        answered = r.requests_per_s * (duration_s + warmup_s)
        out[protocol] = {
            "rate": r.requests_per_s * images,
            "cpu_us": spent / max(answered, 1) * 1e6,
            "p99_ms": r.latency_ms["p99_ms"],
            "failed": r.failed,
        }
    return out

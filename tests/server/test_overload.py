"""More concurrent load than the queue holds, over gRPC and over HTTP: the excess is rejected at
once (RESOURCE_EXHAUSTED / 503, "overloaded"), every admitted call succeeds, the server serves
normally afterwards, and both protocols count the rejections in the same metric."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.helpers import publish, server_config, tiny_model
from tests.server.http_helpers import binary_infer_body, infer_path, request

pytestmark = pytest.mark.integration

CONCURRENT = 64
QUEUE = 4
X = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)

# One outcome per request: (ok, error message when not ok, seconds from the burst's start).
Outcome = tuple[bool, str, float]


def grpc_burst(server, n: int) -> tuple[list[Outcome], bool]:
    """``n`` Classify calls at once; (outcomes, whether one more call succeeds afterwards)."""
    request = pb.ClassifyRequest(
        model="slow", images=[pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=X.tobytes()))]
    )
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.Classify(request, timeout=10)  # connection up, model warm
        sent = time.perf_counter()
        done_at: dict[int, float] = {}
        futures = []
        for i in range(n):
            f = stub.Classify.future(request, timeout=30)
            f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.perf_counter()))
            futures.append(f)
        outcomes: list[Outcome] = []
        for i, f in enumerate(futures):
            try:
                assert f.result(timeout=60).results[0].predictions[0].class_name  # a real answer
                ok, error = True, ""
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                ok, error = False, e.details()
            outcomes.append((ok, error, done_at.get(i, time.perf_counter()) - sent))
        after = stub.Classify(request, timeout=10)
    return outcomes, bool(after.results[0].predictions[0].class_name)


def http_burst(server, n: int) -> tuple[list[Outcome], bool]:
    """``n`` KServe v2 infers at once over HTTP (binary tensors)."""
    url = server.http_url + infer_path("slow")
    body, headers = binary_infer_body(X, binary_outputs=True)
    assert request(url, body, headers).status == 200  # model warm

    async def burst() -> list[Outcome]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            start = time.perf_counter()

            async def one() -> Outcome:
                async with session.post(
                    url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=60)
                ) as r:
                    payload = await r.read()
                    assert r.status in (200, 503), (r.status, payload[:200])
                    error = json.loads(payload)["error"] if r.status != 200 else ""
                    return r.status == 200, error, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(n)))

    outcomes = asyncio.run(burst())
    return outcomes, request(url, body, headers).status == 200


BURSTS = {"grpc": (grpc_burst, "Classify"), "http": (http_burst, "ModelInfer")}


@pytest.mark.parametrize("protocol", sorted(BURSTS))
def test_overload_rejects_the_excess_at_once_and_admitted_calls_succeed(
    tmp_path, start_server, protocol
) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=300, width=1024)  # slow enough per image for the queue to fill
    publish(root, "slow", 1, data, tm.meta)
    server = start_server(server_config(root, max_batch_size=1, max_queue_size=QUEUE))
    burst, rpc = BURSTS[protocol]
    outcomes, serving_after = burst(server, CONCURRENT)
    ok = [t for good, _, t in outcomes if good]
    rejected = [(t, error) for good, error, t in outcomes if not good]
    # The whole queue is admitted; one more only if the batcher took a request off it before the
    # burst filled it, a race the burst may win (then exactly QUEUE are admitted).
    assert len(ok) >= QUEUE and len(rejected) >= CONCURRENT // 2
    assert all("overloaded" in error for _, error in rejected)
    # Rejected calls are answered at once, not after waiting their turn.
    assert np.median([t for t, _ in rejected]) < np.median(ok)
    assert server.handle.state.admitted_failed == 0
    assert serving_after
    labels = {"rpc": rpc, "protocol": protocol, "model": "slow", "version": "1", "code": "RESOURCE_EXHAUSTED"}
    assert server.handle.metrics.registry.get_sample_value("cnn_requests_total", labels) == len(rejected)

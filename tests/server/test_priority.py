"""Priorities and queue timeouts on a live server, as Triton's KServe v2 parameters: ``priority``
and ``timeout`` over gRPC and HTTP, judged by the model's config.pbtxt queue policy; an HTTP request
gets a queue deadline that way; a bad parameter is a 400 / INVALID_ARGUMENT naming it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from tests.server.bad_inputs import kserve
from tests.server.helpers import config_pbtxt, publish, server_config, tiny_model
from tests.server.http_helpers import binary_infer_body, infer_path, request

pytestmark = pytest.mark.integration

POLICY = """
dynamic_batching {
  max_queue_delay_microseconds: 1000
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 60000000 allow_timeout_override: true }
  priority_queue_policy { key: 1 value: { max_queue_size: 4 } }
}
"""


@pytest.fixture
def prioritized(tmp_path, start_server):
    root = tmp_path / "repo"
    data, tm = tiny_model(hidden=300, width=1024)  # slow enough for a queue to form
    base = config_pbtxt("slow", tm.meta.input_shape, tm.meta.num_classes, max_batch_size=1)
    config = base.split("dynamic_batching")[0] + POLICY if "dynamic_batching" in base else base + POLICY
    publish(root, "slow", 1, data, tm.meta, config=config)
    return start_server(server_config(root, max_batch_size=1, max_queue_size=64))


def with_params(req: ks.ModelInferRequest, **params: int) -> ks.ModelInferRequest:
    for key, value in params.items():
        req.parameters[key].int64_param = value
    return req


def test_the_parameters_are_accepted_and_judged_over_grpc(prioritized) -> None:
    with grpc.insecure_channel(prioritized.target) as ch:
        stub = ks_grpc.GRPCInferenceServiceStub(ch)
        assert (
            len(
                stub.ModelInfer(with_params(kserve(model_name="slow"), priority=1, timeout=5_000_000)).outputs
            )
            == 2
        )
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(with_params(kserve(model_name="slow"), priority=3), timeout=10)
        assert (
            bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "priority must be between 1" in bad.value.details()
        )
        req = kserve(model_name="slow")
        req.parameters["priority"].string_param = "high"
        with pytest.raises(grpc.RpcError, match="parameter 'priority' must be an integer"):
            stub.ModelInfer(req, timeout=10)
        config = stub.ModelConfig(ks.ModelConfigRequest(name="slow")).config
    assert (
        config.dynamic_batching.priority_levels == 2
        and config.dynamic_batching.priority_queue_policy[1].max_queue_size == 4
    )


def http_infer_body(params: dict) -> tuple[bytes, dict[str, str]]:
    body, headers = binary_infer_body(np.zeros((1, 1, 28, 28), np.float32))
    length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:length])
    head["parameters"] = params
    new_head = json.dumps(head).encode()
    return new_head + body[length:], {**headers, "Inference-Header-Content-Length": str(len(new_head))}


def test_the_parameters_are_accepted_and_judged_over_http(prioritized) -> None:
    url = prioritized.http_url + infer_path("slow")
    assert request(url, *http_infer_body({"priority": 1, "timeout": 5_000_000})).status == 200
    bad = request(url, *http_infer_body({"priority": "1"}))
    assert bad.status == 400 and "parameter 'priority' must be an integer" in bad.json()["error"]
    assert request(url, *http_infer_body({"priority": 7})).status == 400


def test_an_http_request_gets_a_queue_deadline_from_its_timeout(prioritized) -> None:
    """A burst of HTTP requests with a 1 ms queue timeout on a slow model: those that waited longer
    are answered 504 with the reason at once, the others 200; nothing else, and the server serves
    on."""
    url = prioritized.http_url + infer_path("slow")
    body, headers = http_infer_body({"timeout": 1000})

    async def burst() -> list[tuple[int, str]]:
        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, str]:
                async with session.post(url, data=body, headers=headers) as r:
                    payload = await r.read()
                    return r.status, (json.loads(payload)["error"] if r.status != 200 else "")

            return await asyncio.gather(*(one() for _ in range(24)))

    results = asyncio.run(burst())
    statuses = {status for status, _ in results}
    assert statuses <= {200, 504} and 504 in statuses, results
    assert all("in the queue" in error for status, error in results if status == 504)
    assert request(url, *http_infer_body({})).status == 200

"""bench/floor_server.py: the floor the front-door bench measures cnn-serve against must be a real
server: concurrent requests batched together still get the model's outputs for their own images,
over gRPC and HTTP (tritonclient, the KServe v2 client)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from bench.front_door_bench import Child
from tests.server.helpers import TinyModel, tiny_model


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[tuple[str, str, TinyModel]]:
    """The floor server as the front-door bench starts it; a long batching window, so that
    requests in flight together are batched together."""
    data, tm = tiny_model()
    model = tmp_path / "model.onnx"
    model.write_bytes(data)
    child = Child("bench.floor_server", "--model", str(model), "--name", "tiny", "--max-delay-us", "20000")
    try:
        yield child.target, child.http, tm
    finally:
        child.close()


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)  # (N, C, H, W)


def http_infer(target: str, inputs: list) -> object:
    """tritonclient.http's own request encoding and response parsing, over urllib: its client is
    gevent-based and sends one request at a time from threads."""
    import urllib.request

    import tritonclient.http as th

    body, header_length = th.InferenceServerClient.generate_request_body(inputs)
    request = urllib.request.Request(f"http://{target}/v2/models/tiny/infer", data=body, method="POST")
    if header_length is not None:
        request.add_header("Inference-Header-Content-Length", str(header_length))
    with urllib.request.urlopen(request, timeout=30) as response:
        length = response.headers.get("Inference-Header-Content-Length")
        return th.InferenceServerClient.parse_response_body(
            response.read(), header_length=int(length) if length else None
        )


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_batched_requests_get_their_own_outputs(floor, protocol: str) -> None:
    """16 clients at once, requests of 1 to 3 images: batches form and are split back right."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    grpc_target, http_target, tm = floor
    lib = tg if protocol == "grpc" else th
    client = tg.InferenceServerClient(grpc_target)

    def infer(seed: int) -> tuple[np.ndarray, np.ndarray]:
        x = images(1 + seed % 3, seed)  # 1 to 3 images, so batches mix request sizes
        inp = lib.InferInput("input", list(x.shape), "FP32")
        if protocol == "grpc":
            inp.set_data_from_numpy(x)
            return x, client.infer("tiny", [inp]).as_numpy("logits")
        inp.set_data_from_numpy(x, binary_data=True)
        return x, http_infer(http_target, [inp]).as_numpy("logits")

    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(infer, range(96)))
    finally:
        client.close()
    for x, logits in answers:
        assert logits.shape == (x.shape[0], 10)
        np.testing.assert_allclose(logits, tm.logits(x), rtol=1e-4, atol=1e-4)

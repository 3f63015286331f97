"""Bad input gets an actionable gRPC status, on both APIs, and the server keeps serving."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from tests.server.bad_inputs import CLASSIFY_CASES, KSERVE_CASES, MAX_BATCH, MAX_MESSAGE, classify, kserve
from tests.server.helpers import RunningServer, publish, server_config, tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    s = RunningServer(server_config(root, max_batch_size=MAX_BATCH, max_message_bytes=MAX_MESSAGE))
    yield s
    s.stop(1.0)


def assert_rejected(rpc, request, code: grpc.StatusCode, message: str) -> None:
    """``rpc(request)`` fails with ``code`` and a message holding ``message``."""
    with pytest.raises(grpc.RpcError) as info:
        rpc(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert message in (info.value.details() or "")


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify_rejects(server, case: str) -> None:
    request, code, message = CLASSIFY_CASES[case]
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        assert_rejected(stub.Classify, request, code, message)
        # ... and the server is still up and right.
        ok = stub.Classify(classify(), timeout=10)
        assert len(ok.results) == 1


@pytest.mark.parametrize("case", list(KSERVE_CASES))
def test_model_infer_rejects(server, case: str) -> None:
    request, code, message = KSERVE_CASES[case]
    with grpc.insecure_channel(server.target) as ch:
        stub = ks_grpc.GRPCInferenceServiceStub(ch)
        assert_rejected(stub.ModelInfer, request, code, message)
        assert len(stub.ModelInfer(kserve(), timeout=10).raw_output_contents) == 2


def test_rejections_are_counted_by_code(server) -> None:
    registry = server.handle.metrics.registry

    def count(model: str, version: str, code: str) -> float:
        labels = {"rpc": "Classify", "protocol": "grpc", "model": model, "version": version, "code": code}
        return registry.get_sample_value("cnn_requests_total", labels) or 0.0

    before = (count("", "", "NOT_FOUND"), count("tiny", "1", "INVALID_ARGUMENT"), count("tiny", "1", "OK"))
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for request in (classify(model="nope"), classify(top_k=99), classify(top_k=99), classify()):
            with contextlib.suppress(grpc.RpcError):
                stub.Classify(request, timeout=10)
    after = (count("", "", "NOT_FOUND"), count("tiny", "1", "INVALID_ARGUMENT"), count("tiny", "1", "OK"))
    # Unknown models are counted under model="" (bounded labels); known ones under their version.
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]

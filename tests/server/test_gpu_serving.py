"""The server on a real GPU (gpu marker: skipped without CUDA, a failure under CNN_REQUIRE_GPU=1): a
conv net served with ``--device cuda`` answers as onnxruntime on the CPU does, every convolution of
every instance runs on CUDA, sessions cannot fall back, and every batch size was warmed up."""

from __future__ import annotations

import numpy as np
import pytest

from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from server.runtime.cuda import CUDA
from server.runtime.placement import conv_placement_problem
from server.runtime.sessions import node_placement
from tests.server.gpu_helpers import conv_model, reference, why_no_cuda_provider
from tests.server.helpers import publish, server_config

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_a_conv_net_serves_on_cuda_with_every_conv_there(tmp_path, start_server) -> None:
    import grpc

    reason = why_no_cuda_provider()  # in the test, not a fixture: CNN_REQUIRE_GPU=1 reports a failure
    if reason:
        pytest.skip(reason)

    model, meta = conv_model()
    root = tmp_path / "repo"
    publish(root, "conv", 1, model, meta)
    server = start_server(server_config(root, device="cuda", max_batch_size=8, instances=2))
    assert server.handle.provider == CUDA
    served = server.handle.manager.resolve("conv")
    assert served.provider == CUDA and len(served.instances) == 2
    for inst in served.instances:
        assert inst.device_id == 0 and inst.session.get_providers()[0] == CUDA
        assert inst.session._enable_fallback is False
        sample = np.zeros((1, 1, 28, 28), dtype=np.float32)
        placed = node_placement(inst.session, served.files.model_path, CUDA, 0, "HEURISTIC", sample)
        assert conv_placement_problem(placed) is None
        assert sum(p.op_type.lower().endswith("conv") for p in placed if p.provider == CUDA) >= 2
    groups = [(g.kind, g.count, list(g.gpus)) for g in served.config.instance_group]
    assert groups == [(mc.ModelInstanceGroup.KIND_GPU, 2, [0])]

    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    images = [pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], data=img.tobytes())) for img in x]
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="conv", images=images, top_k=10), timeout=60
        )
    expected = reference(model, x)  # (5, 10) on the CPU
    for result, probs in zip(reply.results, expected, strict=True):
        got = {p.class_index: p.probability for p in result.predictions}
        # TF32 convolutions on Ampere and later: agreement to about 1e-3.
        np.testing.assert_allclose([got[k] for k in range(10)], probs, atol=2e-3)

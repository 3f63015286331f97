"""cnnstack.classifier.v1 against a real server on 127.0.0.1:0: tensors, PNG/JPEG, top-k,
versions, ListModels, ClassifyStream."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnstack.contract import parse_config, render_config
from protos.cnnstack.classifier.v1 import classifier_pb2 as pb
from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.server.helpers import config_pbtxt, publish, server_config, tiny_model

pytestmark = pytest.mark.integration


def tensor_image(x: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(shape=list(x.shape), data=x.astype("<f4").tobytes()))


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def probs_of(result: pb.Classification) -> dict[int, float]:
    return {p.class_index: p.probability for p in result.predictions}


def test_tensor_images_get_the_models_top_k_with_names(tiny_server) -> None:
    server, tm = tiny_server
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="tiny", top_k=3, images=[tensor_image(im) for im in x], request_id="r-1")
        )
    expected = tm.probabilities(x)
    assert reply.model == "tiny" and reply.version == 1 and reply.request_id == "r-1"
    assert len(reply.results) == 3
    for row, result in zip(expected, reply.results, strict=True):
        top = np.argsort(-row)[:3]
        assert [p.class_index for p in result.predictions] == top.tolist()
        assert [p.class_name for p in result.predictions] == [tm.meta.class_names[i] for i in top]
        assert [p.probability for p in result.predictions] == pytest.approx(row[top].tolist(), abs=1e-5)


def test_top_k_zero_means_one(tiny_server) -> None:
    server, tm = tiny_server
    x = np.random.default_rng(2).random((1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="tiny", images=[tensor_image(x)])
        )
    assert len(reply.results[0].predictions) == 1
    assert reply.results[0].predictions[0].class_index == int(tm.probabilities(x[None]).argmax())


def test_png_at_model_size_equals_the_tensor_of_its_pixels(tiny_server) -> None:
    server, tm = tiny_server
    pixels = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    as_tensor = (pixels / 255).astype(np.float32)[None]  # (1, 28, 28)
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(
                model="tiny", top_k=10, images=[pb.Image(encoded=png_bytes(pixels)), tensor_image(as_tensor)]
            )
        )
    from_png, from_tensor = (probs_of(r) for r in reply.results)
    assert from_png == pytest.approx(from_tensor, abs=1e-6)
    expected = tm.probabilities(as_tensor[None])[0]
    assert [from_png[i] for i in range(10)] == pytest.approx(expected.tolist(), abs=1e-5)


def test_rgb_jpeg_of_another_size_is_converted_to_luma_and_resized(tiny_server) -> None:
    server, tm = tiny_server
    rgb = np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # H=40, W=60
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=95)
    # The documented pipeline: decode, convert("L"), bilinear resize to 28x28, / 255.
    ref = Image.open(io.BytesIO(buf.getvalue())).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    x = (np.asarray(ref, dtype=np.float32) / 255)[None, None]
    with grpc.insecure_channel(server.target) as ch:
        reply = pb_grpc.ClassifierStub(ch).Classify(
            pb.ClassifyRequest(model="tiny", top_k=10, images=[pb.Image(encoded=buf.getvalue())])
        )
    got = probs_of(reply.results[0])
    assert [got[i] for i in range(10)] == pytest.approx(tm.probabilities(x)[0].tolist(), abs=2e-3)


def test_pinned_versions_and_list_models(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    v1, tm1 = tiny_model(seed=1)
    v2, tm2 = tiny_model(seed=2)
    config = parse_config(config_pbtxt("tiny", (1, 28, 28), 10))
    config.version_policy.all.SetInParent()  # serve every version, not only the latest
    cfg = render_config(config)
    publish(root, "tiny", 1, v1, tm1.meta, config=cfg)
    publish(root, "tiny", 2, v2, tm2.meta, config=cfg)
    server = start_server(server_config(root))
    x = np.random.default_rng(5).random((1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        latest = stub.Classify(pb.ClassifyRequest(model="tiny", top_k=10, images=[tensor_image(x)]))
        pinned = stub.Classify(
            pb.ClassifyRequest(model="tiny", version=1, top_k=10, images=[tensor_image(x)])
        )
        listing = stub.ListModels(pb.ListModelsRequest())
    assert latest.version == 2 and pinned.version == 1
    assert [probs_of(latest.results[0])[i] for i in range(10)] == pytest.approx(
        tm2.probabilities(x[None])[0], abs=1e-5
    )
    assert [probs_of(pinned.results[0])[i] for i in range(10)] == pytest.approx(
        tm1.probabilities(x[None])[0], abs=1e-5
    )
    (model,) = listing.models
    assert (model.name, model.version, list(model.versions)) == ("tiny", 2, [1, 2])
    assert list(model.input_shape) == [1, 28, 28] and len(model.class_names) == 10
    assert model.arch == "tinynet" and model.provider == "CPUExecutionProvider" and model.max_batch_size == 64


def test_classify_stream_answers_in_order_and_keeps_going_after_an_error(tiny_server) -> None:
    server, tm = tiny_server
    rng = np.random.default_rng(6)
    xs = rng.random((40, 1, 28, 28), dtype=np.float32)
    requests = [
        pb.ClassifyRequest(model="tiny", images=[tensor_image(x)], request_id=str(i))
        for i, x in enumerate(xs)
    ]
    requests.insert(10, pb.ClassifyRequest(model="nope", images=[tensor_image(xs[0])], request_id="bad"))
    with grpc.insecure_channel(server.target) as ch:
        replies = list(pb_grpc.ClassifierStub(ch).ClassifyStream(iter(requests), timeout=30))
    assert [r.request_id for r in replies] == [r.request_id for r in requests]
    bad = replies[10]
    assert bad.error_code == grpc.StatusCode.NOT_FOUND.value[0] and "nope" in bad.error_message
    good = [r for r in replies if r.request_id != "bad"]
    expected = tm.probabilities(xs).argmax(axis=1)
    assert [r.results[0].predictions[0].class_index for r in good] == expected.tolist()
    assert all(r.error_code == 0 and r.version == 1 for r in good)


def test_shutdown_ends_an_open_stream_after_answering_what_it_read(repo, start_server) -> None:
    import queue
    import threading
    import time

    root, tm = repo
    server = start_server(server_config(root, grace_s=20))
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get(timeout=30)) is not None:
            yield item

    x = np.random.default_rng(11).random((1, 28, 28), dtype=np.float32)
    with grpc.insecure_channel(server.target) as ch:
        replies = pb_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=60)
        for i in range(3):
            outbox.put(pb.ClassifyRequest(model="tiny", images=[tensor_image(x)], request_id=str(i)))
            assert next(replies).request_id == str(i)
        t0 = time.monotonic()
        stopper = threading.Thread(target=server.stop, args=(120,))
        stopper.start()
        with pytest.raises(grpc.RpcError) as info:
            next(replies)  # the idle stream is closed by the server, not left to the grace period
        outbox.put(None)
        stopper.join(130)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    # Closed by the server at once, not left to run out the 120 s grace period.
    assert (
        time.monotonic() - t0 < 60 and server.summary is not None and server.summary["admitted_failed"] == 0
    )

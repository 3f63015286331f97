"""--fp16 / --int8: extra models NAME-fp16 / NAME-int8 with fp32 I/O, scored against FP32, and
the accuracy gate that keeps a damaged variant out of the repository unless forced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cnnstack.contract import MODEL_FILE, REPORT_FILE, SUMMARY_JSON, list_model_names
from exporter import onnx_export, quantize
from tests.exporter.helpers import FAST, make_model, run_export, synthetic_meta, write_checkpoint

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch

# FP32's top-1 logit ahead of its second by this much: a clear answer (a trained LeNet's logits
# spread over ~10 units; FP16 and INT8 move them by a few hundredths to tenths).
CLEAR_MARGIN = 1.0


def real_test_images() -> np.ndarray:
    """The synthetic test set the fixture's LeNet was trained for, as cnn-export evaluates it."""
    from trainer.data import load_dataset

    _, _, test = load_dataset("synthetic", seed=0)
    return test.x.numpy().astype(np.float32) / 255.0


# The whole synthetic test set (512 images) so accuracies mean something; small INT8 calibration.
ACCURATE = [
    "--parity-samples",
    "0",
    "--parity-batch",
    "128",
    "--batch1-samples",
    "4",
    "--bench-seconds",
    "0.05",
]


def test_fp16_and_int8_are_published_with_deltas(trained_lenet: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code = run_export(
        trained_lenet,
        "-r",
        repo,
        "--name",
        "lenet",
        "--fp16",
        "--int8",
        "--calibration-samples",
        "128",
        "--no-progress",
        *ACCURATE,
    )
    assert code == 0
    assert list_model_names(repo) == ["lenet", "lenet-fp16", "lenet-int8"]
    fp32_report = json.loads((repo / "lenet" / "1" / REPORT_FILE).read_text())
    fp32_acc = fp32_report["precisions"]["fp32"]["accuracy"]
    assert fp32_acc > 0.5  # trained: the deltas below are about a model that works

    # Real test images, and agreement counted where FP32 is clear about its answer: an image near a
    # decision boundary may flip under any rounding (a CPU's kernels too), a clear one must not.
    x = real_test_images()  # (N, 1, 28, 28) float32 in [0, 1]
    ref = ort.InferenceSession(str(repo / "lenet" / "1" / MODEL_FILE), providers=["CPUExecutionProvider"])
    ref_logits = ref.run(["logits"], {"input": x})[0]  # (N, 10)
    top2 = np.sort(ref_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN
    assert clear.mean() > 0.5  # most of a trained model's answers are clear: the check below means something
    for precision in ("fp16", "int8"):
        vdir = repo / f"lenet-{precision}" / "1"
        report = json.loads((vdir / REPORT_FILE).read_text())
        assert report["precision"] == precision and report["passed"] is True
        gate = next(c for c in report["checks"] if c["name"] == "accuracy_gate")
        assert gate["passed"] and gate["numbers"]["drop_pp"] <= 1.0
        numbers = report["precisions"][precision]
        assert numbers["accuracy"] == pytest.approx(fp32_acc, abs=0.01)
        assert numbers["accuracy_delta_pp"] == pytest.approx(100 * (numbers["accuracy"] - fp32_acc), abs=1e-3)
        assert numbers["speed_ratio_vs_fp32"] > 0 and numbers["top1_agreement_vs_fp32"] > 0.95

        proto = onnx.load(vdir / MODEL_FILE)
        assert onnx_export.read_metadata(proto)["precision"] == precision
        sess = ort.InferenceSession(str(vdir / MODEL_FILE), providers=["CPUExecutionProvider"])
        assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]  # fp32 I/O: same config.pbtxt
        assert [o.type for o in sess.get_outputs()] == ["tensor(float)", "tensor(float)"]
        logits, probs = sess.run(None, {"input": x})
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
        agree = logits.argmax(1) == ref_logits.argmax(1)
        # FP16 rounds every value by ~1e-3 relative: a clear answer never moves. INT8 moves logits by
        # up to a few tenths, and how far depends on the CPU's int8 kernels (VNNI, AMX): a rare clear
        # answer may change there, so it must keep nearly all of them, not all.
        kept = agree[clear].mean()
        assert kept >= (1.0 if precision == "fp16" else 0.99), (
            f"{precision}: {int((~agree[clear]).sum())} of {int(clear.sum())} clear answers changed"
        )
        assert (repo / f"lenet-{precision}" / "config.pbtxt").read_text() == (
            (repo / "lenet" / "config.pbtxt").read_text().replace('"lenet"', f'"lenet-{precision}"')
        )

    fp16 = onnx.load(repo / "lenet-fp16" / "1" / MODEL_FILE)
    big = [t for t in fp16.graph.initializer if np.prod(t.dims) > 100]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    int8 = onnx.load(repo / "lenet-int8" / "1" / MODEL_FILE)
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Per-channel: conv weight scales have one entry per output channel (6 for LeNet's first conv).
    scale_sizes = {int(np.prod(t.dims)) for t in int8.graph.initializer if t.name.endswith("_scale")}
    assert 6 in scale_sizes and 16 in scale_sizes

    row = json.loads((repo / SUMMARY_JSON).read_text())["rows"][0]
    assert row["acc_fp16"] == pytest.approx(row["acc_fp32"], abs=0.01) and row["images_per_s_int8"] > 0


def _damaged_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """An INT8 conversion that zeroes every int8 weight: each layer outputs its bias alone, so the
    model answers one class for every image (chance), whatever the CPU's kernels."""
    real = quantize.to_int8

    def damaged(proto, calibration):
        out = real(proto, calibration)
        for init in out.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8:
                zeros = np.zeros_like(onnx.numpy_helper.to_array(init))
                init.CopyFrom(onnx.numpy_helper.from_array(zeros, init.name))
        return out

    monkeypatch.setattr(quantize, "to_int8", damaged)


def test_accuracy_gate_keeps_a_bad_int8_out_unless_forced(
    trained_lenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _damaged_int8(monkeypatch)
    repo = tmp_path / "repo"
    args = [
        trained_lenet,
        "-r",
        repo,
        "--name",
        "lenet",
        "--int8",
        "--calibration-samples",
        "64",
        "--no-progress",
    ]
    assert run_export(*args, *ACCURATE) == 1
    err = capsys.readouterr().err
    assert "lenet-int8 not published" in err and "drop" in err
    assert list_model_names(repo) == ["lenet"]  # FP32 passed its own gate and is published
    report = json.loads((repo / "lenet" / "1" / REPORT_FILE).read_text())
    assert report["precisions"]["fp32"]["accuracy"] > 0.5
    int8 = report["precisions"]["int8"]
    assert int8["published"] is False and int8["accuracy_delta_pp"] < -20.0

    assert run_export(*args, "--force-precision", *ACCURATE) == 0
    assert list_model_names(repo) == ["lenet", "lenet-int8"]
    forced = json.loads((repo / "lenet-int8" / "1" / REPORT_FILE).read_text())
    assert forced["precisions"]["int8"]["forced"] is True
    assert next(c for c in forced["checks"] if c["name"] == "accuracy_gate")["passed"] is False


def test_unknown_accuracy_blocks_variants_unless_forced(tmp_path: Path, capsys) -> None:
    meta = synthetic_meta("lenet5", dataset="fashion-mnist")  # its files are not under --data-dir
    ckpt = write_checkpoint(tmp_path / "c.pt", make_model("lenet5", meta), meta)
    repo = tmp_path / "repo"
    args = [ckpt, "-r", repo, "--fp16", "--data-dir", tmp_path / "nowhere", "--no-progress", *FAST]
    assert run_export(*args) == 1
    assert "accuracy unknown" in capsys.readouterr().err
    assert list_model_names(repo) == ["lenet5-fashion-mnist"]
    assert run_export(*args, "--force-precision") == 0
    assert list_model_names(repo) == ["lenet5-fashion-mnist", "lenet5-fashion-mnist-fp16"]
    props = onnx_export.read_metadata(onnx.load(repo / "lenet5-fashion-mnist-fp16" / "1" / MODEL_FILE))
    assert props["test_accuracy"] == "nan" and props["precision"] == "fp16"


def test_toposort_orders_appended_nodes() -> None:
    from onnx import helper

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Neg", ["x"], ["a"])]  # out of order
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    ordered = quantize.toposort(proto)
    assert [n.op_type for n in ordered.graph.node] == ["Neg", "Relu"]
    onnx.checker.check_model(ordered, full_check=True)

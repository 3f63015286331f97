"""The gate's arithmetic (tolerance, top-1 agreement, tolerated ties) and the ONNX validity check."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cnnstack.contract import INPUT_NAME, LOGITS_NAME, PROBABILITIES_NAME
from exporter.checks import check_onnx, compare

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch


def test_compare_reports_diffs_and_agreement() -> None:
    ref = np.array([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]], dtype=np.float32)
    got = ref + np.array([[0.0, 5e-5, 0.0], [-2e-5, 0.0, 0.0]], dtype=np.float32)
    r = compare(ref, got, atol=1e-4)
    assert r["passed"] and r["top1_agreement"] == 1.0 and r["disagreements"] == 0
    assert abs(r["max_abs_diff"] - 5e-5) < 1e-6  # float32 rounding of 2.00005
    assert abs(r["max_rel_diff"] - 2.5e-5) < 1e-6  # 5e-5 / |2.0|


def test_abs_diff_over_tolerance_fails_even_when_top1_agrees() -> None:
    ref = np.array([[1.0, 5.0]], dtype=np.float32)
    r = compare(ref, ref + np.float32(2e-4), atol=1e-4)
    assert not r["passed"] and r["top1_agreement"] == 1.0


def test_disagreement_on_a_near_tie_is_tolerated_and_counted() -> None:
    # Row 0: PyTorch's own top-2 margin (3e-5) is below the tolerance: a flip there is rounding.
    ref = np.array([[1.0, 1.00003, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    got = np.array([[1.00002, 1.00001, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    r = compare(ref, got, atol=1e-4)
    assert r["disagreements"] == 1 and r["tolerated_disagreements"] == 1
    assert r["top1_agreement"] == 0.5 and r["passed"]


def test_disagreement_with_a_clear_margin_fails() -> None:
    ref = np.array([[1.0, 1.001, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)  # row 0 margin 1e-3 > atol
    got = np.array([[1.0, 0.999, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    r = compare(ref, got, atol=1e-4)
    assert r["disagreements"] == 1 and r["tolerated_disagreements"] == 0
    assert r["top1_agreement"] == 0.5 and not r["passed"]


def _model(out_dims: list) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 4])
    logits = helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, out_dims)
    probs = helper.make_tensor_value_info(PROBABILITIES_NAME, TensorProto.FLOAT, out_dims)
    nodes = [
        helper.make_node("Identity", [INPUT_NAME], [LOGITS_NAME]),
        helper.make_node("Softmax", [LOGITS_NAME], [PROBABILITIES_NAME]),
    ]
    return helper.make_model(
        helper.make_graph(nodes, "g", [x], [logits, probs]), opset_imports=[helper.make_opsetid("", 18)]
    )


def test_check_onnx_accepts_a_valid_graph_and_rejects_wrong_outputs() -> None:
    ok = check_onnx(_model(["batch", 4]), (4,), 4)
    assert ok.passed and ok.numbers["output_shapes"]["logits"] == ["batch", 4]
    wrong_classes = check_onnx(_model(["batch", 4]), (4,), 10)
    assert not wrong_classes.passed and "expected [batch, 10]" in wrong_classes.message
    broken = _model(["batch", 4])
    broken.graph.node[0].input[0] = "nowhere"  # dangling input
    result = check_onnx(broken, (4,), 4)
    assert not result.passed and result.name == "onnx_checker"


def test_python_m_exporter_help_mentions_verify() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "exporter", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert "--repository" in out and "cnn-export verify" in out and "--int8" in out

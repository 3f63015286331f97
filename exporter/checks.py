"""The export gate: ONNX validity, PyTorch-vs-onnxruntime parity, optimized-vs-plain onnxruntime.

Each check returns a ``CheckResult`` (name, passed, numbers, message). Parity numbers, per batch
size compared::

    max_abs_diff    max |ref - got| over all logits
    max_rel_diff    max |ref - got| / max(|ref|, 1e-3)  (reported, not gated)
    top1_agreement  fraction of images whose argmax agrees
    tolerated       disagreements where the reference's own top-2 margin is below atol (ties)

Gate: max_abs_diff <= atol and every disagreement tolerated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from cnnstack.contract import INPUT_NAME, LOGITS_NAME, CheckResult

CPU = ["CPUExecutionProvider"]
REL_FLOOR = 1e-3


@dataclass(frozen=True)
class Gate:
    """How the parity checks run: the large batch, how many images at batch 1, the tolerance."""

    batch: int
    batch1_samples: int
    atol: float
    threads: int = 0  # intra-op threads of onnxruntime sessions; 0 = onnxruntime's default


def session(model_bytes: bytes, optimized: bool = True, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; ``optimized`` picks ORT_ENABLE_ALL vs ORT_DISABLE_ALL graph optimizations."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, sess_options=so, providers=CPU)
    if sess.get_providers()[0] != "CPUExecutionProvider":  # never measure a silent fallback
        raise RuntimeError(f"onnxruntime picked {sess.get_providers()}, wanted CPU")
    return sess


def check_onnx(proto: onnx.ModelProto, input_shape: tuple[int, ...], num_classes: int) -> CheckResult:
    """onnx.checker (full) and strict shape inference; outputs must infer to (batch, num_classes)."""
    numbers = {
        "nodes": len(proto.graph.node),
        "opset": max(o.version for o in proto.opset_import if o.domain == ""),
    }
    try:
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError / RuntimeError
        return CheckResult("onnx_checker", False, numbers, f"{type(e).__name__}: {e}")
    shapes = {}
    for out in inferred.graph.output:
        dims = out.type.tensor_type.shape.dim
        shapes[out.name] = [d.dim_param or d.dim_value for d in dims]
    numbers["output_shapes"] = shapes
    bad = {k: v for k, v in shapes.items() if len(v) != 2 or not isinstance(v[0], str) or v[1] != num_classes}
    if bad:
        return CheckResult(
            "onnx_checker", False, numbers, f"outputs infer to {bad}, expected [batch, {num_classes}]"
        )
    return CheckResult("onnx_checker", True, numbers, "onnx.checker (full) and strict shape inference passed")


def run_batches(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """Apply ``fn`` (batch -> logits) over x in chunks of ``batch``; (N, K) float32."""
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)], axis=0)


def torch_logits(wrapper, x: np.ndarray, batch: int) -> np.ndarray:
    import torch

    def fn(xb: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return wrapper(torch.from_numpy(xb))[0].float().numpy()

    return run_batches(fn, x, batch)


def ort_logits(sess: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    return run_batches(lambda xb: sess.run([LOGITS_NAME], {INPUT_NAME: xb})[0].astype(np.float32), x, batch)


def compare(ref: np.ndarray, got: np.ndarray, atol: float) -> dict[str, Any]:
    """Numbers of one comparison (ref = the reference: PyTorch, or unoptimized ORT)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))  # (N, K)
    rel = diff / np.maximum(np.abs(ref), REL_FLOOR)
    ref_top, got_top = ref.argmax(1), got.argmax(1)
    disagree = np.flatnonzero(ref_top != got_top)
    top2 = np.sort(ref, axis=1)[:, -2:]  # (N, 2) second-best, best
    margin = top2[:, 1] - top2[:, 0]
    tolerated = int((margin[disagree] < atol).sum())
    n = len(ref)
    return {
        "images": n,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "max_rel_diff": float(rel.max()) if rel.size else 0.0,
        "top1_agreement": float((n - len(disagree)) / n) if n else 1.0,
        "disagreements": len(disagree),
        "tolerated_disagreements": tolerated,
        "passed": bool(diff.size and diff.max() <= atol and tolerated == len(disagree)),
    }


def _summarize(
    name: str, per_batch: dict[str, dict[str, Any]], atol: float, ref: str, got: str
) -> CheckResult:
    numbers: dict[str, Any] = {"atol": atol, "reference": ref, "candidate": got, "by_batch": per_batch}
    numbers["max_abs_diff"] = max(r["max_abs_diff"] for r in per_batch.values())
    numbers["max_rel_diff"] = max(r["max_rel_diff"] for r in per_batch.values())
    numbers["top1_agreement"] = min(r["top1_agreement"] for r in per_batch.values())
    numbers["tolerated_disagreements"] = sum(r["tolerated_disagreements"] for r in per_batch.values())
    passed = all(r["passed"] for r in per_batch.values())
    worst = max(per_batch.items(), key=lambda kv: kv[1]["max_abs_diff"])
    msg = (
        f"max abs diff {numbers['max_abs_diff']:.3g} (gate {atol:g}), top-1 agreement "
        f"{100 * numbers['top1_agreement']:.2f}% ({numbers['tolerated_disagreements']} tolerated ties)"
    )
    if not passed:
        bad = next(k for k, r in per_batch.items() if not r["passed"])
        msg = f"FAILED at {bad}: {msg}; worst at {worst[0]}"
    return CheckResult(name, passed, numbers, msg)


def parity_check(wrapper, model_bytes: bytes, x: np.ndarray, gate: Gate) -> tuple[CheckResult, np.ndarray]:
    """PyTorch (eval, fp32, CPU) vs onnxruntime CPU at batch 1 and at ``batch``.

    Returns the check and the ORT logits of all of x at the large batch (reused for accuracy).
    """
    sess = session(model_bytes, optimized=True, threads=gate.threads)
    x1, atol = x[: gate.batch1_samples], gate.atol
    per_batch = {"batch_1": compare(torch_logits(wrapper, x1, 1), ort_logits(sess, x1, 1), atol)}
    got = ort_logits(sess, x, gate.batch)
    per_batch[f"batch_{gate.batch}"] = compare(torch_logits(wrapper, x, gate.batch), got, atol)
    return _summarize("parity", per_batch, atol, "pytorch", "onnxruntime"), got


def optimization_check(model_bytes: bytes, x: np.ndarray, gate: Gate) -> CheckResult:
    """onnxruntime with all graph optimizations vs none: the fused graph must compute the same."""
    plain = session(model_bytes, optimized=False, threads=gate.threads)
    fused = session(model_bytes, optimized=True, threads=gate.threads)
    x1, atol, batch = x[: gate.batch1_samples], gate.atol, gate.batch
    per_batch = {
        "batch_1": compare(ort_logits(plain, x1, 1), ort_logits(fused, x1, 1), atol),
        f"batch_{batch}": compare(ort_logits(plain, x, batch), ort_logits(fused, x, batch), atol),
    }
    return _summarize("ort_optimizations", per_batch, atol, "ort_disable_all", "ort_enable_all")


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean())


def accuracy_gate(
    precision: str, acc: float, ref_acc: float, max_drop_pp: float, ref_key: str, ref_label: str
) -> CheckResult:
    """A reduced-precision model's accuracy against its reference's (``ref_label``: fp32, PyTorch)."""
    drop = 100.0 * (ref_acc - acc)
    numbers = {
        f"{ref_key}_accuracy": ref_acc,
        "accuracy": acc,
        "drop_pp": round(drop, 3),
        "max_drop_pp": max_drop_pp,
    }
    message = (
        f"{precision} accuracy {100 * acc:.2f}% vs {ref_label} {100 * ref_acc:.2f}% "
        f"(drop {drop:.2f} pp, max {max_drop_pp:g})"
    )
    return CheckResult("accuracy_gate", drop <= max_drop_pp, numbers, message)


def images_per_second(
    model_bytes: bytes, x: np.ndarray, batch: int = 64, seconds: float = 1.0, threads: int = 0
) -> float:
    """CPU onnxruntime throughput at ``batch`` (after one warm-up run), measured for ~``seconds``."""
    sess = session(model_bytes, optimized=True, threads=threads)
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))  # (batch, C, H, W), repeats if N < batch
    feed = {INPUT_NAME: xb}
    sess.run([LOGITS_NAME], feed)
    done, start = 0, time.perf_counter()
    while True:
        sess.run([LOGITS_NAME], feed)
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or done >= 1000 * batch:
            return done / elapsed

"""``cnn-export verify REPO/NAME/VERSION --checkpoint CKPT``: re-run the gate on a published model.

FP32 models get the export checks again (onnx checker, PyTorch-vs-ORT parity, ORT optimizations);
fp16/int8 models get the onnx checker and the accuracy gate against the checkpoint's PyTorch model.
"""

from __future__ import annotations

from typing import Any

import onnx

from cnnstack.contract import MODEL_FILE, CheckResult, ModelMeta, Provenance
from exporter import checks, onnx_export
from exporter.config import ExportConfig
from exporter.driver import gate_of
from exporter.inputs import load_eval_data
from exporter.source import BadInput, build_wrapper, load_source


def verify_published(cfg: ExportConfig) -> dict[str, Any]:
    """The verify report; ``report["passed"]`` says whether every check passed. BadInput on bad paths."""
    assert cfg.checkpoint is not None
    vdir = cfg.sources[0]
    model_path = vdir / MODEL_FILE
    if not model_path.is_file():
        raise BadInput(f"{vdir} is not a published model version: no {MODEL_FILE} in it")
    try:
        proto = onnx.load_model(model_path)
    except Exception as e:
        raise BadInput(f"{model_path} is not a readable ONNX model: {e}") from e
    props = onnx_export.read_metadata(proto)
    src = load_source(cfg.checkpoint)
    arch = _published_arch(props)
    if arch not in (None, src.meta.arch):
        raise BadInput(f"{model_path} is a '{arch}' model, {src.path} holds a '{src.meta.arch}'")
    wrapper = build_wrapper(src)
    provenance = Provenance.from_onnx_props(props)
    precision = provenance.precision
    data = load_eval_data(src.meta, cfg.data_dir, cfg.parity_samples, cfg.seed)
    report: dict[str, Any] = {
        "model": str(model_path.resolve()),
        "precision": precision,
        "checkpoint": str(src.path.resolve()),
        "checkpoint_sha256": src.sha256,
        "source_sha256_matches": provenance.source_sha256 == src.sha256,
        "data": data.source,
        "checks": [],
    }
    results = [checks.check_onnx(proto, src.meta.input_shape, src.meta.num_classes)]
    model_bytes = model_path.read_bytes()
    if results[0].passed and precision == "fp32":
        parity, _ = checks.parity_check(wrapper, model_bytes, data.x, gate_of(cfg))
        results.append(parity)
        if parity.passed:
            results.append(checks.optimization_check(model_bytes, data.x, gate_of(cfg)))
    elif results[0].passed:
        results.append(_accuracy_gate(wrapper, model_bytes, data, cfg, precision))
    report["checks"] = [r.to_dict() for r in results]
    report["passed"] = all(r.passed for r in results)
    report["failed_check"] = next((r.name for r in results if not r.passed), None)
    return report


def _accuracy_gate(wrapper, model_bytes: bytes, data, cfg: ExportConfig, precision: str) -> CheckResult:
    ref = checks.accuracy(checks.torch_logits(wrapper, data.x, cfg.parity_batch), data.y)
    got = checks.accuracy(
        checks.ort_logits(checks.session(model_bytes, threads=cfg.threads), data.x, cfg.parity_batch), data.y
    )
    if ref is None or got is None:
        return CheckResult("accuracy_gate", False, {}, f"accuracy unknown: {data.source}")
    return checks.accuracy_gate(precision, got, ref, cfg.max_accuracy_drop, "pytorch", "PyTorch fp32")


def _published_arch(props: dict[str, str]) -> str | None:
    """The arch a published model declares (None for one without cnn-export's metadata)."""
    try:
        return ModelMeta.from_onnx_props(props).arch
    except ValueError:
        return None

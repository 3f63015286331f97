"""The export driver: one checkpoint exported, checked and published, as plain stage functions
read top to bottom:

    load_source -> export (fp32) -> check_onnx -> parity -> ort optimizations -> accuracy/speed
    -> fp16 / int8 variants (accuracy gate) -> publish (atomic, versioned)

Nothing touches the repository until every FP32 check passed; a failed check raises
``ExportFailed`` naming it, with the report of what was measured so far. The report is the
contract's ``ExportReport``; each stage fills its part.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from tqdm import tqdm

import cnnstack
from cnnstack.contract import (
    CheckResult,
    DataInfo,
    ExportInfo,
    ExportReport,
    ModelSection,
    ModelSignature,
    Provenance,
    RepositoryError,
    SourceRef,
    check_name_clash,
    model_config,
    publish,
    render_config,
    sanitize_name,
)
from exporter import checks, onnx_export, quantize
from exporter.config import ExportConfig
from exporter.inputs import EvalData, load_calibration, load_eval_data
from exporter.source import BadInput, Source, build_wrapper, default_name, load_source
from trainer.models import count_parameters

BENCH_BATCH = 64


class ExportFailed(RuntimeError):
    def __init__(self, check: str, message: str, report: ExportReport) -> None:
        super().__init__(f"check '{check}' failed: {message}")
        self.check = check
        self.report = report


@dataclass
class Candidate:
    """One model ready to publish: bytes plus the numbers its report carries."""

    precision: str
    model_bytes: bytes
    checks: list[CheckResult]
    numbers: dict[str, Any] = field(default_factory=dict)  # JSON-safe
    top1: np.ndarray | None = None  # (N,) predictions on the eval images
    publish: bool = True
    why_not: str = ""


@dataclass
class ExportResult:
    given: Path
    name: str | None
    report: ExportReport
    published: dict[str, int] = field(default_factory=dict)  # model name -> version
    problems: list[str] = field(default_factory=list)  # empty when everything asked for was published


def say(name: str, what: str) -> None:
    """One line before each step that can take seconds: an export is never silent."""
    tqdm.write(f"[{name}] {what}", file=sys.stderr)  # above the progress bar, if any


def gate_of(cfg: ExportConfig) -> checks.Gate:
    return checks.Gate(cfg.parity_batch, cfg.batch1_samples, cfg.atol, cfg.threads)


def base_report(src: Source, name: str, params: int, cfg: ExportConfig) -> ExportReport:
    metrics = {k: v for k, v in (src.ckpt.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
    meta = src.meta
    return ExportReport(
        passed=False,
        name=name,
        source=SourceRef(str(src.path.resolve()), src.sha256, src.ckpt.get("epoch")),
        checkpoint_metrics=metrics,
        model=ModelSection(
            ModelSignature.of(meta), meta.dataset, meta.class_names, src.ckpt.get("model_args"), params
        ),
        versions={
            "exporter": cnnstack.version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        settings={
            "opset": cfg.opset,
            "atol": cfg.atol,
            "parity_batch": cfg.parity_batch,
            "batch1_samples": cfg.batch1_samples,
            "max_accuracy_drop_pp": cfg.max_accuracy_drop,
        },
    )


def _timed(report: ExportReport, key: str, start: float) -> None:
    report.timings_s[key] = round(time.perf_counter() - start, 3)


def _gate(report: ExportReport, result: CheckResult) -> None:
    report.checks.append(result)
    if not result.passed:
        raise ExportFailed(result.name, result.message, report)


def _accuracy_source(acc: float | None, data: EvalData) -> str:
    return f"onnxruntime on the {data.source}" if acc is not None else "unavailable (no test set)"


def export_fp32(src: Source, wrapper, data: EvalData, report: ExportReport, cfg: ExportConfig) -> Candidate:
    """Export and gate the FP32 model; ``report`` gathers numbers as it goes."""
    say(report.name, f"exporting to ONNX (opset {cfg.opset})")
    t = time.perf_counter()
    try:
        proto, exporter_used, note = onnx_export.export_onnx(wrapper, src.meta, cfg.opset)
    except Exception as e:  # both exporters failed: an export problem, not bad input
        _gate(report, CheckResult("export", False, {}, f"{type(e).__name__}: {e}"))
        raise  # unreachable: _gate raised
    _timed(report, "export", t)
    report.export = ExportInfo(exporter_used, note, cfg.opset)
    report.data = DataInfo(data.source, data.real)

    say(
        report.name,
        f"checks: ONNX checker, parity with PyTorch on {len(data.x):,} images, onnxruntime optimizations",
    )
    t = time.perf_counter()
    _gate(report, checks.check_onnx(proto, src.meta.input_shape, src.meta.num_classes))
    model_bytes = proto.SerializeToString()
    parity, logits = checks.parity_check(wrapper, model_bytes, data.x, gate_of(cfg))
    _gate(report, parity)
    _gate(report, checks.optimization_check(model_bytes, data.x, gate_of(cfg)))
    _timed(report, "checks", t)

    say(report.name, f"speed: onnxruntime at batch {BENCH_BATCH} for {cfg.bench_seconds:g} s")
    t = time.perf_counter()
    speed = checks.images_per_second(model_bytes, data.x, BENCH_BATCH, cfg.bench_seconds, cfg.threads)
    _timed(report, "speed_fp32", t)
    acc = checks.accuracy(logits, data.y)
    source = _accuracy_source(acc, data)
    if acc is None and isinstance((src.ckpt.get("metrics") or {}).get("test_acc"), float):
        acc, source = float(src.ckpt["metrics"]["test_acc"]), "checkpoint metrics (the trainer's test_acc)"
    props = onnx_export.metadata_props(
        src.meta, onnx_export.provenance("fp32", acc, source, src.sha256, exporter_used)
    )
    final = onnx_export.set_metadata(proto, props).SerializeToString()
    numbers = {
        "accuracy": checks.accuracy(logits, data.y),
        "accuracy_source": source,
        "images_per_second": round(speed, 1),
        "onnx_bytes": len(final),
    }
    return Candidate("fp32", final, [], numbers, top1=logits.argmax(1))


def _variant_gate(
    precision: str, acc: float | None, fp32_acc: float | None, data: EvalData, cfg: ExportConfig
) -> CheckResult:
    if acc is None or fp32_acc is None:
        return CheckResult(
            "accuracy_gate",
            False,
            {"max_drop_pp": cfg.max_accuracy_drop},
            f"{precision} accuracy unknown (needs labelled test images; eval data: {data.source})",
        )
    return checks.accuracy_gate(precision, acc, fp32_acc, cfg.max_accuracy_drop, "fp32", "fp32")


def export_variant(
    precision: str,
    fp32: Candidate,
    src: Source,
    data: EvalData,
    cfg: ExportConfig,
    calib: tuple[np.ndarray, str],
) -> Candidate:
    """Build, check and score NAME-fp16 / NAME-int8 against FP32; gate on the accuracy drop."""
    base = onnx.ModelProto.FromString(fp32.model_bytes)
    exporter_used = Provenance.from_onnx_props(onnx_export.read_metadata(base)).torch_exporter
    t = time.perf_counter()
    proto = quantize.to_fp16(base) if precision == "fp16" else quantize.to_int8(base, calib[0])
    numbers: dict[str, Any] = {"convert_s": round(time.perf_counter() - t, 3)}
    if precision == "int8":
        numbers["calibration"] = calib[1]
    results = [checks.check_onnx(proto, src.meta.input_shape, src.meta.num_classes)]
    cand = Candidate(precision, b"", results, numbers)
    if not results[0].passed:
        cand.publish, cand.why_not = False, results[0].message
        return cand

    model_bytes = proto.SerializeToString()
    logits = checks.ort_logits(checks.session(model_bytes, threads=cfg.threads), data.x, cfg.parity_batch)
    acc = checks.accuracy(logits, data.y)
    speed = checks.images_per_second(model_bytes, data.x, BENCH_BATCH, cfg.bench_seconds, cfg.threads)
    numbers.update(
        accuracy=acc,
        top1_agreement_vs_fp32=float((logits.argmax(1) == fp32.top1).mean()),
        images_per_second=round(speed, 1),
        speed_ratio_vs_fp32=round(speed / fp32.numbers["images_per_second"], 3),
    )
    gate = _variant_gate(precision, acc, fp32.numbers["accuracy"], data, cfg)
    if "drop_pp" in gate.numbers:
        numbers["accuracy_delta_pp"] = -gate.numbers["drop_pp"]
    results.append(gate)
    if not gate.passed and not cfg.force_precision:
        cand.publish, cand.why_not = False, gate.message
    numbers["forced"] = not gate.passed and cfg.force_precision

    provenance = onnx_export.provenance(
        precision, acc, _accuracy_source(acc, data), src.sha256, exporter_used
    )
    cand.model_bytes = onnx_export.set_metadata(
        proto, onnx_export.metadata_props(src.meta, provenance)
    ).SerializeToString()
    numbers["onnx_bytes"] = len(cand.model_bytes)
    cand.top1 = logits.argmax(1)
    return cand


def _variant_summary(cands: list[Candidate]) -> dict[str, Any]:
    return {
        c.precision: {**c.numbers, "published": c.publish, "why_not_published": c.why_not or None}
        for c in cands
    }


def _names(name: str, src: Source, cfg: ExportConfig) -> dict[str, str]:
    """precision -> model name (NAME, NAME-fp16, NAME-int8), none of them taken by another model."""
    assert cfg.repository is not None
    precisions = [p for p, on in (("fp16", cfg.fp16), ("int8", cfg.int8)) if on]
    names = {"fp32": name, **{p: f"{name}-{p}" for p in precisions}}
    try:
        for n in names.values():
            check_name_clash(cfg.repository, n, ModelSignature.of(src.meta))
    except RepositoryError as e:
        raise BadInput(str(e)) from e
    return names


def _eval_data(
    src: Source, report: ExportReport, cfg: ExportConfig
) -> tuple[EvalData, tuple[np.ndarray, str] | None]:
    say(report.name, f"loading evaluation data ({src.meta.dataset})")
    t = time.perf_counter()
    try:  # a dataset that does not fit the metadata (channels, labels) is bad input, not a crash
        data = load_eval_data(src.meta, cfg.data_dir, cfg.parity_samples, cfg.seed)
        calib = (
            load_calibration(src.meta, cfg.data_dir, cfg.calibration_samples, cfg.seed) if cfg.int8 else None
        )
    except ValueError as e:
        raise BadInput(f"{src.path}: evaluation data for '{src.meta.dataset}': {e}") from e
    _timed(report, "load_data", t)
    return data, calib


def _variants(
    fp32: Candidate,
    names: dict[str, str],
    src: Source,
    data: EvalData,
    report: ExportReport,
    cfg: ExportConfig,
    calib: tuple[np.ndarray, str] | None,
) -> list[Candidate]:
    variants = []
    for precision in [p for p in names if p != "fp32"]:
        say(names[precision], f"converting to {precision}, then its accuracy and speed against fp32")
        t = time.perf_counter()
        try:
            variants.append(export_variant(precision, fp32, src, data, cfg, calib))  # type: ignore[arg-type]
        except Exception as e:  # a converter crash costs this variant only
            variants.append(Candidate(precision, b"", [], publish=False, why_not=f"{type(e).__name__}: {e}"))
        _timed(report, f"variant_{precision}", t)
    return variants


def _publish_all(
    result: ExportResult,
    every: list[Candidate],
    names: dict[str, str],
    src: Source,
    cfg: ExportConfig,
    t0: float,
) -> None:
    assert cfg.repository is not None
    report = result.report
    # fp16/int8 keep fp32 inputs/outputs: every precision gets the same interface in config.pbtxt.
    for cand in every:
        model_name = names[cand.precision]
        if not cand.publish:
            result.problems.append(f"{model_name} not published: {cand.why_not}")
            continue
        _timed(report, "total", t0)

        def report_for(version: int, name: str = model_name, cand: Candidate = cand) -> ExportReport:
            checks_run = report.checks + cand.checks
            return dataclasses.replace(
                report, name=name, precision=cand.precision, checks=checks_run, version=version
            )

        config = model_config(
            model_name, src.meta.input_shape, src.meta.num_classes, cfg.max_batch_size, cfg.max_queue_delay_us
        )
        result.published[model_name] = publish(
            cfg.repository,
            model_name,
            cand.model_bytes,
            report_for,
            render_config(config),
            labels=src.meta.class_names,
        )
    report.published = dict(result.published)


def export_one(given: Path, cfg: ExportConfig) -> ExportResult:
    """Everything for one checkpoint. Raises BadInput (nothing written) or ExportFailed (nothing published)."""
    t0 = time.perf_counter()
    src = load_source(given)
    name = sanitize_name(cfg.name) if cfg.name else default_name(src)
    wrapper = build_wrapper(src)
    names = _names(name, src, cfg)
    report = base_report(src, names["fp32"], count_parameters(wrapper.model), cfg)
    data, calib = _eval_data(src, report, cfg)
    fp32 = export_fp32(src, wrapper, data, report, cfg)
    every = [fp32, *_variants(fp32, names, src, data, report, cfg, calib)]
    report.passed = True
    report.accuracy = {c.precision: c.numbers.get("accuracy") for c in every}
    report.precisions = _variant_summary(every)
    result = ExportResult(given, names["fp32"], report)
    _publish_all(result, every, names, src, cfg, t0)
    return result

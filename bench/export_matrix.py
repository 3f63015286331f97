"""Export every registry architecture through cnn-export's gate and print the parity matrix.

For each arch: a checkpoint from ``--checkpoints`` (files, run dirs, or folders searched for
best.pt/checkpoint.pt) when one holds that arch, else untrained weights whose BatchNorm statistics
come from real training images (what a trained net's look like; the initial mean 0 / var 1 stats
make a deep net's logits blow up to ~1e5 and an absolute tolerance meaningless). Then the exporter's
own stages (export -> onnx checker -> PyTorch vs ORT parity at batch 1 and at --parity-batch ->
ORT optimized vs plain), and for --precision-archs the FP16 / INT8 variants: accuracy delta vs
FP32 and CPU onnxruntime images/s ratio.

    .venv/bin/python -m bench.export_matrix                                    # untrained, all archs
    .venv/bin/python -m bench.export_matrix --checkpoints artifacts/runs       # trained where found

Prints a Markdown table and writes matrix.json / matrix.md under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnstack.contract import ExportReport, ModelMeta
from exporter.config import ExportConfig
from exporter.driver import ExportFailed, export_one
from exporter.source import BadInput, load_source
from trainer.checkpoint import Checkpoint
from trainer.models import get_model, list_models

ROOT = Path(__file__).resolve().parents[1]


def find_checkpoints(paths: list[Path]) -> dict[str, Path]:
    """arch -> checkpoint file; the newest file wins when several hold the same arch."""
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif (p / "best.pt").is_file() or (p / "checkpoint.pt").is_file():
            files.append(p / "best.pt" if (p / "best.pt").is_file() else p / "checkpoint.pt")
        elif p.is_dir():
            files += [f for name in ("best.pt", "checkpoint.pt") for f in p.rglob(name)]
    found: dict[str, Path] = {}
    for f in sorted(files, key=lambda f: f.stat().st_mtime):
        try:
            found[load_source(f).meta.arch] = f
        except BadInput as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    return found


def untrained_checkpoint(arch: str, dataset: str, data_dir: Path | None, out: Path) -> Path:
    """Untrained weights, BatchNorm stats from 256 training images (one train-mode pass)."""
    from trainer.data import load_dataset, to_float

    info, train, _ = load_dataset(dataset, data_dir=data_dir)
    meta = ModelMeta(arch, dataset, info.input_shape, info.mean, info.std, info.class_names)
    args = {"in_channels": info.channels, "num_classes": info.num_classes, "image_size": info.image_size}
    torch.manual_seed(0)
    model = get_model(arch, **args)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative: the stats of exactly these images
    if bns:
        model.train()
        with torch.no_grad():
            model(to_float(train.x[:256], info))
    model.eval()
    path = out / "untrained" / f"{arch}.pt"
    note = {"note": "untrained (bench/export_matrix.py)"}
    Checkpoint(arch, args, meta, model.state_dict(), config=note).save(path)
    return path


def row_for(
    arch: str, source: Path, trained: bool, report: ExportReport, failed: str | None, secs: float
) -> dict:
    parity = report.check("parity")
    opt = report.check("ort_optimizations")
    by_batch = parity.get("by_batch", {})
    big: dict[str, Any] = next((v for k, v in by_batch.items() if k != "batch_1"), {})
    precisions = report.precisions or {}
    row = {
        "arch": arch,
        "weights": "trained" if trained else "untrained",
        "source": str(source),
        "params": report.model.params,
        "exporter": report.export.torch_exporter if report.export else None,
        "eval_images": big.get("images"),
        "max_abs_diff_b1": by_batch.get("batch_1", {}).get("max_abs_diff"),
        "max_abs_diff_bN": big.get("max_abs_diff"),
        "max_rel_diff": parity.get("max_rel_diff"),
        "top1_agreement": parity.get("top1_agreement"),
        "tolerated": parity.get("tolerated_disagreements"),
        "ort_opt_max_abs_diff": opt.get("max_abs_diff"),
        "acc_fp32": precisions.get("fp32", {}).get("accuracy"),
        "gate": "FAILED: " + failed if failed else "passed",
        "seconds": round(secs, 1),
    }
    for p in ("fp16", "int8"):
        v = precisions.get(p)
        if v:
            row[f"{p}_delta_pp"] = v.get("accuracy_delta_pp")
            row[f"{p}_speed_ratio"] = v.get("speed_ratio_vs_fp32")
            row[f"{p}_published"] = v.get("published")
    row["images_per_s_fp32"] = precisions.get("fp32", {}).get("images_per_second")
    return row


def fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "e":
        return f"{v:.1e}"
    if kind == "%":
        return f"{100 * v:.2f}%"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "pp":
        return f"{v:+.2f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    head = (
        "| arch | weights | params | exporter | images | max abs diff b1 / bN | top-1 agree | ORT opt diff | "
        "FP32 acc | FP16 Δpp / speed | INT8 Δpp / speed | gate |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['weights']} | {fmt(r['params'])} | {fmt(r['exporter'])} | {fmt(r['eval_images'])} | "
            f"{fmt(r['max_abs_diff_b1'], 'e')} / {fmt(r['max_abs_diff_bN'], 'e')} | {fmt(r['top1_agreement'], '%')} | "
            f"{fmt(r['ort_opt_max_abs_diff'], 'e')} | {fmt(r['acc_fp32'], '%')} | "
            f"{fmt(r.get('fp16_delta_pp'), 'pp')} / {fmt(r.get('fp16_speed_ratio'), 'x')} | "
            f"{fmt(r.get('int8_delta_pp'), 'pp')} / {fmt(r.get('int8_speed_ratio'), 'x')} | {r['gate']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoints", nargs="*", type=Path, default=[], metavar="DIR", help="checkpoints / run dirs"
    )
    p.add_argument("--archs", nargs="*", default=None, help="default: every registry arch")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument(
        "--parity-samples", type=int, default=2000, help="test images at the large batch (0 = all)"
    )
    p.add_argument("--full-test-archs", nargs="*", default=["lenet5"], help="these use the whole test set")
    p.add_argument("--parity-batch", type=int, default=256)
    p.add_argument("--precision-archs", nargs="*", default=["lenet5", "resnet18"], help="fp16/int8 for these")
    p.add_argument("--bench-seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "export_matrix")
    a = p.parse_args(argv)

    archs = a.archs or list_models()
    given = find_checkpoints(a.checkpoints)
    a.out.mkdir(parents=True, exist_ok=True)
    base = ExportConfig(
        command="export",
        sources=(),
        repository=a.out / "repo",
        parity_batch=a.parity_batch,
        data_dir=a.data_dir,
        bench_seconds=a.bench_seconds,
        progress=False,
    )
    rows = []
    for arch in archs:
        source = given.get(arch) or untrained_checkpoint(arch, a.dataset, a.data_dir, a.out)
        precise = arch in a.precision_archs
        cfg = replace(
            base,
            sources=(source,),
            name=f"{arch}-{'trained' if arch in given else 'untrained'}",
            parity_samples=0 if arch in a.full_test_archs else a.parity_samples,
            fp16=precise,
            int8=precise,
            force_precision=True,  # measure and publish even untrained variants: this is a benchmark
        )
        print(f"[{arch}] exporting {source} ...", file=sys.stderr, flush=True)
        start, failed = time.perf_counter(), None
        try:
            report = export_one(source, cfg).report
        except ExportFailed as e:
            report, failed = e.report, e.check
        rows.append(row_for(arch, source, arch in given, report, failed, time.perf_counter() - start))
        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    md = markdown(rows)
    (a.out / "matrix.json").write_text(
        json.dumps({"rows": rows, "torch": torch.__version__}, indent=2) + "\n"
    )
    (a.out / "matrix.md").write_text(md)
    print(md)
    return 0 if all(r["gate"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

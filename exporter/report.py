"""The batch summary: one row per source, printed and written as JSON and Markdown in the repository."""

from __future__ import annotations

import time
from typing import Any

from cnnstack.contract import ExportReport

COLUMNS = (
    ("model", "model"),
    ("version", "version"),
    ("params", "params"),
    ("onnx_bytes", "ONNX bytes"),
    ("parity_max_abs_diff", "parity max abs diff"),
    ("top1_agreement", "top-1 agreement"),
    ("acc_fp32", "FP32 acc"),
    ("acc_fp16", "FP16 acc"),
    ("acc_int8", "INT8 acc"),
    ("images_per_s", "CPU images/s (fp32/fp16/int8)"),
    ("status", "status"),
)


def summary_row(
    source: str, name: str | None, report: ExportReport | None, published: dict[str, int], status: str
) -> dict[str, Any]:
    """JSON-safe row; missing numbers are None."""
    precisions = (report.precisions if report else None) or {}
    parity = report.check("parity") if report else {}

    def acc(p: str) -> float | None:
        return precisions.get(p, {}).get("accuracy")

    def ips(p: str) -> float | None:
        return precisions.get(p, {}).get("images_per_second")

    return {
        "source": source,
        "model": name,
        "version": published.get(name) if name else None,
        "published": published,
        "params": report.model.params if report else None,
        "onnx_bytes": precisions.get("fp32", {}).get("onnx_bytes"),
        "parity_max_abs_diff": parity.get("max_abs_diff"),
        "top1_agreement": parity.get("top1_agreement"),
        "acc_fp32": acc("fp32"),
        "acc_fp16": acc("fp16"),
        "acc_int8": acc("int8"),
        "images_per_s_fp32": ips("fp32"),
        "images_per_s_fp16": ips("fp16"),
        "images_per_s_int8": ips("int8"),
        "status": status,
    }


def _fmt(key: str, row: dict[str, Any]) -> str:
    v = row.get(key)
    if key == "model" and v is None:  # a source that never got a name (bad input): show the source
        v = row.get("source")
    if key == "images_per_s":
        vals = [row.get(f"images_per_s_{p}") for p in ("fp32", "fp16", "int8")]
        return " / ".join("-" if x is None else f"{x:.0f}" for x in vals)
    if v is None:
        return "-"
    if key == "parity_max_abs_diff":
        return f"{v:.2e}"
    if key in ("top1_agreement", "acc_fp32", "acc_fp16", "acc_int8"):
        return f"{100 * v:.2f}%"
    if key in ("params", "onnx_bytes"):
        return f"{v:,}"
    text = " ".join(str(v).split())  # one line per row
    return text if len(text) <= 80 else text[:77] + "..."


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(k, r).replace("|", "/") for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def text_table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]] + [[_fmt(k, r) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_document(rows: list[dict[str, Any]], failures: int) -> tuple[dict[str, Any], str]:
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    doc = {"created": created, "exported": len(rows) - failures, "failed": failures, "rows": rows}
    md = f"# Export summary ({created})\n\n{len(rows) - failures} exported, {failures} failed.\n\n"
    return doc, md + markdown_table(rows)

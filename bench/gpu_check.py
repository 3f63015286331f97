"""The Python half of bench/gpu_check.sh: what the machine has, the in-process onnxruntime ceiling,
and the one table of results.

    python -m bench.gpu_check env OUT            # OUT/env.json: torch, onnxruntime, the CUDA probe, modules
    python -m bench.gpu_check ceiling --model M --device cuda --out OUT/ceiling.json
    python -m bench.gpu_check table OUT          # prints the table; OUT/gpu_check.md and .json

Torch-free except ``env``, which imports torch only after onnxruntime's probe (the server never
imports torch, and torch's CUDA libraries must not make the probe pass where the server would fail).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MODULES = (
    "torch",
    "numpy",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "prometheus_client",
    "PIL",
    "matplotlib",
    "tqdm",
    "uvloop",
    "pytest",
)
GOAL_ACC, GOAL_TRAIN_S, GOAL_IMAGES_S, GOAL_TOTAL_S = 0.95, 60.0, 20_000.0, 480.0


def _find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def env(out: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "missing_modules": [m for m in MODULES if not _find(m)],
    }
    try:
        import onnxruntime as ort

        from server.runtime.cuda import preload_libraries, probe_gpu

        preload = preload_libraries()
        facts["onnxruntime"] = {
            "version": ort.__version__,
            "providers": ort.get_available_providers(),
            "preload": preload,
            "cuda_probe": probe_gpu(0) or "ok",
        }
    except Exception as e:
        facts["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import protos.cnnstack.classifier.v1.classifier_pb2  # noqa: F401  (protobuf runtime >= gencode)

        facts["protos"] = "ok"
    except Exception as e:
        facts["protos"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        from trainer.cuda import why_no_cuda

        t: dict[str, Any] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "why_no_cuda": why_no_cuda(),
        }
        t["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if t["why_no_cuda"] is None:
            t["device"] = torch.cuda.get_device_name(0)
            t["bf16"] = torch.cuda.is_bf16_supported()
        facts["torch"] = t
    except Exception as e:
        facts["torch"] = {"error": f"{type(e).__name__}: {e}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
    return facts


def ceiling(model: Path, device: str, batches: list[int], seconds: float) -> dict[str, Any]:
    """images/s of the served model in this process at each batch size, with the server's sessions."""
    import numpy as np

    from server.runtime.cuda import CPU, CUDA, preload_libraries
    from server.runtime.sessions import create_session
    from server.runtime.share import usable_cpus

    provider = CUDA if device == "cuda" else CPU
    if provider == CUDA:
        preload_libraries()
    session = create_session(
        model, provider, 1 if provider == CUDA else usable_cpus(), 0 if provider == CUDA else None
    )
    inp = session.get_inputs()[0]
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"provider": provider, "model": str(model), "batches": {}}
    for b in batches:
        x = rng.random((b, *inp.shape[1:]), dtype=np.float32)  # (B, C, H, W)
        for _ in range(3):
            session.run(None, {inp.name: x})
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.run(None, {inp.name: x})
            runs += 1
        elapsed = time.perf_counter() - t0
        result["batches"][str(b)] = {"images_per_s": runs * b / elapsed, "ms_per_batch": 1e3 * elapsed / runs}
    return result


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(out: Path) -> dict[str, dict[str, str]]:
    steps: dict[str, dict[str, str]] = {}
    if (out / "steps.tsv").is_file():
        for line in (out / "steps.tsv").read_text().splitlines():
            name, rc, seconds, *note = line.split("\t")
            steps[name] = {"rc": rc, "seconds": seconds, "note": note[0] if note else ""}
    return steps


CLEAR = re.compile(r"error|cannot start|bad input|FAILED check|Traceback|[A-Z]\w+Error:", re.I)


def _log_reason(out: Path, name: str) -> str:
    """The line of a step's log that says what went wrong: the last error-like line, else the last line."""
    try:
        lines = [ln.strip() for ln in (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    clear = [ln for ln in lines if CLEAR.search(ln) and not ln.startswith("Traceback")]
    return (clear or lines or [""])[-1]


def _not_run(steps: dict[str, dict[str, str]], name: str, out: Path | None = None) -> str:
    s = steps.get(name)
    if s is None:
        return "not run"
    why = {"124": "timed out", "137": "killed (time)"}.get(s["rc"], f"exit {s['rc']}")
    reason = s["note"] or (_short(_log_reason(out, name), 240) if out is not None else "")
    return f"{why} after {s['seconds']} s{': ' + reason if reason else ''} (log: logs/{name}.log)"


def _short(text: str, n: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _pytest_row(out: Path, steps: dict) -> tuple[str, str]:
    try:
        root = ET.parse(out / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return _not_run(steps, "pytest", out), "FAIL"
    suite = root if root.tag == "testsuite" else root[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [c for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    first = ""
    if bad:
        node = bad[0].find("failure")
        node = node if node is not None else bad[0].find("error")
        first = f"; first: {bad[0].get('name')}: {_short((node.get('message') if node is not None else '') or '', 260)}"
    failed = n["failures"] + n["errors"]
    result = f"{n['tests'] - failed - n['skipped']} passed, {failed} failed, {n['skipped']} skipped{first}"
    return result, "PASS" if n["tests"] and not failed and not n["skipped"] else "FAIL"


def _history(run: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _train_row(out: Path, steps: dict) -> tuple[str, str]:
    s = _json(out / "train" / "summary.json")
    if not s:
        return _not_run(steps, "train", out), "FAIL"
    tta = f" (flip TTA {100 * s['test_acc_tta']:.2f}%)" if s.get("test_acc_tta") else ""
    result = (
        f"{s['epochs']} epochs, {s['epochs'] / s['train_time_s']:.2f} epochs/s, {s['precision']}, "
        f"test acc {100 * s['test_acc']:.2f}%{tta}, training {s['train_time_s']:.1f} s, wall {s['wall_time_s']:.1f} s"
    )
    ok = s["test_acc"] >= GOAL_ACC and s["wall_time_s"] <= GOAL_TRAIN_S
    return result, "PASS" if ok else "FAIL"


def _compile_row(out: Path, steps: dict) -> tuple[str, str]:
    s = _json(out / "train-compile" / "summary.json")
    if not s:
        return _not_run(steps, "compile", out), "-"
    compiled, eager = _history(out / "train-compile"), _history(out / "train")
    epoch = min(len(compiled), len(eager))
    if not epoch:
        return f"compile {s.get('compile_s') or 0:.1f} s", "-"
    c, e = compiled[epoch - 1]["images_per_s"], eager[epoch - 1]["images_per_s"]
    return (
        f"compile {s['compile_s']:.1f} s; epoch {epoch}: {c:,.0f} img/s compiled vs {e:,.0f} eager ({c / e:.2f}x)",
        "-",
    )


def _export_row(out: Path, steps: dict) -> tuple[str, str]:
    doc = _json(out / "repo" / "export_summary.json")
    if not doc or not doc.get("rows"):
        return _not_run(steps, "export", out), "FAIL"
    r = doc["rows"][0]
    diff = f"{r['parity_max_abs_diff']:.2e}" if r.get("parity_max_abs_diff") is not None else "-"
    agree = f"{100 * r['top1_agreement']:.2f}%" if r.get("top1_agreement") is not None else "-"
    secs = steps.get("export", {}).get("seconds", "?")
    return f"{r['status']}: parity max abs diff {diff}, top-1 agreement {agree}, {secs} s", "PASS" if r[
        "status"
    ] == "ok" else "FAIL"


def _serve_row(out: Path, steps: dict) -> tuple[str, str, str]:
    served = _json(out / "serve.json") or {}
    device = served.get("device")
    if not device:
        tried = [n for n in ("serve-cuda", "serve-cpu") if n in steps] or ["serve-cuda"]
        return "; ".join(f"{n}: {_not_run(steps, n, out)}" for n in tried), "FAIL", ""
    log = (out / "logs" / f"serve-{device}.log").read_text(errors="replace") if device else ""
    placement = next(
        (ln.split(": ", 2)[-1] for ln in log.splitlines() if " nodes on " in ln or " node on " in ln), ""
    )
    models = served.get("listening", {}).get("models", [])
    loaded = f"{', '.join(m['name'] for m in models) or 'NO model loaded'} on {served.get('listening', {}).get('provider')}"
    if device == "cuda":
        ok = bool(models) and "not on CUDA" not in log
        return (
            f"--device cuda: {loaded}; {_short(placement, 160) or 'no placement line'}",
            "PASS" if ok else "FAIL",
            device,
        )
    if served.get("asked") == "cpu":
        return f"--device cpu (asked for): {loaded}", "-", device
    return (
        f"CUDA not usable here ({_short(served.get('cuda_reason', ''), 200)}); measured on CPU: {loaded}",
        "FAIL",
        device,
    )


def _loadtest_row(out: Path, images: int, device: str, steps: dict) -> tuple[str, str]:
    try:
        with (out / f"loadtest-x{images}.csv").open() as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return _not_run(steps, f"loadtest-x{images}", out), "FAIL"
    parts, best, errors = [], 0.0, 0
    for r in rows:
        ips = float(r["images_per_s"] or 0)
        best = max(best, ips)
        errors += 0 if r["errors"] in ("0", "") else 1
        parts.append(
            f"c={float(r['load']):.0f}: {ips:,.0f} img/s p50 {float(r['p50_ms'] or 'nan'):.2f} p99 {float(r['p99_ms'] or 'nan'):.2f} ms"
        )
    result = "; ".join(parts) + ("" if not errors else f"; errors in {errors} step(s)")
    if images != 32:
        return result, "-" if not errors else "FAIL"
    return result, "PASS" if device == "cuda" and best >= GOAL_IMAGES_S and not errors else "FAIL"


def table(out: Path) -> str:
    steps = _steps(out)
    e = _json(out / "env.json") or {}
    smi = (out / "nvidia-smi.csv").read_text().strip() if (out / "nvidia-smi.csv").is_file() else ""
    t, o = e.get("torch", {}), e.get("onnxruntime", {})
    torch_text = t.get("error") or (
        f"torch {t.get('version')}, CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}"
        + (
            f", {t['device']} (bf16 {'yes' if t.get('bf16') else 'no'})"
            if t.get("device")
            else f"; {t.get('why_no_cuda')}"
        )
    )
    ort_text = (
        o.get("error")
        or f"onnxruntime {o.get('version')}, CUDA probe: {_short(o.get('cuda_probe', '?'), 200)}"
    )
    missing = e.get("missing_modules") or []
    serve, serve_ok, device = _serve_row(out, steps)
    total = (out / "total_s").read_text().strip() if (out / "total_s").is_file() else "?"
    (train, train_ok), (export, export_ok) = _train_row(out, steps), _export_row(out, steps)
    pytest_result, pytest_ok = _pytest_row(out, steps)
    (lt1, lt1_ok), (lt32, lt32_ok) = (
        _loadtest_row(out, 1, device, steps),
        _loadtest_row(out, 32, device, steps),
    )
    rows = [
        (
            "GPU (nvidia-smi)",
            smi or _not_run(steps, "nvidia-smi"),
            "an NVIDIA GPU",
            "PASS" if smi else "FAIL",
        ),
        ("torch", _short(torch_text), "CUDA usable", "PASS" if t.get("device") else "FAIL"),
        (
            "onnxruntime",
            ort_text,
            "CUDA provider runs a conv",
            "PASS" if o.get("cuda_probe") == "ok" else "FAIL",
        ),
        (
            "python modules",
            f"missing: {', '.join(missing)}" if missing else f"all present; protos {e.get('protos', '?')}",
            "none missing",
            "PASS" if not missing and e.get("protos") == "ok" else "FAIL",
        ),
        ("CNN_REQUIRE_GPU=1 pytest -m gpu", pytest_result, "all pass, none skipped", pytest_ok),
        (
            "train resnet18 fashion-mnist",
            train,
            f">= {100 * GOAL_ACC:.0f}% in <= {GOAL_TRAIN_S:.0f} s wall",
            train_ok,
        ),
        ("export (parity gate)", export, "published", export_ok),
        ("cnn-serve", serve, "--device cuda, every conv on CUDA", serve_ok),
        ("cnn-loadtest 1 image/request", lt1, "-", lt1_ok),
        ("cnn-loadtest 32 images/request", lt32, f">= {GOAL_IMAGES_S:,.0f} img/s on CUDA", lt32_ok),
    ]
    c = _json(out / "ceiling.json")
    if c:
        per = "; ".join(
            f"b={b}: {v['images_per_s']:,.0f} img/s ({v['ms_per_batch']:.2f} ms)"
            for b, v in c["batches"].items()
        )
        rows.append(("in-process onnxruntime ceiling", f"{c['provider']}: {per}", "-", "-"))
    else:
        rows.append(("in-process onnxruntime ceiling", _not_run(steps, "ceiling", out), "-", "-"))
    compiled, compiled_ok = _compile_row(out, steps)
    rows.append(("torch.compile (CUDA)", compiled, "measured", compiled_ok))
    within = total != "?" and float(total) <= GOAL_TOTAL_S
    rows.append(("total time", f"{total} s", f"<= {GOAL_TOTAL_S:.0f} s", "PASS" if within else "FAIL"))
    lines = ["| check | result | goal | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(
        json.dumps(
            [dict(zip(("check", "result", "goal", "verdict"), r, strict=True)) for r in rows], indent=2
        )
        + "\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env").add_argument("out", type=Path)
    c = sub.add_parser("ceiling")
    c.add_argument("--model", type=Path, required=True)
    c.add_argument("--device", choices=("cuda", "cpu"), required=True)
    c.add_argument("--batches", default="1,32,256")
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--out", type=Path, required=True)
    sub.add_parser("table").add_argument("out", type=Path)
    a = p.parse_args(argv)
    if a.command == "env":
        env(a.out)
    elif a.command == "ceiling":
        result = ceiling(a.model, a.device, [int(b) for b in a.batches.split(",")], a.seconds)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    else:
        print(table(a.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

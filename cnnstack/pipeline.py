"""``cnn-pipeline`` / ``python -m cnnstack.pipeline``: the whole job on the embedded default.

    train (a LeNet-5 + the deeper fmnist_net, briefly) -> export both through the parity gate
    -> start cnn-serve -> short cnn-loadtest per model -> stop the server -> summary

Every stage runs the real CLI in a subprocess (the command is printed first, so each step can be
re-run by hand), and the server runs in its own process without torch, as in production. Everything
lands under ``--out`` (default ``artifacts/``)::

    runs/<model>/         checkpoint.pt, best.pt, metrics.jsonl, summary.json, curves.png, confusion_matrix.png
    repository/           the Triton-layout model repository (+ export_summary.json/.md)
    reports/              loadtest-<model>.json/.csv/.png
    pipeline_summary.json / pipeline_summary.md

Exit status: 0 when every stage succeeded, 1 when one failed (the message names it), 2 bad flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnstack.serverproc import ServerProcess, ServerStartError
from loadtest.config import int_list  # the same "1,16,64" parsing as cnn-loadtest --concurrency

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# (name, cnn-train flags): the LeNet-family model and a deeper one, each a preset of trainer/presets.py
# sized for a small CPU. The deeper model is fmnist_net (7 convs with residual pairs), our accurate
# Fashion-MNIST recipe, rather than a ResNet-18: on a few CPU cores even one ResNet epoch would take
# longer than the whole pipeline should. --epochs / --max-train shorten both.
DEFAULT_JOBS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lenet", ("--preset", "lenet5-relu-bn")),
    ("fmnist", ("--preset", "fmnist-fast")),
)


class StageFailed(RuntimeError):
    """A stage's command exited non-zero or produced nothing usable."""


@dataclass(frozen=True)
class PipelineConfig:
    out: Path = Path("artifacts")
    data_dir: Path | None = None
    device: str = "auto"
    epochs: int | None = None  # overrides every job's epochs (None: the presets' / DEFAULT_JOBS')
    max_train: int | None = None  # overrides every job's training subset
    concurrency: tuple[int, ...] = (1, 16, 64)
    loadtest_duration_s: float = 8.0
    loadtest_warmup_s: float = 1.0
    parity_samples: int | None = None  # cnn-export's default: the whole test set
    quiet: bool = False


# ------------------------------------------------------------------ running the CLIs


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def _module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_stage(cmd: list[str], title: str, log_file: Path) -> None:
    """Run ``cmd`` to completion, its output both on our stdout and in ``log_file``."""
    _log(f"{title}: {' '.join(cmd)}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_file, "w") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"{title} failed (exit {rc}); its output is in {log_file}")


# ------------------------------------------------------------------ stages


def _no_progress_bars(cfg: PipelineConfig) -> bool:
    return cfg.quiet or not sys.stdout.isatty()  # piped: bars would only clutter the logs


def train_commands(cfg: PipelineConfig) -> list[tuple[str, list[str]]]:
    jobs = []
    for name, flags in DEFAULT_JOBS:
        cmd = _module_cmd("trainer", *flags, "--out", str(cfg.out / "runs" / name), "--overwrite")
        cmd += ["--device", cfg.device]
        if cfg.data_dir is not None:
            cmd += ["--data-dir", str(cfg.data_dir)]
        if cfg.epochs is not None:
            cmd += ["--epochs", str(cfg.epochs)]
        if cfg.max_train is not None:
            cmd += ["--max-train", str(cfg.max_train)]  # argparse: the last one wins
        if cfg.quiet:  # piped, the trainer prints a progress line every few seconds instead of a bar
            cmd.append("--quiet")
        jobs.append((name, cmd))
    return jobs


def export_command(cfg: PipelineConfig, runs: list[Path]) -> list[str]:
    cmd = _module_cmd("exporter", *map(str, runs), "--repository", str(cfg.out / "repository"))
    if cfg.data_dir is not None:
        cmd += ["--data-dir", str(cfg.data_dir)]
    if cfg.parity_samples is not None:
        cmd += ["--parity-samples", str(cfg.parity_samples)]
    if _no_progress_bars(cfg):
        cmd.append("--no-progress")
    return cmd


def loadtest_command(cfg: PipelineConfig, name: str, port: int, metrics_port: int) -> list[str]:
    from trainer.datasets.idx import SPLIT_FILES, find_file  # imports torch: only when asked

    reports = cfg.out / "reports"
    test_images = find_file(cfg.data_dir or DATA_DIR, SPLIT_FILES["test"][0], ())
    return _module_cmd(
        "loadtest",
        "--target",
        f"127.0.0.1:{port}",
        "--model",
        name,
        "--concurrency",
        ",".join(map(str, cfg.concurrency)),
        "--duration",
        str(cfg.loadtest_duration_s),
        "--warmup",
        str(cfg.loadtest_warmup_s),
        "--window",
        str(min(2.0, cfg.loadtest_duration_s)),
        "--input",
        str(test_images) if test_images else "synthetic",
        "--metrics-url",
        f"http://127.0.0.1:{metrics_port}/metrics",
        "--out",
        str(reports / f"loadtest-{name}.json"),
        "--csv",
        str(reports / f"loadtest-{name}.csv"),
        "--plot",
        str(reports / f"loadtest-{name}.png"),
    )


# ------------------------------------------------------------------ summary


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StageFailed(f"cannot read {path}: {e}") from e


def collect_summary(cfg: PipelineConfig, names: list[str], wall_s: float) -> dict:
    export_rows = {r["model"]: r for r in _read_json(cfg.out / "repository" / "export_summary.json")["rows"]}
    models = []
    for name in names:
        train = _read_json(cfg.out / "runs" / name / "summary.json")
        row = export_rows.get(name, {})
        load = _read_json(cfg.out / "reports" / f"loadtest-{name}.json")
        steps = [
            {
                "concurrency": int(s["load"]),
                "images_per_s": s["images_per_s"],
                "p50_ms": s["latency_ms"]["p50_ms"],
                "p99_ms": s["latency_ms"]["p99_ms"],
                "errors": sum(s["errors"].values()),
            }
            for s in load["steps"]
        ]
        models.append(
            {
                "model": name,
                "arch": train["arch"],
                "params": train["params"],
                "epochs": train["epochs"],
                "train_wall_s": train["wall_time_s"],
                "test_acc": train["test_acc"],
                "version": row.get("version"),
                "parity_max_abs_diff": row.get("parity_max_abs_diff"),
                "top1_agreement": row.get("top1_agreement"),
                "onnx_test_acc": row.get("acc_fp32"),
                "loadtest": steps,
            }
        )
    return {"wall_time_s": wall_s, "out": str(cfg.out), "models": models}


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| model | arch | params | epochs | test acc (PyTorch) | test acc (ONNX) | parity max abs diff | "
        "top-1 agreement | concurrency | images/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["models"]:
        for i, s in enumerate(m["loadtest"]):
            head = (
                [
                    m["model"],
                    m["arch"],
                    f"{m['params']:,}",
                    str(m["epochs"]),
                    f"{100 * m['test_acc']:.2f}%",
                    "-" if m["onnx_test_acc"] is None else f"{100 * m['onnx_test_acc']:.2f}%",
                    f"{m['parity_max_abs_diff']:.2e}",
                    f"{100 * m['top1_agreement']:.2f}%",
                ]
                if i == 0
                else [""] * 8
            )
            tail = [
                str(s["concurrency"]),
                f"{s['images_per_s']:.0f}",
                f"{s['p50_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                str(s["errors"]),
            ]
            lines.append("| " + " | ".join(head + tail) + " |")
    return "\n".join(lines) + f"\n\nwall time {summary['wall_time_s']:.0f} s; outputs in {summary['out']}/\n"


# ------------------------------------------------------------------ main


def train_all(cfg: PipelineConfig, logs: Path) -> list[str]:
    """Stage 1: every model of DEFAULT_JOBS trained into OUT/runs/<name>; their names."""
    names = []
    for i, (name, cmd) in enumerate(train_commands(cfg), 1):
        run_stage(cmd, f"1/4 train {name} ({i}/{len(DEFAULT_JOBS)})", logs / f"train-{name}.log")
        names.append(name)
    return names


def export_all(cfg: PipelineConfig, names: list[str], logs: Path) -> None:
    """Stage 2: every run through the parity gate into OUT/repository."""
    run_stage(export_command(cfg, [cfg.out / "runs" / n for n in names]), "2/4 export", logs / "export.log")


def serve_and_load_test(cfg: PipelineConfig, names: list[str], logs: Path) -> None:
    """Stages 3 and 4: cnn-serve on the repository, a load test per model, then SIGTERM."""
    server = ServerProcess(
        "--metrics-port",
        "0",
        "--device",
        cfg.device,
        "--poll-interval-s",
        "0",
        repository=cfg.out / "repository",
        log_file=logs / "server.log",
    )
    _log(f"start server: {' '.join(server.cmd)}")
    try:
        listening = server.start()
    except ServerStartError as e:
        raise StageFailed(f"the server did not start: {e}") from None
    try:
        _log(
            f"server on 127.0.0.1:{listening['port']} (metrics :{listening['metrics_port']}), "
            f"provider {listening['provider']}, models {[m['name'] for m in listening['models']]}"
        )
        for name in names:
            cmd = loadtest_command(cfg, name, listening["port"], listening["metrics_port"])
            run_stage(cmd, f"3/4 load test {name}", logs / f"loadtest-{name}.log")
    finally:
        rc = server.stop()
    _log(f"4/4 server stopped (exit {rc}): {json.dumps(server.stopped)}")
    if rc != 0:
        raise StageFailed(f"the server exited with {rc} on SIGTERM; its log is {server.log_file}")


def write_pipeline_summary(cfg: PipelineConfig, names: list[str], summary: dict[str, Any]) -> None:
    """OUT/pipeline_summary.json and .md, and the table with the plots' paths on stdout."""
    (cfg.out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = summary_markdown(summary)
    (cfg.out / "pipeline_summary.md").write_text(markdown)
    plots = [str(p) for n in names for p in sorted((cfg.out / "runs" / n).glob("*.png"))]
    plots += [str(cfg.out / "reports" / f"loadtest-{n}.png") for n in names]
    print("\n" + markdown + "plots:\n  " + "\n  ".join(plots), flush=True)


def run(cfg: PipelineConfig) -> int:
    t0 = time.monotonic()
    logs = cfg.out / "logs"
    names = train_all(cfg, logs)
    export_all(cfg, names, logs)
    serve_and_load_test(cfg, names, logs)
    write_pipeline_summary(cfg, names, collect_summary(cfg, names, time.monotonic() - t0))
    return 0


def parse_args(argv: Sequence[str] | None) -> PipelineConfig:
    p = argparse.ArgumentParser(
        prog="cnn-pipeline",
        description="Train a LeNet-5 (ReLU, BatchNorm) and the deeper fmnist_net on Fashion-MNIST, export both "
        "through the parity gate, serve them and load-test the server; everything lands under --out.",
    )
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder (default: artifacts)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help=f"Fashion-MNIST IDX files (default: {DATA_DIR})"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training and serving")
    p.add_argument("--epochs", type=int, default=None, help="override every model's epochs")
    p.add_argument("--max-train", type=int, default=None, help="train every model on this many images")
    p.add_argument(
        "--concurrency", type=int_list, default=(1, 16, 64), help="load-test steps (default 1,16,64)"
    )
    p.add_argument("--loadtest-duration", type=float, default=8.0, help="max seconds per load-test step")
    p.add_argument("--parity-samples", type=int, default=None, help="cnn-export --parity-samples")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines from the trainer")
    a = p.parse_args(argv)
    for flag, value in (
        ("--epochs", a.epochs),
        ("--max-train", a.max_train),
        ("--parity-samples", a.parity_samples),
    ):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if not a.loadtest_duration > 0:
        p.error("--loadtest-duration must be > 0")
    return PipelineConfig(
        out=a.out,
        data_dir=a.data_dir,
        device=a.device,
        epochs=a.epochs,
        max_train=a.max_train,
        concurrency=a.concurrency,
        loadtest_duration_s=a.loadtest_duration,
        parity_samples=a.parity_samples,
        quiet=a.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # the children's lines appear as they happen
    t0 = time.monotonic()
    try:
        rc = run(cfg)
    except StageFailed as e:
        _log(f"FAILED: {e}")
        return 1
    _log(f"done in {time.monotonic() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())

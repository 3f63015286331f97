"""The exporter's one config: a frozen dataclass that checks itself, built in ``main()`` from the
command line with ``cnnstack.cli.parse_config`` (``cnn-export ...`` or ``cnn-export verify ...``)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnstack import cli

DEFAULT_OPSET = 18
MIN_PARITY_BATCH = 64


@dataclass(frozen=True)
class ExportConfig:
    command: str  # "export" | "verify"
    sources: tuple[Path, ...]  # checkpoints / run dirs (export) or one REPO/NAME/VERSION (verify)
    repository: Path | None = None
    checkpoint: Path | None = None  # verify: the checkpoint the published model came from
    name: str | None = None
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    int8: bool = False
    force_precision: bool = False  # publish fp16/int8 even when the accuracy gate fails
    parity_samples: int = 0  # images compared at the large batch; 0 = the whole test set
    parity_batch: int = 256
    batch1_samples: int = 128  # images compared one at a time
    atol: float = 1e-4  # gate on max |logits_torch - logits_ort|
    max_accuracy_drop: float = 1.0  # percentage points, fp16/int8 vs fp32
    calibration_samples: int = 256
    max_batch_size: int = 64
    max_queue_delay_us: int = 500
    data_dir: Path | None = None
    report_dir: Path | None = None  # failed-export reports; default REPO/.failed
    bench_seconds: float = 1.0
    seed: int = 0
    threads: int = 0  # torch and onnxruntime intra-op threads; 0 = their defaults
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))  # argparse gives a list
        cli.require(self.problems())

    def problems(self) -> list[str]:
        """One message per setting that cannot work, naming the flag to change."""
        problems = []
        if self.parity_batch < MIN_PARITY_BATCH:
            problems.append(f"--parity-batch must be >= {MIN_PARITY_BATCH}, got {self.parity_batch}")
        if self.parity_samples < 0 or self.batch1_samples < 1:
            problems.append("--parity-samples must be >= 0 and --batch1-samples >= 1")
        if self.threads < 0:
            problems.append("--threads must be >= 0")
        if self.atol <= 0:
            problems.append("--atol must be > 0")
        if self.max_accuracy_drop < 0:
            problems.append("--max-accuracy-drop must be >= 0 (percentage points)")
        if self.max_batch_size < 1:
            problems.append("--max-batch-size must be >= 1")
        if not 7 <= self.opset <= 23:
            problems.append(f"--opset must be within 7..23, got {self.opset}")
        return problems


# The flags' defaults are the dataclass's: one place each.
_DEFAULT = {f.name: f.default for f in dataclasses.fields(ExportConfig)}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parity-samples",
        type=int,
        default=_DEFAULT["parity_samples"],
        help="test images compared at the large batch (0 = whole test set)",
    )
    p.add_argument(
        "--parity-batch",
        type=int,
        default=_DEFAULT["parity_batch"],
        help=f"large parity batch (>= {MIN_PARITY_BATCH})",
    )
    p.add_argument(
        "--batch1-samples",
        type=int,
        default=_DEFAULT["batch1_samples"],
        help="test images compared at batch 1",
    )
    p.add_argument(
        "--atol", type=float, default=_DEFAULT["atol"], help="parity gate on max abs diff of logits"
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=_DEFAULT["max_accuracy_drop"],
        help="fp16/int8 gate, percentage points",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root (default: trainer's search path)"
    )
    p.add_argument("--seed", type=int, default=_DEFAULT["seed"])
    p.add_argument(
        "--threads",
        type=int,
        default=_DEFAULT["threads"],
        help="torch/onnxruntime intra-op threads (0 = default)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (there is none when stderr is not a terminal)",
    )


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-export",
        description="Export checkpoints to ONNX behind a parity gate into a Triton model repository. "
        "`cnn-export verify REPO/NAME/VERSION --checkpoint CKPT` re-checks a published model.",
    )
    p.set_defaults(command="export")
    p.add_argument("sources", nargs="+", type=Path, metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--repository", "-r", type=Path, required=True, metavar="REPO")
    p.add_argument("--name", default=None, help="model name (default: run dir name or ARCH-DATASET)")
    p.add_argument("--opset", type=int, default=_DEFAULT["opset"])
    p.add_argument("--fp16", action="store_true", help="also publish NAME-fp16 (fp16 weights, fp32 I/O)")
    p.add_argument("--int8", action="store_true", help="also publish NAME-int8 (static QDQ, per-channel)")
    p.add_argument(
        "--force-precision",
        action="store_true",
        help="publish fp16/int8 even if accuracy drops more than --max-accuracy-drop (or is unknown)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=_DEFAULT["calibration_samples"],
        help="training images for INT8 calibration",
    )
    p.add_argument(
        "--max-batch-size", type=int, default=_DEFAULT["max_batch_size"], help="config.pbtxt max_batch_size"
    )
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=_DEFAULT["max_queue_delay_us"],
        help="dynamic_batching max queue delay",
    )
    p.add_argument("--report-dir", type=Path, default=None, help="where failed exports' reports go")
    p.add_argument(
        "--bench-seconds",
        type=float,
        default=_DEFAULT["bench_seconds"],
        help="CPU images/s measurement time per model",
    )
    _add_common(p)
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnn-export verify", description="Re-run the export checks on a published model version."
    )
    p.set_defaults(command="verify")
    p.add_argument("sources", nargs=1, type=Path, metavar="REPO/NAME/VERSION")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT")
    _add_common(p)
    return p


def parse_config(argv: Sequence[str]) -> ExportConfig:
    """``cnn-export``'s arguments as an ExportConfig (``verify ...``: the verify command's)."""
    if argv and argv[0] == "verify":
        return cli.parse_config(ExportConfig, verify_parser(), argv[1:])
    return cli.parse_config(ExportConfig, export_parser(), argv)

"""bench/gpu_check.sh without a GPU: it parses, its dry run prints every command it would run, and its
table reads the files the steps leave (a made-up GPU run here) into the right verdicts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_parses_and_its_dry_run_prints_every_command(tmp_path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
    expected = [
        "nvidia-smi --query-gpu=name,driver_version",
        "-m bench.gpu_check env",
        "env CNN_REQUIRE_GPU=1 ",
        "-m trainer --preset resnet18-fmnist --device cuda",
        "-m exporter ",
        "-m server --repository ",
        "-m loadtest --target 127.0.0.1:$PORT --model resnet18 --concurrency 1,64,256 --images-per-request 1 ",
        "--images-per-request 32 ",
        "-m bench.gpu_check ceiling ",
        "--compile --epochs 2",
        "-m bench.gpu_check table",
    ]
    for fragment in expected:
        assert any(fragment in c for c in commands), (fragment, commands)
    pytest_cmd = next(c for c in commands if "CNN_REQUIRE_GPU=1" in c)
    assert "-m gpu" in pytest_cmd and "tests/trainer/test_gpu_train.py" in pytest_cmd
    assert "--device cuda" in next(c for c in commands if "-m server" in c)
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def gpu_run(out: Path, acc: float = 0.953, best_ips: float = 25_000.0, conv_on_cpu: bool = False) -> Path:
    """The files a GPU run of the script leaves, with made-up numbers."""
    (out / "logs").mkdir(parents=True)
    (out / "train").mkdir()
    (out / "train-compile").mkdir()
    (out / "repo").mkdir()
    (out / "nvidia-smi.csv").write_text("NVIDIA H200, 580.00, 143771 MiB\n")
    env = {
        "missing_modules": [],
        "protos": "ok",
        "onnxruntime": {"version": "1.31.1", "cuda_probe": "ok"},
        "torch": {
            "version": "2.13.0+cu130",
            "cuda": "13.0",
            "cudnn": 91000,
            "device": "NVIDIA H200",
            "bf16": True,
        },
    }
    (out / "env.json").write_text(json.dumps(env))
    (out / "pytest.xml").write_text(
        '<testsuites><testsuite tests="7" failures="0" errors="0" skipped="0"/></testsuites>'
    )
    summary = {
        "epochs": 15,
        "train_time_s": 40.0,
        "wall_time_s": 52.0,
        "precision": "bf16",
        "test_acc": acc,
        "test_acc_tta": acc + 0.002,
        "compile_s": 31.5,
    }
    (out / "train" / "summary.json").write_text(json.dumps(summary))
    (out / "train-compile" / "summary.json").write_text(json.dumps(summary))
    for run, ips in (("train", 20_000.0), ("train-compile", 26_000.0)):
        (out / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"images_per_s": ips}) + "\n" for _ in range(2))
        )
    (out / "repo" / "export_summary.json").write_text(
        json.dumps({"rows": [{"status": "ok", "parity_max_abs_diff": 3e-6, "top1_agreement": 1.0}]})
    )
    listening = {"event": "listening", "provider": "CUDAExecutionProvider", "models": [{"name": "resnet18"}]}
    (out / "serve.json").write_text(json.dumps({"device": "cuda", "asked": "cuda", "listening": listening}))
    placement = (
        "21 convolution(s) not on CUDAExecutionProvider"
        if conv_on_cpu
        else "62 nodes on CUDAExecutionProvider"
    )
    (out / "logs" / "serve-cuda.log").write_text(
        f"2026 INFO server.runtime.version: /r/model.onnx: {placement}\n"
    )
    head = "mode,load,images_per_s,p50_ms,p99_ms,errors\n"
    (out / "loadtest-x1.csv").write_text(
        head + "closed,1,900,1.1,1.5,0\nclosed,64,9000,7,9,0\nclosed,256,9500,27,30,0\n"
    )
    (out / "loadtest-x32.csv").write_text(
        head + f"closed,1,5000,6,7,0\nclosed,64,{best_ips},80,90,0\nclosed,256,{best_ips - 1},300,320,0\n"
    )
    ceiling = {
        "provider": "CUDAExecutionProvider",
        "batches": {"1": {"images_per_s": 2000, "ms_per_batch": 0.5}},
    }
    (out / "ceiling.json").write_text(json.dumps(ceiling))
    (out / "steps.tsv").write_text("export\t0\t21\t\n")
    (out / "total_s").write_text("410\n")
    return out


def verdicts(text: str) -> dict[str, str]:
    rows = [line.strip("|").split(" | ") for line in text.splitlines()[2:]]
    return {r[0].strip(): r[-1].strip() for r in rows}


def test_the_table_of_a_good_gpu_run_passes_every_goal(tmp_path) -> None:
    text = gpu_check.table(gpu_run(tmp_path / "o"))
    v = verdicts(text)
    assert {k: v[k] for k in v if v[k] != "-"} == {k: "PASS" for k in v if v[k] != "-"} and len(v) == 13
    assert "15 epochs, 0.38 epochs/s, bf16, test acc 95.30%" in text
    assert "compile 31.5 s; epoch 2: 26,000 img/s compiled vs 20,000 eager (1.30x)" in text
    assert "c=64: 25,000 img/s p50 80.00 p99 90.00 ms" in text
    assert (tmp_path / "o" / "gpu_check.md").read_text() == text


def test_the_table_fails_missed_goals_and_a_conv_on_the_cpu(tmp_path) -> None:
    v = verdicts(gpu_check.table(gpu_run(tmp_path / "o", acc=0.94, best_ips=19_000, conv_on_cpu=True)))
    assert v["train resnet18 fashion-mnist"] == "FAIL"
    assert v["cnn-loadtest 32 images/request"] == "FAIL"
    assert v["cnn-serve"] == "FAIL"

"""Two-process data-parallel training on CPU (gloo) through torchrun, as a user would launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch


@pytest.mark.slow
def test_torchrun_two_processes_train_and_only_rank0_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "trainer",
        "--dataset",
        "synthetic",
        "--arch",
        "lenet5",
        "--activation",
        "relu",
        "--pool",
        "max",
        "--batchnorm",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--max-train",
        "1024",
        "--precision",
        "fp32",
        "--quiet",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 alone logs and writes: one "done" line, one record per epoch (two writers would duplicate).
    assert proc.stdout.count("done: test_acc") == 1
    assert "x2" in proc.stdout  # the header line reports the world size
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["test_acc"] > 0.8  # the ranks trained one model together
    # Each rank took half of every epoch: 1024 images / 2 ranks / 32 per rank = 16 steps of 64 globally.
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and ckpt["scheduler"]["last_epoch"] == 2 * 16
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no half-written temp files from a second writer


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
@pytest.mark.parametrize("how", ["returns", "raises"])
def test_torchrun_ranks_leave_no_gloo_thread_behind(how: str, tmp_path: Path) -> None:
    """Returned or raised, ``trainer.train.main`` has joined gloo's threads before its caller goes on.

    A gloo thread still alive while the interpreter exits may free a Python-made tensor then, and
    CPython aborts it ("terminate called without an active exception"): torchrun exits 1 after a
    run that trained. That is a race; the threads outliving ``main`` are what makes it possible.
    """
    probe = Path(__file__).with_name("torchrun_teardown.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    reports_dir = tmp_path / "reports"
    reports_dir.mkdir()
    cmd += [str(probe), str(tmp_path / "run"), str(reports_dir), how]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted(reports_dir.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1], proc.stdout[-3000:]
    for r in reports:
        assert r["raised"] == (how == "raises")
        assert r["started"], "init_process_group started no thread: the probe cannot see gloo's"
        assert r["alive"] == [], f"rank {r['rank']}: threads of the process group outlived main()"

"""cnn-pipeline: the README's main command, train -> export -> serve -> load test -> summary.

The end-to-end test runs the real pipeline on real Fashion-MNIST (skipped when not installed), shortened
to one epoch on a training subset, and checks what a newcomer relies on: both models trained, passed
the parity gate and were published, the server answered every load-test request and was stopped, and
the summary and plots are where the pipeline says they are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnnstack import pipeline
from cnnstack.pipeline import PipelineConfig, parse_args


def test_defaults_train_a_lenet_and_a_deeper_model_into_out(tmp_path: Path) -> None:
    cfg = PipelineConfig(out=tmp_path / "a")
    jobs = dict(pipeline.train_commands(cfg))
    assert list(jobs) == ["lenet", "fmnist"]
    assert "lenet5-relu-bn" in jobs["lenet"] and "fmnist-fast" in jobs["fmnist"]
    for name, cmd in jobs.items():
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / "a" / "runs" / name)
    export = pipeline.export_command(cfg, [tmp_path / "a" / "runs" / n for n in jobs])
    assert export[export.index("--repository") + 1] == str(tmp_path / "a" / "repository")


def test_overrides_reach_every_training_command_and_win(tmp_path: Path) -> None:
    cfg = parse_args(["--out", str(tmp_path), "--epochs", "2", "--max-train", "500", "--data-dir", "/d"])
    from trainer.__main__ import build_parser

    for _, cmd in pipeline.train_commands(cfg):
        args = build_parser().parse_args(cmd[3:])  # the real cnn-train parser: last flag wins
        assert (args.epochs, args.max_train, args.data_dir) == (2, 500, "/d")


@pytest.mark.parametrize(
    "argv", [["--epochs", "0"], ["--max-train", "-1"], ["--concurrency", "1,0"], ["--loadtest-duration", "0"]]
)
def test_bad_flags_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2


def test_a_failing_stage_names_itself_and_its_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A training dataset that is not there: the first stage fails, nothing after it runs.
    rc = pipeline.main(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "nothing")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: 1/4 train lenet (1/2) failed (exit 2)" in out
    assert (tmp_path / "out" / "logs" / "train-lenet.log").is_file()
    assert not (tmp_path / "out" / "repository").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_end_to_end_on_real_fashion_mnist(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    cmd = [
        sys.executable,
        "-m",
        "cnnstack.pipeline",
        "--out",
        str(out),
        "--data-dir",
        str(fashion_mnist_dir),
        "--epochs",
        "1",
        "--max-train",
        "15000",
        "--parity-samples",
        "512",
        "--concurrency",
        "1,8",
        "--loadtest-duration",
        "2",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    summary = json.loads((out / "pipeline_summary.json").read_text())
    models = {m["model"]: m for m in summary["models"]}
    assert set(models) == {"lenet", "fmnist"}
    assert models["lenet"]["test_acc"] > 0.6  # one epoch on 15,000 real images: far above chance (0.1)
    for m in models.values():
        assert (
            m["version"] >= 1
            and (out / "repository" / m["model"] / str(m["version"]) / "model.onnx").is_file()
        )
        assert m["parity_max_abs_diff"] <= 1e-4 and m["top1_agreement"] == 1.0
        assert [s["concurrency"] for s in m["loadtest"]] == [1, 8]
        assert all(s["errors"] == 0 and s["images_per_s"] > 0 for s in m["loadtest"])
    for png in ("runs/lenet/curves.png", "runs/fmnist/confusion_matrix.png", "reports/loadtest-lenet.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "| lenet | lenet5 |" in (out / "pipeline_summary.md").read_text()
    assert "4/4 server stopped (exit 0)" in proc.stdout

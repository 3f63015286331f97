"""cnn-export end to end on checkpoints written by the tests: the served graph's interface and
metadata, the parity gate (and that it can fail), versions, batch export, summary, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from cnnstack.contract import (
    CONFIG_FILE,
    FAILED_DIR,
    LABELS_FILE,
    MODEL_FILE,
    REPORT_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    ModelMeta,
)
from exporter import onnx_export
from tests.exporter.helpers import (
    FAST,
    FAST_CHECKS,
    HEAVY_ARCHS,
    make_model,
    published_tree,
    run_export,
    synthetic_meta,
    tree,
)
from trainer.checkpoint import build_model, load_checkpoint
from trainer.models import list_models

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch

CPU = ["CPUExecutionProvider"]
REQUIRED_PROPS = {
    "arch",
    "dataset",
    "input_shape",
    "mean",
    "std",
    "class_names",
    "test_accuracy",
    "source_sha256",
    "exporter_version",
    "torch_version",
    "onnx_version",
    "precision",
}


def _session(path: Path) -> ort.InferenceSession:
    sess = ort.InferenceSession(str(path), providers=CPU)
    assert sess.get_providers() == CPU
    return sess


def _archs() -> list:
    return [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY_ARCHS else a for a in list_models()]


@pytest.mark.parametrize("arch", _archs())
def test_every_registry_arch_exports_and_passes_the_gate(arch: str, make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint(arch)
    repo = tmp_path / "repo"
    assert run_export(ckpt, "--repository", repo, "--no-progress", *FAST) == 0
    name = f"{arch}-synthetic"
    report = json.loads((repo / name / "1" / REPORT_FILE).read_text())
    assert report["passed"] is True and report["model"]["arch"] == arch
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["onnx_checker", "parity", "ort_optimizations"]
    assert all(c["passed"] for c in checks.values())
    parity = checks["parity"]["numbers"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0
    assert set(parity["by_batch"]) == {"batch_1", "batch_64"}

    # The published graph, independently of the exporter's own checks: [0, 1] pixels in,
    # normalization folded in, logits == PyTorch's on normalized input, any batch size.
    meta = ModelMeta.from_dict(load_checkpoint(ckpt)["meta"])
    model = build_model(load_checkpoint(ckpt))
    x = np.random.default_rng(1).random((3, *meta.input_shape), dtype=np.float32)
    logits, probs = _session(repo / name / "1" / MODEL_FILE).run(None, {"input": x})
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = model((torch.from_numpy(x) - mean) / std).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_published_model_interface_metadata_and_files(make_checkpoint, tmp_path: Path) -> None:
    ckpt = make_checkpoint("lenet5")
    repo = tmp_path / "repo"
    assert (
        run_export(
            ckpt, "-r", repo, "--name", "LeNet Fashion", "--max-batch-size", "32", "--no-progress", *FAST
        )
        == 0
    )
    vdir = repo / "lenet-fashion" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == [REPORT_FILE, MODEL_FILE]

    proto = onnx.load(vdir / MODEL_FILE)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)  # one file
    props = onnx_export.read_metadata(proto)
    assert set(props) >= REQUIRED_PROPS
    meta = ModelMeta.from_onnx_props(props)
    assert meta == ModelMeta.from_dict(load_checkpoint(ckpt)["meta"])
    assert props["precision"] == "fp32"
    assert props["source_sha256"] == __import__("hashlib").sha256(ckpt.read_bytes()).hexdigest()
    assert (
        0.0 <= float(props["test_accuracy"]) <= 1.0 and "synthetic test set" in props["test_accuracy_source"]
    )

    sess = _session(vdir / MODEL_FILE)
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [1, 28, 28])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert [(o.name, o.type) for o in sess.get_outputs()] == [
        ("logits", "tensor(float)"),
        ("probabilities", "tensor(float)"),
    ]

    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(
        (repo / "lenet-fashion" / CONFIG_FILE).read_text(), model_config_pb2.ModelConfig()
    )
    assert cfg.name == "lenet-fashion" and cfg.max_batch_size == 32 and list(cfg.input[0].dims) == [1, 28, 28]

    summary = json.loads((repo / SUMMARY_JSON).read_text())
    (row,) = summary["rows"]
    assert row["model"] == "lenet-fashion" and row["version"] == 1 and row["status"] == "ok"
    assert row["params"] == 61706 and row["onnx_bytes"] == (vdir / MODEL_FILE).stat().st_size
    assert "| lenet-fashion | 1 | 61,706 |" in (repo / SUMMARY_MD).read_text()


def test_reexport_gets_next_version_and_run_dir_names_the_model(make_checkpoint, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "My_Run.7"
    run_dir.mkdir(parents=True)
    make_checkpoint("lenet5").rename(run_dir / "best.pt")
    repo = tmp_path / "repo"
    for _ in range(2):
        assert run_export(run_dir, "-r", repo, "--no-progress", *FAST) == 0
    assert sorted(p.name for p in (repo / "my_run-7").iterdir()) == ["1", "2", CONFIG_FILE, LABELS_FILE]
    report = json.loads((repo / "my_run-7" / "2" / REPORT_FILE).read_text())
    assert report["version"] == 2 and report["source"]["path"].endswith("best.pt")
    # With the last epoch there too, the run dir means the last epoch: best.pt was picked on the test set.
    make_checkpoint("lenet5", name="last.pt").rename(run_dir / "checkpoint.pt")
    assert run_export(run_dir, "-r", repo, "--no-progress", *FAST) == 0
    report = json.loads((repo / "my_run-7" / "3" / REPORT_FILE).read_text())
    assert report["source"]["path"].endswith("checkpoint.pt")


def _perturb_one_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make export_onnx return a graph whose largest initializer has one entry changed by 0.5."""
    real = onnx_export.export_onnx

    def perturbed(wrapper, meta, opset):
        proto, exporter, note = real(wrapper, meta, opset)
        init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        w = onnx.numpy_helper.to_array(init).copy()
        w.flat[0] += 0.5
        init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
        return proto, exporter, note

    monkeypatch.setattr(onnx_export, "export_onnx", perturbed)


def test_gate_fails_on_one_perturbed_weight_and_nothing_is_published(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ckpt = make_checkpoint("lenet5")
    repo = tmp_path / "repo"
    assert run_export(ckpt, "-r", repo, "--no-progress", *FAST) == 0
    before = published_tree(repo)
    capsys.readouterr()

    _perturb_one_weight(monkeypatch)
    assert run_export(ckpt, "-r", repo, "--no-progress", *FAST) == 1
    captured = capsys.readouterr()
    assert "FAILED check 'parity'" in captured.err and "nothing published" in captured.err
    assert "failed: parity" in captured.out  # the printed summary table
    assert published_tree(repo) == before  # summary included: nothing was exported
    assert not [p for p in repo.iterdir() if p.name.startswith(".tmp-")]
    (failed,) = (repo / FAILED_DIR).glob("*/" + REPORT_FILE)
    report = json.loads(failed.read_text())
    assert report["passed"] is False
    parity = next(c for c in report["checks"] if c["name"] == "parity")
    assert parity["passed"] is False and parity["numbers"]["max_abs_diff"] > 1e-4


def test_optimization_check_gates_too(
    make_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """If fused (ORT_ENABLE_ALL) and plain graphs disagree, the export fails on that check."""
    from exporter import checks

    real_session = checks.session

    def skewed(model_bytes: bytes, optimized: bool = True, threads: int = 0):
        sess = real_session(model_bytes, optimized, threads)
        if optimized:
            return sess
        run = sess.run

        class Skewed:  # the unoptimized run answers with shifted logits
            def run(self, names, feeds):
                return [o + 1e-3 for o in run(names, feeds)]

        return Skewed()

    monkeypatch.setattr(checks, "session", skewed)
    repo = tmp_path / "repo"
    assert run_export(make_checkpoint("lenet5"), "-r", repo, "--no-progress", *FAST) == 1
    assert "FAILED check 'ort_optimizations'" in capsys.readouterr().err
    assert published_tree(repo) == {}


def test_dynamo_failure_falls_back_to_torchscript(make_checkpoint, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    repo = tmp_path / "repo"
    assert run_export(make_checkpoint("lenet5"), "-r", repo, "--no-progress", *FAST) == 0
    report = json.loads((repo / "lenet5-synthetic" / "1" / REPORT_FILE).read_text())
    assert report["export"]["torch_exporter"] == "torchscript"
    assert "simulated dynamo failure" in report["export"]["note"]
    props = onnx_export.read_metadata(onnx.load(repo / "lenet5-synthetic" / "1" / MODEL_FILE))
    assert props["torch_exporter"] == "torchscript"


def test_batch_export_with_one_corrupt_checkpoint(make_checkpoint, tmp_path: Path, capsys) -> None:
    good1 = make_checkpoint("lenet5", name="a.pt")
    good2 = make_checkpoint("lenet5", name="b.pt", seed=1)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good1.read_bytes()[:3000])  # truncated zip
    repo = tmp_path / "repo"
    code = run_export(good1, corrupt, good2, "-r", repo, "--name", "lenet", "--no-progress", *FAST)
    assert code == 1
    captured = capsys.readouterr()
    assert "corrupt.pt" in captured.err and "truncated" in captured.err
    assert sorted(p.name for p in (repo / "lenet").iterdir()) == ["1", "2", CONFIG_FILE, LABELS_FILE]
    sources = [
        json.loads((repo / "lenet" / v / REPORT_FILE).read_text())["source"]["path"] for v in ("1", "2")
    ]
    assert [Path(s).name for s in sources] == ["a.pt", "b.pt"]
    summary = json.loads((repo / SUMMARY_JSON).read_text())
    assert (summary["exported"], summary["failed"]) == (2, 1)
    assert [r["status"].split(":")[0] for r in summary["rows"]] == ["ok", "bad input", "ok"]
    assert "corrupt.pt" in captured.out  # the printed table names the failing source's row
    assert "bad input" in (repo / SUMMARY_MD).read_text()


def test_verify_passes_on_the_source_and_fails_on_other_weights(
    make_checkpoint, tmp_path: Path, capsys
) -> None:
    ckpt = make_checkpoint("lenet5")
    repo = tmp_path / "repo"
    assert run_export(ckpt, "-r", repo, "--no-progress", *FAST) == 0
    vdir = repo / "lenet5-synthetic" / "1"
    before = tree(repo)
    capsys.readouterr()
    assert run_export("verify", vdir, "--checkpoint", ckpt, *FAST_CHECKS) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["source_sha256_matches"]
    assert [c["name"] for c in report["checks"]] == ["onnx_checker", "parity", "ort_optimizations"]

    other = make_checkpoint("lenet5", name="other.pt", seed=5)
    assert run_export("verify", vdir, "--checkpoint", other, *FAST_CHECKS) == 1
    captured = capsys.readouterr()
    assert "FAILED check 'parity'" in captured.err
    assert json.loads(captured.out)["source_sha256_matches"] is False
    assert tree(repo) == before  # verify never writes


def test_noise_inputs_when_the_dataset_is_missing(tmp_path: Path) -> None:
    """A checkpoint whose dataset files are absent: parity on seeded noise, and the report says so."""
    from tests.exporter.helpers import write_checkpoint

    meta = synthetic_meta("lenet5", dataset="fashion-mnist")
    ckpt = write_checkpoint(tmp_path / "c.pt", make_model("lenet5", meta), meta)
    repo = tmp_path / "repo"
    args = ["-r", repo, "--data-dir", tmp_path / "nowhere", "--no-progress", *FAST]
    assert run_export(ckpt, *args) == 0
    report = json.loads((repo / "lenet5-fashion-mnist" / "1" / REPORT_FILE).read_text())
    assert report["data"]["real_test_set"] is False and "uniform noise" in report["data"]["eval"]
    props = onnx_export.read_metadata(onnx.load(repo / "lenet5-fashion-mnist" / "1" / MODEL_FILE))
    assert props["test_accuracy"] == "0.500000"  # the checkpoint's own metric, labelled as such
    assert "checkpoint metrics" in props["test_accuracy_source"]

"""cnnstack.contract: what one tool hands the next survives the trip (checkpoint dict, ONNX
metadata_props, config.pbtxt, export report), and files are replaced whole or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from google.protobuf import text_format

from cnnstack import version
from cnnstack.contract import (
    LABELS_FILE,
    CheckResult,
    DataInfo,
    ExportReport,
    ModelMeta,
    ModelSection,
    ModelSignature,
    Provenance,
    SourceRef,
    atomic_write,
    atomic_write_text,
    model_config,
    parse_config,
    render_config,
    verdict,
)
from cnnstack.serverproc import ServerProcess, ServerStartError

META = ModelMeta("lenet5", "fashion-mnist", (1, 28, 28), (0.286,), (0.353,), ("T-shirt/top", "Trouser"))


def test_model_meta_round_trips_through_the_checkpoint_dict_and_onnx_props() -> None:
    assert ModelMeta.from_dict(json.loads(json.dumps(META.to_dict()))) == META
    props = {**META.to_onnx_props(), **Provenance(precision="int8", test_accuracy=0.5).to_onnx_props()}
    assert all(isinstance(v, str) for v in props.values())
    back = ModelMeta.from_onnx_props(props)
    assert back == META and back.extra["precision"] == "int8"
    with pytest.raises(ValueError, match="was the model exported by cnn-export"):
        ModelMeta.from_onnx_props({"arch": "x"})


def test_provenance_round_trips_and_unknown_accuracy_is_nan() -> None:
    made = Provenance("fp16", None, "unavailable", "ab" * 32, version(), "dynamo", "2.13", "1.23")
    props = made.to_onnx_props()
    assert props["test_accuracy"] == "nan"
    assert Provenance.from_onnx_props(props) == made
    assert Provenance.from_onnx_props({}) == Provenance()  # a hand-made model: the defaults


def test_config_is_written_and_read_through_model_config() -> None:
    config = model_config("lenet", META.input_shape, META.num_classes, 32, 250, num_versions=2)
    text = render_config(config)
    assert parse_config(text) == config
    triton = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    theirs = text_format.Parse(text, triton.ModelConfig())
    assert [(o.name, list(o.dims), o.label_filename) for o in theirs.output] == [
        ("logits", [2], LABELS_FILE),
        ("probabilities", [2], LABELS_FILE),
    ]
    assert theirs.version_policy.latest.num_versions == 2 and theirs.max_batch_size == 32


def _report() -> ExportReport:
    signature = ModelSignature.of(META)
    model = ModelSection(signature, META.dataset, META.class_names, {"in_channels": 1}, 61706)
    return ExportReport(False, "lenet", SourceRef("/r/best.pt", "00", 3), model, {"exporter": version()}, {})


def test_export_report_leaves_out_the_stages_not_reached() -> None:
    report = _report()
    doc = report.to_dict()
    assert "data" not in doc and "precisions" not in doc and "version" not in doc
    assert doc["model"] == {
        "arch": "lenet5",
        "input_shape": [1, 28, 28],
        "num_classes": 2,
        "dataset": "fashion-mnist",
        "class_names": ["T-shirt/top", "Trouser"],
        "model_args": {"in_channels": 1},
        "params": 61706,
    }
    report.checks.append(CheckResult("parity", True, {"max_abs_diff": 1e-6}, "ok"))
    report.data = DataInfo("noise", False)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["checks"] == [
        {"name": "parity", "passed": True, "numbers": {"max_abs_diff": 1e-6}, "message": "ok"}
    ]
    assert doc["data"] == {"eval": "noise", "real_test_set": False}
    assert report.check("parity") == {"max_abs_diff": 1e-6} and report.check("other") == {}


def test_signature_differences_and_verdict_read_reports_from_json() -> None:
    published = json.loads(json.dumps(_report().to_dict()))
    assert ModelSignature.of(META).differences(published) == []
    other = ModelSignature("lenet5", (1, 28, 28), 10)
    assert other.differences(published) == [("num_classes", 2, 10)]
    assert verdict({"passed": True}) == (True, None)
    assert verdict({"passed": False, "failure": "parity"}) == (False, "parity")
    assert verdict(["not", "a", "report"]) == (None, None)


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "summary.json"
    atomic_write_text(path, "first\n")

    def broken(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_server_process_that_cannot_start_says_why(tmp_path: Path) -> None:
    server = ServerProcess("--metrics-port", "-1", repository=tmp_path / "missing")
    with pytest.raises(ServerStartError, match="(?s)exited with 2.*is not a directory"):
        server.start(timeout_s=60)
    assert server.proc is not None and server.proc.poll() == 2

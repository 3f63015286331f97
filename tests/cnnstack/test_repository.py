"""The model repository: Triton layout, config.pbtxt that Triton's own ModelConfig parses, versions,
atomic publishing under concurrent readers and racing writers. Torch-free like the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from google.protobuf import text_format

from cnnstack.contract import (
    ModelSignature,
    RepositoryError,
    check_name_clash,
    list_model_names,
    list_versions,
    model_config,
    publish,
    render_config,
    repository,
    sanitize_name,
)


def _report(v: int, arch: str = "lenet5", shape=(1, 28, 28), classes: int = 10) -> dict:
    return {
        "passed": True,
        "version": v,
        "model": {"arch": arch, "input_shape": list(shape), "num_classes": classes},
    }


def _publish(repo: Path, name: str, payload: bytes = b"onnx", arch: str = "lenet5") -> int:
    config = render_config(model_config(name, (1, 28, 28), 10, 64, 500))
    return publish(repo, name, payload, lambda v: _report(v, arch), config)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("lenet5-fashion-mnist", "lenet5-fashion-mnist"),
        ("LeNet5 FMNIST", "lenet5-fmnist"),
        ("run_2024.05/best", "run_2024-05-best"),
        ("--Weird!!name__", "weird-name"),
    ],
)
def test_sanitize_name(raw: str, expected: str) -> None:
    assert sanitize_name(raw) == expected


def test_sanitize_name_rejects_empty() -> None:
    with pytest.raises(RepositoryError, match="--name"):
        sanitize_name("!!!")


def test_config_pbtxt_parses_into_tritons_model_config() -> None:
    from tritonclient.grpc import model_config_pb2

    text = render_config(model_config("resnet18-cifar10", (3, 32, 32), 10, 128, 250))
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == "resnet18-cifar10"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 128
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input", model_config_pb2.TYPE_FP32, [3, 32, 32])
    outs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
    assert outs == {
        "logits": (model_config_pb2.TYPE_FP32, [10]),
        "probabilities": (model_config_pb2.TYPE_FP32, [10]),
    }
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg.version_policy.latest.num_versions == 1
    assert {o.label_filename for o in cfg.output} == {repository.LABELS_FILE}


def test_labels_file_lists_class_names_in_index_order_for_triton(tmp_path: Path) -> None:
    # Triton's classification extension (class_count) reads label i from line i of label_filename.
    names = ("T-shirt/top", "Trouser", "Ankle boot")
    text = render_config(model_config("m", (1, 28, 28), len(names), 8, 100))
    repository.publish(tmp_path, "m", b"onnx", lambda v: {"version": v}, text, labels=names)
    assert (tmp_path / "m" / repository.LABELS_FILE).read_text().splitlines() == list(names)
    assert (
        f'label_filename: "{repository.LABELS_FILE}"' in (tmp_path / "m" / repository.CONFIG_FILE).read_text()
    )
    assert list_versions(tmp_path, "m") == [1]  # labels.txt is no version


def test_versions_count_up_and_only_complete_numeric_dirs_are_listed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert [_publish(repo, "m") for _ in range(3)] == [1, 2, 3]
    # Things Triton ignores or that are incomplete are never versions.
    for junk in ("07", "notes", "9"):
        (repo / "m" / junk).mkdir()
    assert list_versions(repo, "m") == [1, 2, 3]
    # ...but a number already on disk is never reused.
    assert _publish(repo, "m") == 10
    assert list_model_names(repo) == ["m"]
    assert not [p for p in repo.iterdir() if p.name.startswith(repository.TMP_PREFIX)]
    report = json.loads((repo / "m" / "10" / repository.REPORT_FILE).read_text())
    assert report["version"] == 10 and report["passed"] is True
    assert (repo / "m" / "10" / repository.MODEL_FILE).read_bytes() == b"onnx"


def test_lost_rename_race_retries_with_next_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _publish(repo, "m")
    real_next = repository._next_free_version
    calls = []

    def stale_then_real(model_dir: Path) -> int:
        # First answer is stale: another exporter published version 1 after we looked.
        calls.append(1)
        return 1 if len(calls) == 1 else real_next(model_dir)

    monkeypatch.setattr(repository, "_next_free_version", stale_then_real)
    assert _publish(repo, "m", b"second") == 2
    assert (repo / "m" / "1" / repository.MODEL_FILE).read_bytes() == b"onnx"  # untouched
    report = json.loads((repo / "m" / "2" / repository.REPORT_FILE).read_text())
    assert report["version"] == 2  # the report was rebuilt for the version it got


def test_racing_publishers_get_distinct_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    results: list[int] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results.append(_publish(repo, "m", f"model-{i}".encode()))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(results) == list(range(1, 9))
    payloads = {(repo / "m" / str(v) / repository.MODEL_FILE).read_bytes() for v in results}
    assert payloads == {f"model-{i}".encode() for i in range(8)}


def test_concurrent_reader_never_sees_a_partial_version(tmp_path: Path) -> None:
    """A reader listing REPO/NAME/* while exporters publish 4 MB models sees only complete versions."""
    repo = tmp_path / "repo"
    repo.mkdir()
    payload = os.urandom(4 << 20)
    stop = threading.Event()
    seen: set[str] = set()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            model_dir = repo / "m"
            if not model_dir.is_dir():
                continue
            for entry in os.listdir(model_dir):
                if not entry.isdigit():
                    continue
                vdir = model_dir / entry
                try:
                    data = (vdir / repository.MODEL_FILE).read_bytes()
                    report = json.loads((vdir / repository.REPORT_FILE).read_text())
                except (OSError, ValueError) as e:
                    problems.append(f"{entry}: {e}")
                    continue
                if len(data) != len(payload) or report["version"] != int(entry):
                    problems.append(f"{entry}: {len(data)} bytes, report version {report['version']}")
                seen.add(entry)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    writers = [
        threading.Thread(target=lambda: [_publish(repo, "m", payload) for _ in range(3)]) for _ in range(3)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not problems, problems[:5]
    assert list_versions(repo, "m") == list(range(1, 10))
    assert seen  # the readers did look at published versions while writers were running


def test_name_clash_with_a_different_architecture(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _publish(repo, "m", arch="lenet5")
    check_name_clash(repo, "m", ModelSignature("lenet5", (1, 28, 28), 10))
    check_name_clash(repo, "other", ModelSignature("vgg11", (3, 32, 32), 100))
    with pytest.raises(RepositoryError, match=r"taken by a different model.*arch='lenet5'.*'resnet18'"):
        check_name_clash(repo, "m", ModelSignature("resnet18", (1, 28, 28), 10))
    with pytest.raises(RepositoryError, match="num_classes"):
        check_name_clash(repo, "m", ModelSignature("lenet5", (1, 28, 28), 100))


def test_unwritable_repository_is_reported(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(RepositoryError, match="not writable"):
        repository.ensure_writable(not_a_dir / "repo")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(RepositoryError, match="not writable"):
            repository.ensure_writable(ro)


def test_failed_reports_stay_out_of_the_published_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    path = repository.write_failed_report(repo / repository.FAILED_DIR, "m", {"passed": False})
    assert path.is_relative_to(repo / repository.FAILED_DIR)
    assert json.loads(path.read_text()) == {"passed": False}
    assert list_model_names(repo) == [] and list_versions(repo, "m") == []


def test_repository_module_is_torch_free() -> None:
    code = "import sys, cnnstack.contract; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

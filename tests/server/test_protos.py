"""The committed stubs are what protos/generate.sh produces, and our KServe v2 messages are
wire-compatible with tritonclient's (same names, numbers and types) while living beside them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_committed_stubs_are_up_to_date(tmp_path) -> None:
    subprocess.run([str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True, timeout=120)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert Path("protos/inference/grpc_service_pb2.py") in generated
    assert Path("protos/cnnstack/classifier/v1/classifier_pb2_grpc.py") in generated
    stale = [str(p) for p in generated if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"run protos/generate.sh and commit: {stale}"


def _fields(d: Descriptor) -> dict[str, tuple]:
    out = {}
    for f in d.fields:
        type_name = (
            f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else ""
        )
        out[f.name] = (f.number, f.type, f.is_repeated, type_name)
    return out


def _walk(d: Descriptor):
    yield d
    for nested in d.nested_types:
        yield from _walk(nested)


def test_kserve_messages_match_tritonclient_on_the_wire() -> None:
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.grpc import service_pb2 as triton_service

    from protos.inference import grpc_service_pb2, model_config_pb2

    checked = 0
    for ours_file, theirs_file in ((grpc_service_pb2, triton_service), (model_config_pb2, triton_config)):
        for top in ours_file.DESCRIPTOR.message_types_by_name.values():
            for ours in _walk(top):
                theirs = theirs_file.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
                mine, ref = _fields(ours), _fields(theirs)
                for name, sig in mine.items():
                    assert ref.get(name) == sig, (
                        f"{ours.full_name}.{name}: ours {sig}, tritonclient {ref.get(name)}"
                    )
                    checked += 1
    assert checked > 100
    ours_service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_service = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours_service.full_name == theirs_service.full_name == "inference.GRPCInferenceService"
    for method in ours_service.methods:
        ref = theirs_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            ref.input_type.full_name,
            ref.output_type.full_name,
        )
    for required in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
    ):
        assert required in ours_service.methods_by_name

"""TLS and mutual TLS on both listeners (gRPC and HTTP), with throwaway certificates (trustme):
a round trip each way, a client without a certificate refused under mutual TLS, and the health
check CLI over TLS."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos.inference import grpc_service_pb2 as ks
from protos.inference import grpc_service_pb2_grpc as ks_grpc
from server import healthcheck
from tests.server.helpers import server_config, write_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, as PEM files."""
    return write_pki(tmp_path_factory.mktemp("pki"))


def _grpc_ready(target: str, pki: dict[str, Path], with_client_cert: bool) -> bool:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki["client_key"].read_bytes() if with_client_cert else None,
        certificate_chain=pki["client_cert"].read_bytes() if with_client_cert else None,
    )
    with grpc.secure_channel(target, creds) as ch:
        return ks_grpc.GRPCInferenceServiceStub(ch).ServerReady(ks.ServerReadyRequest(), timeout=10).ready


def _grpc_infer(target: str, pki: dict[str, Path], shape: tuple[int, ...]) -> list[int]:
    creds = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
    )
    req = ks.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="FP32", shape=[1, *shape])
    req.raw_input_contents.append(np.zeros((1, *shape), "<f4").tobytes())
    with grpc.secure_channel(target, creds) as ch:
        reply = ks_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    return [list(o.shape) for o in reply.outputs]


def _https(url: str, pki: dict[str, Path], with_client_cert: bool, body: dict | None = None) -> dict:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_client_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read() or b"{}") if r.status == 200 else {"status": r.status}


def test_tls_round_trip_on_grpc_and_http(repo, start_server, pki) -> None:
    root, tm = repo
    s = start_server(server_config(root, tls_cert=pki["cert"], tls_key=pki["key"]))
    assert s.http_url.startswith("https://")
    assert _grpc_ready(s.target, pki, with_client_cert=False)
    meta = _https(f"{s.http_url}/v2/models/tiny", pki, with_client_cert=False)
    assert meta["name"] == "tiny"
    # Plain text is not served on a TLS port.
    with grpc.insecure_channel(s.target) as ch, pytest.raises(grpc.RpcError):
        ks_grpc.GRPCInferenceServiceStub(ch).ServerReady(ks.ServerReadyRequest(), timeout=3)


def test_mutual_tls_serves_a_certified_client_and_refuses_one_without(repo, start_server, pki) -> None:
    root, tm = repo
    cfg = server_config(root, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])
    s = start_server(cfg)
    shape = tuple(tm.meta.input_shape)
    assert _grpc_infer(s.target, pki, shape)  # gRPC with a client certificate: answered
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, *shape], "data": [0.0] * int(np.prod(shape))}
        ]
    }
    reply = _https(f"{s.http_url}/v2/models/tiny/infer", pki, with_client_cert=True, body=body)
    assert {o["name"] for o in reply["outputs"]} >= {"probabilities"}
    with pytest.raises(grpc.RpcError):  # no client certificate: the handshake fails
        _grpc_ready(s.target, pki, with_client_cert=False)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _https(f"{s.http_url}/v2/health/ready", pki, with_client_cert=False)


def test_health_check_cli_over_tls_and_mutual_tls(repo, start_server, pki) -> None:
    root, _ = repo
    cfg = server_config(root, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])
    s = start_server(cfg)
    base = ["--host", "127.0.0.1", "--port", str(s.port), "--tls-ca", str(pki["ca"])]
    assert (
        healthcheck.main([*base, "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])])
        == 0
    )
    assert healthcheck.main([*base, "--timeout-s", "2"]) == 1  # refused without a certificate
    with pytest.raises(SystemExit):
        healthcheck.main([*base, "--tls-cert", str(pki["client_cert"])])  # a certificate without its key

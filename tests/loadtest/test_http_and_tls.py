"""cnn-loadtest over KServe v2 HTTP/REST (binary extension and JSON) and over TLS / mutual TLS,
against the real cnn-serve: the server's own counters, by protocol, must equal what the client
counted; a client refused by mutual TLS is one error line, exit 1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.__main__ import main
from loadtest.metrics_scrape import REQUESTS, fetch, parse
from tests.server.helpers import RunningServer, publish, server_config, tiny_model, write_pki

pytestmark = pytest.mark.integration

SHAPE = (1, 8, 8)
STEPS = [
    "--concurrency",
    "1,8",
    "--max-requests",
    "120",
    "--duration",
    "3",
    "--window",
    "0.5",
    "--warmup",
    "0.1",
    "--stability-windows",
    "100",
    "--quiet",
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, as PEM files."""
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    data, tm = tiny_model(input_shape=SHAPE, class_names=("a", "b", "c"), arch="tiny", dataset="synthetic")
    publish(root, "tiny", 1, data, tm.meta)
    return root


def _start(repo: Path, **overrides) -> Iterator[RunningServer]:
    server = RunningServer(server_config(repo, max_batch_size=8, grace_s=1.0, **overrides))
    try:
        yield server
    finally:
        server.stop(1.0)


@pytest.fixture
def plain(repo: Path) -> Iterator[RunningServer]:
    yield from _start(repo)


@pytest.fixture
def mutual(repo: Path, pki: dict[str, Path]) -> Iterator[RunningServer]:
    yield from _start(repo, tls_cert=pki["cert"], tls_key=pki["key"], tls_client_ca=pki["ca"])


def _http_target(s: RunningServer) -> str:
    return f"127.0.0.1:{s.handle.http_port}"


def _ok_by_protocol(s: RunningServer) -> dict[str, float]:
    text = fetch(f"http://127.0.0.1:{s.handle.metrics_port}/metrics")
    return {
        p: parse(text, {"model": "tiny", "protocol": p, "rpc": "ModelInfer"}).get(f"{REQUESTS}:OK", 0.0)
        for p in ("grpc", "http")
    }


@pytest.mark.parametrize("encoding", [[], ["--json"]], ids=["binary", "json"])
def test_http_load_counts_match_the_servers_http_counter(plain, tmp_path, encoding) -> None:
    out = tmp_path / "report.json"
    argv = [
        "--target",
        _http_target(plain),
        "--model",
        "tiny",
        "--api",
        "kserve",
        "--protocol",
        "http",
        *encoding,
        "--images-per-request",
        "2",
        *STEPS,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["wire"] == ("http json" if encoding else "http binary")
    assert doc["input_shape"] == list(SHAPE)  # discovered through GET /v2/models/tiny
    for step in doc["steps"]:
        assert step["sent"] == step["ok"] == 120 and step["errors_total"] == {}
    # Every request went over HTTP (the pre-flight one too), none over gRPC.
    assert _ok_by_protocol(plain) == {"grpc": 0.0, "http": 2 * 120 + 1}


def test_an_unknown_model_over_http_is_one_line_naming_the_404(plain, capsys) -> None:
    argv = [
        "--target",
        _http_target(plain),
        "--model",
        "nope",
        "--api",
        "kserve",
        "--protocol",
        "http",
        *STEPS,
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 404" in err[0] and "nope" in err[0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_over_mutual_tls_with_a_client_certificate(mutual, pki, tmp_path, protocol) -> None:
    target = mutual.target if protocol == "grpc" else _http_target(mutual)
    out = tmp_path / "report.json"
    argv = [
        "--target",
        target,
        "--model",
        "tiny",
        "--api",
        "kserve",
        "--protocol",
        protocol,
        "--tls-ca",
        str(pki["ca"]),
        "--tls-cert",
        str(pki["client_cert"]),
        "--tls-key",
        str(pki["client_key"]),
        *STEPS,
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["wire"].endswith("+ TLS")
    assert all(s["sent"] == s["ok"] == 120 for s in doc["steps"])
    assert _ok_by_protocol(mutual)[protocol] == 2 * 120 + 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_client_without_a_certificate_is_refused_in_one_line(mutual, pki, capsys, protocol) -> None:
    target = mutual.target if protocol == "grpc" else _http_target(mutual)
    argv = [
        "--target",
        target,
        "--model",
        "tiny",
        "--api",
        "kserve",
        "--protocol",
        protocol,
        "--tls-ca",
        str(pki["ca"]),
        "--timeout",
        "3",
        *STEPS,
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert _ok_by_protocol(mutual) == {"grpc": 0.0, "http": 0.0}


def test_classify_over_tls_across_client_processes(repo, pki, tmp_path) -> None:
    """The TLS settings travel to --processes children; the Classify API over gRPC + TLS."""
    gen = _start(repo, tls_cert=pki["cert"], tls_key=pki["key"])
    server = next(gen)
    try:
        out = tmp_path / "report.json"
        argv = [
            "--target",
            server.target,
            "--model",
            "tiny",
            "--tls-ca",
            str(pki["ca"]),
            "--processes",
            "2",
            *STEPS[:1],
            "2,8",
            *STEPS[2:],
            "--out",
            str(out),
        ]
        assert main(argv) == 0
        assert all(s["sent"] == s["ok"] == 2 * 120 for s in json.loads(out.read_text())["steps"])
    finally:
        gen.close()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--protocol", "http"], "--protocol http needs --api kserve"),
        (["--api", "kserve", "--json"], "--json needs --protocol http"),
        (["--api", "kserve", "--protocol", "http", "--connections", "4"], "--connections is for gRPC"),
        (["--tls-cert", __file__], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem: no such file"),
    ],
)
def test_flags_that_do_not_go_together_are_named(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--target", "127.0.0.1:1", "--model", "m", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err

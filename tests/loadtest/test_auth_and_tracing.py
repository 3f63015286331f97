"""--auth-token-file and --traceparent 1: what arrives at fake gRPC and HTTP servers on every
request (discovery, pre-flight and load, from every client process), and that the token appears
in no output or report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadtest.__main__ import main
from loadtest.config import parse_args
from tests.loadtest.fakes import FAKE_MODEL, FakeHttpServer, FakeServer

TOKEN = "tok-3f9a.secret_value"
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
STEP = ["--concurrency", "4", "--max-requests", "40", "--duration", "10", "--window", "0.5", "--warmup", "0"]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text(f"# the load tester's token\n  \n{TOKEN}\nsecond-token-is-not-sent\n")
    return f


def _reports(tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]


def _assert_token_nowhere(tmp_path: Path, printed: str) -> None:
    assert TOKEN not in printed
    for report in ("r.json", "r.csv"):
        assert TOKEN not in (tmp_path / report).read_text()


@pytest.mark.parametrize("processes", [1, 2])
def test_grpc_requests_carry_the_bearer_token_and_a_fresh_traceparent(
    fake_server: FakeServer,
    token_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    processes: int,
) -> None:
    argv = ["--target", fake_server.target, "--model", FAKE_MODEL, *STEP, "--processes", str(processes)]
    argv += ["--auth-token-file", str(token_file), "--traceparent", "1", *_reports(tmp_path)]
    assert main(argv) == 0
    b = fake_server.behaviour
    assert len(b.metadata) == 1 + 40 * processes  # the pre-flight request, then every process's load
    assert b.listing_metadata and all(m["authorization"] == f"Bearer {TOKEN}" for m in b.listing_metadata)
    assert all(m["authorization"] == f"Bearer {TOKEN}" for m in b.metadata)
    parents = [m["traceparent"] for m in b.metadata]
    assert all(TRACEPARENT.match(p) for p in parents)
    assert len({p.split("-")[1] for p in parents}) == len(parents)  # a fresh trace per request
    captured = capsys.readouterr()
    _assert_token_nowhere(tmp_path, captured.out + captured.err)


def test_without_the_flags_requests_carry_neither(fake_server: FakeServer) -> None:
    assert main(["--target", fake_server.target, "--model", FAKE_MODEL, *STEP, "--quiet"]) == 0
    assert fake_server.behaviour.metadata == [{}] * 41


def test_http_requests_carry_the_authorization_and_traceparent_headers(
    fake_http_server: FakeHttpServer, token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--target",
        fake_http_server.target,
        "--model",
        FAKE_MODEL,
        "--api",
        "kserve",
        "--protocol",
        "http",
    ]
    argv += [*STEP, "--auth-token-file", str(token_file), "--traceparent", "1", *_reports(tmp_path)]
    assert main(argv) == 0
    heard = fake_http_server.infer_headers
    assert len(heard) == 41 and len(fake_http_server.metadata_headers) == 1
    for h in [*heard, *fake_http_server.metadata_headers]:
        assert h["authorization"] == f"Bearer {TOKEN}" and TRACEPARENT.match(h["traceparent"])
    assert len({h["traceparent"] for h in heard}) == 41
    captured = capsys.readouterr()
    _assert_token_nowhere(tmp_path, captured.out + captured.err)


def test_the_token_is_in_no_repr_of_the_config(token_file: Path) -> None:
    cfg = parse_args(["--target", "h:1", "--model", "m", "--auth-token-file", str(token_file)])
    assert cfg.transport.auth_token == TOKEN  # read once: the first line not blank or a comment, stripped
    assert TOKEN not in repr(cfg) and TOKEN not in repr(cfg.transport)


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such file"), ("\n \n# only a comment\n", "no token in it (one per line;")],
)
def test_a_missing_or_empty_token_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    f = tmp_path / "token"
    if content is not None:
        f.write_text(content)
    with pytest.raises(SystemExit) as e:
        parse_args(["--target", "h:1", "--model", "m", "--auth-token-file", str(f)])
    assert e.value.code == 2 and f"--auth-token-file {f}: {message}" in capsys.readouterr().err

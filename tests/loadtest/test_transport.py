"""loadtest.transport without a server: the wire settings, what each request carries, HTTP error
mapping and round robin, with fake channels and sessions."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.runner import CallFailed
from loadtest.transport import HttpCall, HttpPayload, Transport, new_traceparent, raw_call, round_robin
from tests.server.helpers import write_pki

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("pki"))


def test_protocol_is_checked_and_tls_follows_any_tls_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        Transport("h3")
    assert not Transport().secure and Transport().ssl_context() is None
    assert Transport().base_url("h:1") == "http://h:1"
    for secure in (Transport(tls=True), Transport(ca=tmp_path / "ca.pem")):
        assert secure.secure and secure.base_url("h:1") == "https://h:1"


def test_ssl_context_trusts_the_ca_and_presents_the_client_certificate(pki: dict[str, Path]) -> None:
    ctx = Transport("http", ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"]).ssl_context()
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1  # only the given CA, not the system's store


def test_grpc_channel_reads_the_pem_files_when_built_not_at_the_first_request(
    pki: dict[str, Path], tmp_path: Path
) -> None:

    async def build(t: Transport) -> None:
        await t.grpc_channel("127.0.0.1:1").close()

    asyncio.run(build(Transport()))
    asyncio.run(build(Transport(ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])))
    with pytest.raises(FileNotFoundError):
        asyncio.run(build(Transport(ca=tmp_path / "missing.pem")))


def test_the_token_is_no_part_of_the_transports_repr() -> None:
    t = Transport(auth_token="s3cret-token", traceparent=1.0)
    assert "s3cret-token" not in repr(t) and "s3cret-token" not in str(t)
    assert t == Transport(auth_token="s3cret-token", traceparent=1.0)  # still compared


def test_request_headers_carry_the_token_and_a_fresh_sampled_traceparent() -> None:
    assert not Transport().adds_headers and Transport().request_headers() == []
    assert Transport(auth_token="abc").request_headers() == [("authorization", "Bearer abc")]
    t = Transport(traceparent=1.0)
    parents = [dict(t.request_headers())["traceparent"] for _ in range(100)]
    assert all(TRACEPARENT.match(p) for p in parents)
    assert len({p.split("-")[1] for p in parents}) == 100  # a new trace id every request
    assert len({p.split("-")[2] for p in parents}) == 100
    assert TRACEPARENT.match(new_traceparent())


class FakeMultiCallable:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, payload: bytes, timeout: float | None = None, **kw: Any) -> str:
        self.calls.append({"payload": payload, "timeout": timeout, **kw})
        return "reply"


class FakeChannel:
    def __init__(self) -> None:
        self.method: str | None = None
        self.multicallable = FakeMultiCallable()

    def unary_unary(
        self, method: str, request_serializer: Any, response_deserializer: Any
    ) -> FakeMultiCallable:
        assert request_serializer is None and response_deserializer is None  # bytes in, bytes out
        self.method = method
        return self.multicallable


def test_raw_call_is_the_bare_multicallable_unless_requests_carry_something() -> None:
    ch = FakeChannel()
    assert raw_call(ch, "/svc/M") is ch.multicallable  # type: ignore[arg-type]
    assert raw_call(ch, "/svc/M", Transport()) is ch.multicallable  # type: ignore[arg-type]
    call = raw_call(ch, "/svc/M", Transport(auth_token="abc", traceparent=1.0))  # type: ignore[arg-type]
    assert call(b"x", timeout=2.0) == "reply" and call(b"y") == "reply"
    first, second = ch.multicallable.calls
    assert first["payload"] == b"x" and first["timeout"] == 2.0 and ch.method == "/svc/M"
    assert dict(first["metadata"])["authorization"] == "Bearer abc"
    assert dict(first["metadata"])["traceparent"] != dict(second["metadata"])["traceparent"]


def test_round_robin_sends_each_request_on_the_next_channel() -> None:
    seen: list[str] = []

    def channel(name: str) -> Any:
        return lambda payload, timeout=None: seen.append(name)

    single = channel("only")
    assert round_robin([single]) is single
    call = round_robin([channel("a"), channel("b"), channel("c")])
    for _ in range(7):
        call(b"", timeout=1.0)
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]


class FakeSession:
    """aiohttp.ClientSession.post as the load uses it: an async context manager of a response."""

    def __init__(self, status: int = 200, body: bytes = b"{}", raises: BaseException | None = None) -> None:
        self.status, self.body, self.raises = status, body, raises
        self.posts: list[dict[str, Any]] = []

    def post(self, url: str, data: bytes, headers: dict[str, str], timeout: Any) -> FakeSession:
        self.posts.append({"url": url, "data": data, "headers": headers, "timeout": timeout})
        return self

    async def __aenter__(self) -> FakeSession:
        if self.raises is not None:
            raise self.raises
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self) -> bytes:
        return self.body


def _post(session: FakeSession, transport: Transport | None = None, timeout: float = 1.0) -> bytes:
    call = HttpCall(session, "http://h:1/v2/models/m/infer", transport)
    return asyncio.run(call(HttpPayload(b"body", {"Content-Type": "application/json"}), timeout=timeout))


def test_http_call_posts_the_payload_with_its_headers_and_returns_the_body() -> None:
    s = FakeSession(body=b'{"outputs": []}')
    assert _post(s) == b'{"outputs": []}'
    (post,) = s.posts
    assert post["url"] == "http://h:1/v2/models/m/infer" and post["data"] == b"body"
    assert post["headers"] == {"Content-Type": "application/json"} and post["timeout"].total == 1.0


def test_http_call_adds_the_token_and_traceparent_to_every_request() -> None:
    s = FakeSession()
    t = Transport("http", auth_token="abc", traceparent=1.0)
    _post(s, t)
    _post(s, t)
    first, second = (p["headers"] for p in s.posts)
    assert first["Content-Type"] == "application/json" and first["authorization"] == "Bearer abc"
    assert TRACEPARENT.match(first["traceparent"]) and first["traceparent"] != second["traceparent"]


@pytest.mark.parametrize(
    "session, code",
    [
        (FakeSession(status=503, body=b"overloaded"), "HTTP_503"),
        (FakeSession(status=404, body=b"no model"), "HTTP_404"),
        (FakeSession(raises=TimeoutError()), "DEADLINE_EXCEEDED"),
        (FakeSession(raises=aiohttp.ClientConnectionError("refused")), "UNAVAILABLE"),
    ],
)
def test_http_failures_are_counted_by_code(session: FakeSession, code: str) -> None:
    with pytest.raises(CallFailed) as e:
        _post(session)
    assert e.value.code == code
    if code.startswith("HTTP_"):
        assert e.value.details == session.body.decode()  # the server's own words, for the report

"""Token authentication: the rules (which calls need which token, how files are read and reread),
then a live server over gRPC and HTTP, plain and TLS, driven by tritonclient and curl: no token or
a wrong one is 401/UNAUTHENTICATED with nothing more said, a token works, health stays open (or
not, with --auth-health), refusals are counted, SIGHUP rereads the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnstack.cli import ConfigError
from server import healthcheck
from server.tokens import ADMIN, OPEN, UNAUTHENTICATED, USER, TokenFileError, Tokens
from tests.server.helpers import publish, server_config, tiny_model, write_pki
from tests.server.http_helpers import curl

USER_TOKEN, ADMIN_TOKEN = "user-token-1", "admin-token-9"


def token_files(d: Path) -> tuple[Path, Path]:
    users, admins = d / "tokens", d / "admin-tokens"
    users.write_text(f"# inference clients\n{USER_TOKEN}\n\nsecond-user\n")
    admins.write_text(f"{ADMIN_TOKEN}\n")
    return users, admins


# ---- the rules ----


def test_which_token_each_kind_of_call_needs(tmp_path: Path) -> None:
    users, admins = token_files(tmp_path)
    both = Tokens(users, admins)
    bearer = "Bearer {}".format
    assert both.check(None, OPEN) is None
    assert both.check(None, USER) == "missing"
    assert both.check(bearer("nope"), USER) == "invalid" and both.check("Basic xyz", USER) == "invalid"
    assert both.check(bearer(USER_TOKEN), USER) is None and both.check(bearer("second-user"), USER) is None
    assert both.check(bearer(ADMIN_TOKEN), USER) is None  # an admin token works everywhere
    assert both.check(bearer(USER_TOKEN), ADMIN) == "forbidden"
    assert (
        both.check(bearer(ADMIN_TOKEN), ADMIN) is None
        and both.check(f"bearer  {ADMIN_TOKEN} ", ADMIN) is None
    )
    users_only = Tokens(users)
    assert users_only.check(bearer(USER_TOKEN), ADMIN) is None  # no admin file: admin APIs as the others
    admins_only = Tokens(admin_file=admins)
    assert admins_only.check(None, USER) is None and admins_only.check(None, ADMIN) == "missing"
    assert not Tokens().enabled and Tokens().check(None, ADMIN) is None


def test_health_is_open_unless_asked_and_admin_apis_are_told_apart(tmp_path: Path) -> None:
    users, _ = token_files(tmp_path)
    tokens, strict = Tokens(users), Tokens(users, protect_health=True)
    assert tokens.grpc_need("/grpc.health.v1.Health/Check") == OPEN
    assert tokens.grpc_need("/inference.GRPCInferenceService/ServerReady") == OPEN
    assert tokens.grpc_need("/inference.GRPCInferenceService/ModelInfer") == USER
    assert tokens.grpc_need("/inference.GRPCInferenceService/RepositoryModelLoad") == ADMIN
    assert strict.grpc_need("/grpc.health.v1.Health/Check") == USER
    assert (
        tokens.http_need("/v2/health/ready") == OPEN
        and tokens.http_need("/v2/models/m/versions/2/ready") == OPEN
    )
    assert tokens.http_need("/v2/models/m/infer") == USER and tokens.http_need("/v2") == USER
    assert tokens.http_need("/v2/repository/models/m/unload") == ADMIN
    assert strict.http_need("/v2/health/live") == USER


def test_token_files_are_checked_at_start_and_a_bad_reread_keeps_the_tokens(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(TokenFileError, match="holds no token"):
        Tokens(empty)
    with pytest.raises(TokenFileError, match="cannot be read"):
        Tokens(tmp_path / "missing")
    users, _ = token_files(tmp_path)
    tokens = Tokens(users)
    users.write_text("")
    tokens.reload()  # refused: keeps what it had
    assert tokens.check(f"Bearer {USER_TOKEN}", USER) is None
    users.write_text("rotated\n")
    tokens.reload()
    assert (
        tokens.check(f"Bearer {USER_TOKEN}", USER) == "invalid"
        and tokens.check("Bearer rotated", USER) is None
    )


def test_the_flags_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--auth-token-file .* is not a readable file"):
        server_config(tmp_path, auth_token_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="--auth-health needs --auth-token-file"):
        server_config(tmp_path, auth_health=True)


# ---- a live server ----


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return write_pki(tmp_path_factory.mktemp("auth-pki"))


@pytest.fixture(params=["plain", "tls"])
def secured(request, tmp_path, start_server, pki):
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    users, admins = token_files(tmp_path)
    tls = dict(tls_cert=pki["cert"], tls_key=pki["key"]) if request.param == "tls" else {}
    server = start_server(server_config(root, auth_token_file=users, admin_token_file=admins, **tls))
    return server, request.param == "tls", users


def grpc_client(server, tls: bool, pki):
    import tritonclient.grpc as tg

    return tg.InferenceServerClient(server.target, ssl=tls, root_certificates=str(pki["ca"]) if tls else None)


def http_client(server, tls: bool, pki):
    import tritonclient.http as th

    url = server.http_url.split("://", 1)[1]
    if not tls:
        return th.InferenceServerClient(url)
    import gevent.ssl

    return th.InferenceServerClient(
        url, ssl=True, ssl_context_factory=lambda: gevent.ssl.create_default_context(cafile=str(pki["ca"]))
    )


def infer(client, module, headers=None):
    x = module.InferInput("input", [1, 1, 28, 28], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    return client.infer("tiny", [x], headers=headers).as_numpy("probabilities")


def failures(server, protocol: str, reason: str) -> float:
    labels = {"protocol": protocol, "reason": reason}
    return server.handle.metrics.registry.get_sample_value("cnn_auth_failures_total", labels) or 0.0


@pytest.mark.integration
def test_grpc_calls_need_a_token_and_health_does_not(secured, pki) -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    server, tls, _ = secured
    client = grpc_client(server, tls, pki)
    assert client.is_server_ready() and client.is_model_ready("tiny")  # probes need no token
    for headers, reason in ((None, "missing"), ({"authorization": "Bearer wrong"}, "invalid")):
        with pytest.raises(InferenceServerException) as refused:
            infer(client, tg, headers)
        assert "UNAUTHENTICATED" in str(refused.value.status()) and UNAUTHENTICATED in refused.value.message()
        assert "wrong" not in refused.value.message() and failures(server, "grpc", reason) == 1
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED|valid bearer token"):
        client.get_model_metadata("tiny")
    for token in (USER_TOKEN, ADMIN_TOKEN):
        assert infer(client, tg, {"authorization": f"Bearer {token}"}).shape == (1, 10)
    assert client.get_model_metadata("tiny", headers={"authorization": f"Bearer {USER_TOKEN}"}).name == "tiny"


@pytest.mark.integration
def test_http_calls_need_a_token_and_health_does_not(secured, pki) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    server, tls, _ = secured
    client = http_client(server, tls, pki)
    assert client.is_server_ready() and client.is_model_ready("tiny")
    with pytest.raises(InferenceServerException) as refused:
        infer(client, th)
    assert refused.value.status() == "401" and UNAUTHENTICATED in refused.value.message()
    assert infer(client, th, {"Authorization": f"Bearer {USER_TOKEN}"}).shape == (1, 10)
    # curl, as an operator would: the challenge header, no detail, and the token working.
    ca = ["--cacert", str(pki["ca"])] if tls else []
    no_token = curl(*ca, "-i", f"{server.http_url}/v2/models/tiny").stdout.decode()
    assert no_token.startswith("HTTP/1.1 401") and "WWW-Authenticate: Bearer" in no_token
    wrong = curl(
        *ca, "-i", "-H", "Authorization: Bearer wrong", f"{server.http_url}/v2/models/tiny"
    ).stdout.decode()
    assert wrong.split("\r\n\r\n", 1)[1] == no_token.split("\r\n\r\n", 1)[1]  # the same answer either way
    ok = curl(*ca, "-sf", "-H", f"Authorization: Bearer {USER_TOKEN}", f"{server.http_url}/v2/models/tiny")
    assert ok.returncode == 0 and b'"name": "tiny"' in ok.stdout
    assert failures(server, "http", "missing") >= 2 and failures(server, "http", "invalid") == 1


@pytest.mark.integration
def test_sighup_rereads_the_token_files(secured, pki) -> None:
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    server, tls, users = secured
    client = grpc_client(server, tls, pki)
    users.write_text("rotated-token\n")
    server.call_soon(server.handle.reload)  # what the SIGHUP handler calls
    server.run(__import__("asyncio").sleep(0.05))
    assert infer(client, tg, {"authorization": "Bearer rotated-token"}).shape == (1, 10)
    with pytest.raises(InferenceServerException, match="valid bearer token"):
        infer(client, tg, {"authorization": f"Bearer {USER_TOKEN}"})


@pytest.mark.integration
def test_with_auth_health_the_probes_need_a_token_too(tmp_path, start_server) -> None:
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    users, _ = token_files(tmp_path)
    server = start_server(server_config(root, auth_token_file=users, auth_health=True))
    port = ["--port", str(server.port)]
    assert healthcheck.main(port) == 1
    assert healthcheck.main([*port, "--auth-token-file", str(users)]) == 0
    from tests.server.http_helpers import request

    assert request(server.http_url + "/v2/health/ready").status == 401
    assert (
        request(
            server.http_url + "/v2/health/ready", headers={"Authorization": f"Bearer {USER_TOKEN}"}
        ).status
        == 200
    )

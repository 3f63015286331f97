"""Model control (--model-control-mode explicit), through stock tritonclient over gRPC and HTTP: load,
unload and the repository index with each version's state; an unload under load fails no admitted
request and turns new ones into NOT_FOUND; a broken load names the file and keeps what serves; a
load may bring its own config; version_policy decides which versions a load serves; the other modes
refuse; administrative tokens guard it."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from protos.inference import grpc_service_pb2_grpc as ks_grpc
from tests.server.bad_inputs import kserve
from tests.server.helpers import publish, server_config, tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name, seed in (("alpha", 1), ("beta", 2)):
        data, tm = tiny_model(seed=seed)
        publish(root, name, 1, data, tm.meta)
    return root


@pytest.fixture
def explicit(repo, start_server):
    return start_server(server_config(repo, model_control_mode="explicit", load_model=("alpha",)))


def grpc_client(server):
    import tritonclient.grpc as tg

    return tg.InferenceServerClient(server.target)


def http_client(server):
    import tritonclient.http as th

    return th.InferenceServerClient(server.http_url.split("://", 1)[1])


def index(client) -> dict[tuple[str, str], tuple[str, str]]:
    raw = client.get_model_repository_index()
    rows = raw.models if hasattr(raw, "models") else raw  # grpc: a message, http: a list of dicts
    return {
        (
            r["name"] if isinstance(r, dict) else r.name,
            r.get("version", "") if isinstance(r, dict) else r.version,
        ): (
            r.get("state", "") if isinstance(r, dict) else r.state,
            r.get("reason", "") if isinstance(r, dict) else r.reason,
        )
        for r in rows
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_load_unload_and_index_with_tritonclient(explicit, protocol) -> None:
    from tritonclient.utils import InferenceServerException

    client = grpc_client(explicit) if protocol == "grpc" else http_client(explicit)
    assert client.is_model_ready("alpha") and not client.is_model_ready("beta")
    before = index(client)
    assert before[("alpha", "1")][0] == "READY"
    assert before[("beta", "1")][0] == "UNAVAILABLE" and "unloaded" in before[("beta", "1")][1]
    client.load_model("beta")
    assert client.is_model_ready("beta") and index(client)[("beta", "1")][0] == "READY"
    client.unload_model("beta")
    assert not client.is_model_ready("beta") and index(client)[("beta", "1")][0] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException, match="no model 'gamma' in the repository"):
        client.load_model("gamma")
    with pytest.raises(InferenceServerException, match="'beta' is not loaded"):
        client.unload_model("beta")


def test_the_extension_is_listed(explicit) -> None:
    assert "model_repository" in grpc_client(explicit).get_server_metadata().extensions


def test_an_unload_under_load_fails_no_admitted_request(explicit) -> None:
    """32 clients calling alpha while it is unloaded: every call either succeeds or, once the model
    is out of the table, gets NOT_FOUND with a message; no admitted call fails."""
    results: Counter = Counter()
    messages: set[str] = set()
    lock = threading.Lock()
    started = threading.Barrier(33)

    def client() -> None:
        with grpc.insecure_channel(explicit.target) as ch:
            stub = ks_grpc.GRPCInferenceServiceStub(ch)
            started.wait(30)
            for _ in range(200):
                try:
                    stub.ModelInfer(kserve(model_name="alpha"), timeout=30)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                    with lock:
                        messages.add(e.details())
                with lock:
                    results[code] += 1
                if code == "NOT_FOUND":
                    return

    threads = [threading.Thread(target=client) for _ in range(32)]
    for t in threads:
        t.start()
    started.wait(30)
    grpc_client(explicit).unload_model("alpha")
    for t in threads:
        t.join(120)
    assert set(results) <= {"OK", "NOT_FOUND"}, results
    assert results["NOT_FOUND"] == 32 and results["OK"] > 0  # every client saw it go, none failed before
    assert all("'alpha' is not loaded" in m for m in messages)
    assert explicit.handle.state.admitted_failed == 0


def test_a_broken_load_names_the_file_and_keeps_what_serves(explicit, repo) -> None:
    from tritonclient.utils import InferenceServerException

    _, tm = tiny_model(seed=1)
    broken = publish(repo, "alpha", 2, b"not an onnx model", tm.meta)
    client = grpc_client(explicit)
    with pytest.raises(InferenceServerException) as failed:
        client.load_model("alpha")
    assert str(broken / "model.onnx") in failed.value.message()
    assert client.is_model_ready("alpha", "1")  # version 1 still serves
    state, reason = index(client)[("alpha", "2")]
    assert state == "UNAVAILABLE" and "model.onnx" in reason


def test_a_load_may_bring_its_own_config_and_version_policy_decides(explicit, repo) -> None:
    data, tm = tiny_model(seed=3)
    publish(repo, "beta", 2, data, tm.meta)
    client = grpc_client(explicit)
    client.load_model("beta")  # config.pbtxt: the latest version only
    assert [r for r in index(client) if r[0] == "beta"] and index(client)[("beta", "2")][0] == "READY"
    assert index(client)[("beta", "1")] == ("UNAVAILABLE", "not selected by the model's version_policy")
    config = {"max_batch_size": 4, "version_policy": {"all": {}}}
    client.load_model("beta", config=json.dumps(config))
    assert index(client)[("beta", "1")][0] == "READY" and index(client)[("beta", "2")][0] == "READY"
    assert client.get_model_config("beta").config.max_batch_size == 4


def test_poll_and_none_modes_refuse_model_control(repo, start_server) -> None:
    from tritonclient.utils import InferenceServerException

    for mode in ("poll", "none"):
        server = start_server(server_config(repo, model_control_mode=mode))
        with pytest.raises(InferenceServerException, match="--model-control-mode explicit"):
            grpc_client(server).unload_model("alpha")
        assert grpc_client(server).is_model_ready("alpha") and grpc_client(server).is_model_ready("beta")


def test_admin_tokens_guard_model_control(repo, start_server, tmp_path) -> None:
    from tritonclient.utils import InferenceServerException

    users, admins = tmp_path / "tokens", tmp_path / "admins"
    users.write_text("user\n")
    admins.write_text("admin\n")
    server = start_server(
        server_config(repo, model_control_mode="explicit", auth_token_file=users, admin_token_file=admins)
    )
    client = grpc_client(server)
    with pytest.raises(InferenceServerException, match="valid bearer token"):
        client.load_model("beta")
    with pytest.raises(InferenceServerException, match="needs an administrative token"):
        client.load_model("beta", headers={"authorization": "Bearer user"})
    client.load_model("beta", headers={"authorization": "Bearer admin"})
    http = http_client(server)
    with pytest.raises(InferenceServerException, match="administrative"):
        http.unload_model("beta", headers={"Authorization": "Bearer user"})
    http.unload_model("beta", headers={"Authorization": "Bearer admin"})
    assert not client.is_model_ready("beta")


def test_the_model_control_flags_are_checked(repo) -> None:
    from cnnstack.cli import ConfigError

    with pytest.raises(ConfigError, match="--load-model needs --model-control-mode explicit"):
        server_config(repo, load_model=("alpha",))
    with pytest.raises(ConfigError, match="--model-control-mode must be one of"):
        server_config(repo, model_control_mode="manual")

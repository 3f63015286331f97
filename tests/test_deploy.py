"""docker-compose*.yml and deploy/ agree with the code they deploy: files are parsed and configs
built, nothing runs (tests/deploy runs them). The linters (docker-compose, promtool) skip only where
the binary is missing."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from cnnstack.contract import publish
from exporter.config import parse_config
from loadtest.config import parse_args as parse_loadtest
from server.config import ENV_PREFIX, ServerConfig
from tests.deploy.files import (
    HERE,
    ROOT,
    container_ports,
    load_yaml,
    locate,
    nodes,
    run_user,
    server_configs,
    services,
)
from trainer.__main__ import build_parser as trainer_parser
from trainer.presets import get_preset


def run_tool(*argv: str) -> None:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["docker-compose", "-f", "docker-compose.yml", "config", "-q"],
        ["docker-compose", "--profile", "scale", "--profile", "loadtest", "config", "-q"],
        [
            "docker-compose",
            "-f",
            "docker-compose.yml",
            "-f",
            "docker-compose.gpu.yml",
            "--profile",
            "scale",
            "--profile",
            "loadtest",
            "config",
            "-q",
        ],
        ["promtool", "check", "config", "deploy/prometheus.yml"],
    ],
)
def test_ci_lint(argv: list[str]) -> None:
    run_tool(*argv)


def test_the_auth_override_lints_and_only_adds_the_token(tmp_path, monkeypatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token\n")
    monkeypatch.setenv("CNN_TOKENS", str(tokens))
    run_tool(
        *("docker-compose", "-f", "docker-compose.yml", "-f", "docker-compose.auth.yml"),
        *("--profile", "scale", "--profile", "loadtest", "config", "-q"),
    )
    base, auth = load_yaml("docker-compose.yml")["services"], load_yaml("docker-compose.auth.yml")
    file = "/run/secrets/" + next(iter(auth["secrets"]))
    for name in ("server", "server-replica"):
        assert auth["services"][name]["environment"] == {ENV_PREFIX + "AUTH_TOKEN_FILE": file}
    # The load test's command is docker-compose.yml's, plus the token: the two cannot drift apart.
    assert auth["services"]["loadtest"]["command"] == [
        *base["loadtest"]["command"],
        "--auth-token-file",
        file,
    ]
    cfg = parse_loadtest(auth["services"]["loadtest"]["command"][:-2] + ["--auth-token-file", str(tokens)])
    assert cfg.transport.auth_token == "a-token"


def test_server_env_is_real_flags_and_ports_are_published() -> None:
    fields = set(ServerConfig.__dataclass_fields__)
    for gpu in (False, True):
        for name, cfg in server_configs(gpu).items():
            svc = services(gpu)[name]
            for key in svc["environment"]:
                assert key[len(ENV_PREFIX) :].lower() in fields, f"{name}: {key} is no server flag"
            assert cfg.host == "0.0.0.0", f"{name} must listen on every interface to be reachable"
            if svc.get("deploy", {}).get("replicas", 1) > 1:
                assert "ports" not in svc, f"{name}: replicas cannot share one host port"
            else:
                assert (
                    container_ports(svc) == {cfg.http_port, cfg.port, cfg.metrics_port} == {8000, 8001, 8002}
                )
            test = svc["healthcheck"]["test"]
            assert importlib.util.find_spec(test[test.index("-m") + 1]) is not None
            assert int(test[test.index("--port") + 1]) == cfg.port
            assert int(svc["stop_grace_period"].rstrip("s")) > cfg.grace_s, (
                "docker kills before the drain ends"
            )
            devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            assert (cfg.device == "cuda") == gpu == any("gpu" in d["capabilities"] for d in devices), name


def test_prometheus_and_envoy_reach_every_server() -> None:
    servers = server_configs()
    prom = load_yaml("deploy/prometheus.yml")
    scraped: dict[str, str | int] = {}
    for job in prom["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped.update(t.rsplit(":", 1) for t in static["targets"])
        for sd in job.get("dns_sd_configs", []):
            scraped.update((n, sd["port"]) for n in sd["names"])
    assert {h: int(p) for h, p in scraped.items()} == {n: c.metrics_port for n, c in servers.items()}

    envoy = load_yaml("deploy/envoy.yaml")["static_resources"]
    listeners = {n["port_value"] for n in nodes(envoy["listeners"]) if "port_value" in n}
    assert listeners == container_ports(services()["envoy"])
    routed = {n["cluster"] for n in nodes(envoy["listeners"]) if "cluster" in n}
    assert routed and routed <= {c["name"] for c in envoy["clusters"]}
    for cluster in envoy["clusters"]:
        endpoints = {
            n["address"]: n["port_value"] for n in nodes(cluster["load_assignment"]) if "port_value" in n
        }
        assert endpoints == {n: c.port for n, c in servers.items()}, cluster["name"]


def test_config_files_are_mounted_where_the_services_read_them() -> None:
    svcs = services()
    envoy_cmd = svcs["envoy"]["command"]
    assert locate(svcs["envoy"], envoy_cmd[envoy_cmd.index("-c") + 1])[:2] == ("./deploy/envoy.yaml", HERE)
    prom_flag = next(a for a in svcs["prometheus"]["command"] if a.startswith("--config.file="))
    assert locate(svcs["prometheus"], prom_flag.split("=", 1)[1])[:2] == ("./deploy/prometheus.yml", HERE)
    grafana = svcs["grafana"]
    assert locate(grafana, "/etc/grafana/provisioning")[:2] == ("./deploy/grafana/provisioning", HERE)
    for provider in load_yaml("deploy/grafana/provisioning/dashboards/cnnstack.yml")["providers"]:
        source, rel, _ = locate(grafana, provider["options"]["path"])
        assert list((ROOT / source / rel).glob("*.json")), f"no dashboard in {source}"
    for svc in svcs.values():
        for spec in svc.get("volumes", []):
            if spec.startswith("./deploy/"):
                assert (ROOT / spec.split(":")[0]).exists(), spec


def test_artifacts_flow_trainer_to_exporter_to_server_to_loadtest() -> None:
    svcs = services()
    train = trainer_parser().parse_args(svcs["trainer"]["command"])
    get_preset(train.preset)
    assert train.overwrite, "a second `docker compose up` would refuse the existing run"
    export = parse_config(svcs["exporter"]["command"])
    assert svcs["exporter"]["entrypoint"] == ["cnn-export"] and export.command == "export"
    assert [locate(svcs["exporter"], s)[:2] for s in export.sources] == [
        locate(svcs["trainer"], train.out)[:2]
    ]
    assert locate(svcs["exporter"], export.data_dir)[0] == locate(svcs["trainer"], train.data_dir)[0]
    published = locate(svcs["exporter"], export.repository)[:2]
    for name, cfg in server_configs().items():
        assert locate(svcs[name], cfg.repository)[:2] == published, name

    lt = parse_loadtest(svcs["loadtest"]["command"])
    host = lt.target.rsplit(":", 1)[0]
    cfg = server_configs()[host]
    assert lt.target == f"{host}:{cfg.port}" and lt.metrics_url == f"http://{host}:{cfg.metrics_port}/metrics"
    assert lt.model == export.name
    assert set(svcs["loadtest"]["depends_on"]) == {host}

    writes = [("trainer", train.out), ("trainer", train.data_dir), ("exporter", export.repository)]
    writes += [("loadtest", lt.out), ("loadtest", lt.csv)]  # no --plot: the server image has no matplotlib
    for name, path in writes:
        source, _, read_only = locate(svcs[name], path)
        assert not read_only, f"{name} writes {path}"
        if source.startswith((".", "/")):  # a host folder: only root may write it whoever owns it
            assert run_user(svcs[name]) in ("0", "root"), f"{name} cannot write the host folder {source}"


def test_published_versions_are_readable_by_the_server(tmp_path: Path) -> None:
    exporter_user, server_user = run_user(services()["exporter"]), run_user(services()["server"])
    version = publish(tmp_path, "m", b"onnx", lambda v: {}, "config")
    mode = (tmp_path / "m" / str(version)).stat().st_mode
    assert exporter_user == server_user or mode & 0o005 == 0o005, f"{oct(mode)} by {exporter_user}"

"""docker-compose.yml and deploy/ agree with the code they deploy: files are parsed and configs
built, nothing runs. The linters (docker-compose, promtool) skip only where the binary is missing."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from cnnstack import version
from cnnstack.contract import publish
from exporter.config import parse_config
from loadtest.config import parse_args as parse_loadtest
from server.config import ENV_PREFIX, ServerConfig
from trainer.__main__ import build_parser as trainer_parser
from trainer.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
HERE = PurePosixPath(".")


@functools.cache
def load_yaml(rel: str) -> Any:
    # compose's ${VAR:-default} with every VAR unset
    return yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (ROOT / rel).read_text()))


def services() -> dict[str, dict[str, Any]]:
    return load_yaml("docker-compose.yml")["services"]


def server_configs() -> dict[str, ServerConfig]:
    """Every service running the server, with the config its environment gives it."""
    out = {}
    for name, svc in services().items():
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        if any(k.startswith(ENV_PREFIX) for k in env):
            out[name] = ServerConfig.from_args([], environ=env)
    assert "server" in out
    return out


def container_ports(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}


def locate(svc: dict[str, Any], path: object) -> tuple[str, PurePosixPath, bool]:
    """(volume or host path, path inside it, read-only) of the mount holding ``path``."""
    best = None
    for spec in svc.get("volumes", []):
        source, target, *mode = spec.split(":")
        rel = PurePosixPath(str(path))
        if rel.is_relative_to(target) and (best is None or len(target) > len(best[1])):
            best = (source, target, rel.relative_to(target), "ro" in mode)
    assert best is not None, f"{path} lies in no volume of {svc.get('image')}"
    return best[0], best[2], best[3]


def dockerfile(rel: str) -> list[list[tuple[str, str]]]:
    """Stages of a Dockerfile, each a list of (INSTRUCTION, arguments)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / rel).read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instr, _, rest = line.strip().partition(" ")
            if instr.upper() == "FROM":
                stages.append([])
            stages[-1].append((instr.upper(), rest.strip()))
    return stages


def image(svc: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(Dockerfile, last value of each instruction in its final stage) of a service's image."""
    built = {s["image"]: s["build"]["dockerfile"] for s in services().values() if "build" in s}
    assert svc["image"] in built, f"image {svc['image']} is built by no service (compose would pull it)"
    return built[svc["image"]], dict(dockerfile(built[svc["image"]])[-1])


def run_user(svc: dict[str, Any]) -> str:
    return str(svc.get("user") or image(svc)[1].get("USER", "0")).split(":")[0]


def nodes(tree: Any) -> list[dict[str, Any]]:
    """Every JSON object in ``tree``, depth first."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out += [node] if isinstance(node, dict) else []
        todo += node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return out


def pyproject(rel: str = "pyproject.toml") -> dict[str, Any]:
    return pytest.importorskip("tomllib").loads((ROOT / rel).read_text())


SERVER_DOCKERFILE = "deploy/server.Dockerfile"
SERVER_PACKAGES = {"cnnstack", "server", "loadtest", "protos"}


def context_copies(rel: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not ``--from``) of a Dockerfile."""
    out = []
    for stage in dockerfile(rel):
        for instr, args in stage:
            if instr == "COPY" and not args.startswith("--from"):
                *sources, dest = args.split()
                out.append((sources, dest))
    return out


def lay_out_context(rel: str, workdir: Path) -> None:
    """The build stage's WORKDIR as the Dockerfile's COPYs fill it (Docker's rules for files/dirs)."""
    for sources, dest in context_copies(rel):
        target = workdir / dest
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                shutil.copytree(
                    path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            elif dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


@pytest.fixture(scope="module")
def server_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel the server image builds and installs, built here from the files it copies."""
    pytest.importorskip("setuptools")
    src, out = tmp_path_factory.mktemp("server-image"), tmp_path_factory.mktemp("wheels")
    lay_out_context(SERVER_DOCKERFILE, src)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        yield zf


def wheel_scripts(wheel: zipfile.ZipFile) -> dict[str, str]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(name).decode()
    scripts = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    return dict(tuple(p.strip() for p in line.split("=", 1)) for line in scripts.splitlines() if "=" in line)  # type: ignore[misc]


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
        ["promtool", "check", "config", "deploy/prometheus.yml"],
    ],
)
def test_ci_lint(argv: list[str]) -> None:
    run_tool(*argv)


def test_server_env_is_real_flags_and_ports_are_published() -> None:
    fields = set(ServerConfig.__dataclass_fields__)
    for name, cfg in server_configs().items():
        svc = services()[name]
        for key in svc["environment"]:
            assert key[len(ENV_PREFIX) :].lower() in fields, f"{name}: {key} is no server flag"
        assert cfg.host == "0.0.0.0", f"{name} must listen on every interface to be reachable"
        if svc.get("deploy", {}).get("replicas", 1) > 1:
            assert "ports" not in svc, f"{name}: replicas cannot share one host port"
        else:
            assert container_ports(svc) == {cfg.port, cfg.metrics_port}
        test = svc["healthcheck"]["test"]
        assert importlib.util.find_spec(test[test.index("-m") + 1]) is not None
        assert int(test[test.index("--port") + 1]) == cfg.port
        assert int(svc["stop_grace_period"].rstrip("s")) > cfg.grace_s, "docker kills before the drain ends"
        reservations = svc["deploy"]["resources"]["reservations"]
        assert cfg.device == "cpu" or any("gpu" in d["capabilities"] for d in reservations["devices"])


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


def test_images_are_built_run_project_scripts_and_the_server_has_no_torch() -> None:
    scripts = pyproject()["project"]["scripts"]
    for name, svc in services().items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        if svc.get("image", "").startswith("cnnstack-"):
            final = image(svc)[1]  # built by a service of the file, not pulled
            ep = (svc.get("entrypoint") or json.loads(final["ENTRYPOINT"]))[0]
            assert ep in scripts, f"{name}: {ep} is no console script of the project"
    server_image = [(i, a) for stage in dockerfile("deploy/server.Dockerfile") for i, a in stage]
    for pkg in ("server", "loadtest", "protos"):  # cnn-serve, cnn-loadtest and their generated stubs
        assert ("COPY", f"{pkg} {pkg}") in server_image

    serve = pyproject()["project"]["optional-dependencies"]["serve"]
    assert not [r for r in serve if re.match(r"torch", r, re.I)]
    pip = [a for i, a in server_image if i == "RUN" and "pip" in a]
    assert any('".[serve]"' in a or "'.[serve]'" in a for a in pip)
    extras = {e for a in pip for group in re.findall(r"\.\[([^\]]*)\]", a) for e in group.split(",")}
    assert extras == {"serve"}
    assert not [a for a in pip if re.search(r"\btorch", a)]


def test_server_image_copies_no_trainer_or_exporter_file() -> None:
    sources = [PurePosixPath(src) for srcs, _ in context_copies(SERVER_DOCKERFILE) for src in srcs]
    assert sources and HERE not in sources, "the server image must not copy the whole checkout"
    assert not [s for s in sources if s.parts[0] in ("trainer", "exporter")]
    assert not [
        s
        for s in sources
        if s.parts[0] == "cnnstack" and s.parts[1:2] not in (("__init__.py",), ("cli.py",), ("contract",))
    ]


def test_server_image_installs_the_contract_server_loadtest_and_protos_only(
    server_wheel: zipfile.ZipFile,
) -> None:
    files = [n for n in server_wheel.namelist() if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in files} == SERVER_PACKAGES
    assert "cnnstack/contract/__init__.py" in files
    assert not [
        n
        for n in files
        if n.startswith("cnnstack/")
        and not n.startswith(("cnnstack/__init__.py", "cnnstack/cli.py", "cnnstack/contract/"))
    ]


def test_server_image_carries_every_module_the_server_imports(server_wheel: zipfile.ZipFile) -> None:
    code = (
        "import json, sys; import server.__main__, server.app, server.healthcheck, loadtest.__main__; "
        "print(json.dumps(sorted(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [Path(f).resolve() for f in json.loads(proc.stdout)]
    ours = [
        f.relative_to(ROOT).as_posix()
        for f in loaded
        if f.is_relative_to(ROOT) and not f.is_relative_to(sys.prefix)
    ]
    assert ours and not [f for f in ours if f.split("/")[0] in ("trainer", "exporter")]
    assert set(ours) <= set(server_wheel.namelist()), "imported by the server, missing from its image"
    assert not [f for f in loaded if "torch" in f.parts]


def test_server_image_scripts_are_the_checkouts_and_all_run_there(server_wheel: zipfile.ZipFile) -> None:
    ours, theirs = pyproject(), pyproject("deploy/server.pyproject.toml")
    assert (
        theirs["project"]["optional-dependencies"]["serve"]
        == ours["project"]["optional-dependencies"]["serve"]
    )
    scripts = wheel_scripts(server_wheel)
    assert scripts == {
        "cnn-serve": ours["project"]["scripts"]["cnn-serve"],
        "cnn-loadtest": ours["project"]["scripts"]["cnn-loadtest"],
    }
    for target in scripts.values():
        assert target.split(":")[0].replace(".", "/") + ".py" in server_wheel.namelist()
    for name, svc in services().items():
        if svc.get("image") == f"cnnstack-server:{version()}":
            ep = (svc.get("entrypoint") or json.loads(image(svc)[1]["ENTRYPOINT"]))[0]
            assert ep in scripts, f"{name}: {ep} is not installed in the server image"


def test_a_gpu_deployment_asks_for_cuda_not_auto() -> None:
    for name, cfg in server_configs().items():
        devices = services()[name]["deploy"]["resources"]["reservations"]["devices"]
        if any("gpu" in d["capabilities"] for d in devices):
            assert cfg.device == "cuda", f"{name}: device {cfg.device} on a GPU could quietly serve on CPU"
    assert trainer_parser().parse_args(services()["trainer"]["command"]).device == "cuda"
    from packaging.requirements import Requirement

    serve = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["serve"]]
    linux = {"sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    (ort,) = [r for r in serve if r.name.startswith("onnxruntime") and r.marker and r.marker.evaluate(linux)]
    assert ort.name == "onnxruntime-gpu" and ort.extras == {"cuda", "cudnn"}  # CUDA 13 + cuDNN 9 wheels


EXACT_TAG = re.compile(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*")  # registry/name:1.2.3[-variant]


def test_base_images_and_pulled_images_have_exact_tags() -> None:
    for rel in ("deploy/server.Dockerfile", "deploy/trainer.Dockerfile"):
        for stage in dockerfile(rel):
            ref = stage[0][1].split()[0]
            assert EXACT_TAG.fullmatch(ref) and "latest" not in ref, f"{rel}: FROM {ref}"
    for name, svc in services().items():
        ref = svc.get("image", "")
        if not ref.startswith("cnnstack-"):  # built here; everything else is pulled
            assert EXACT_TAG.fullmatch(ref) and "latest" not in ref, f"{name}: image {ref}"


def test_the_trainer_image_has_the_projects_cuda_torch_and_a_c_compiler() -> None:
    (pin,) = [r for r in pyproject()["project"]["optional-dependencies"]["train"] if re.match(r"torch\b", r)]
    final = dockerfile("deploy/trainer.Dockerfile")[-1]
    runs = " ".join(a for i, a in final if i == "RUN")
    assert re.search(rf"--index-url \S+ {re.escape(pin)}(\s|$)", runs), f"the image must install {pin}"
    index = next(a for i, a in final if i == "ARG" and a.startswith("TORCH_INDEX_URL="))
    assert re.fullmatch(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", index), index
    assert re.search(r"apt-get install .*\bbuild-essential\b", runs), (
        "torch.compile on CUDA (Triton) needs gcc"
    )
    assert "[train]" in runs

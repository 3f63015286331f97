"""deploy/*.Dockerfile and the wheels they install agree with the code: base images and tags, what
each image copies and runs as, and that the server's image carries every module the server imports
and nothing of the trainer or exporter. Files are parsed and the server wheel built; no image is
(tests/deploy builds and runs them)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from server.config import ServerConfig
from tests.deploy.files import (
    HERE,
    ROOT,
    SERVER_DOCKERFILE,
    arg_defaults,
    base_images,
    context_copies,
    dockerfile,
    image,
    lay_out_context,
    pyproject,
    server_configs,
    services,
    stage,
)
from trainer.__main__ import build_parser as trainer_parser

SERVER_PACKAGES = {"cnnstack", "server", "loadtest", "protos"}


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


def test_images_are_built_run_project_scripts_and_the_server_has_no_torch() -> None:
    scripts = pyproject()["project"]["scripts"]
    for gpu in (False, True):
        for name, svc in services(gpu).items():
            if "build" in svc:
                assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
            if svc.get("image", "").startswith("cnnstack-"):
                final = image(svc, gpu)[1]  # built by a service of the file, not pulled
                ep = (svc.get("entrypoint") or json.loads(final["ENTRYPOINT"]))[0]
                assert ep in scripts, f"{name}: {ep} is no console script of the project"
    server_image = [(i, a) for st in dockerfile(SERVER_DOCKERFILE) for i, a in st]
    for pkg in ("server", "loadtest", "protos"):  # cnn-serve, cnn-loadtest and their generated stubs
        assert ("COPY", f"{pkg} {pkg}") in server_image
    optional = pyproject()["project"]["optional-dependencies"]
    for extra in ("serve", "serve-gpu", "serve-libs"):
        assert not [r for r in optional[extra] if re.match(r"torch", r, re.I)]
    pip = [a for i, a in server_image if i == "RUN" and "pip" in a]
    # The extra's dependencies, then the package alone (--no-deps) once the sources are copied.
    assert [re.findall(r"\.\[([^\]]*)\]", a) for a in pip] == [["${SERVE_EXTRA}"], []]
    assert "--no-deps" in pip[1] and pip[1].rstrip().endswith(" .")
    assert arg_defaults(SERVER_DOCKERFILE)["SERVE_EXTRA"] == "serve"  # the CPU image by default
    gpu_server = services(gpu=True)["server"]
    assert gpu_server["build"]["args"] == {"SERVE_EXTRA": "serve-gpu"} and "-gpu:" in gpu_server["image"]
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
    assert {"cnnstack/contract/__init__.py", "cnnstack/cli.py"} <= set(files)  # cli: every tool's config
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
    for extra in ("serve", "serve-gpu", "serve-libs"):  # the same, but for the distribution's own name
        own = [
            r.replace("cnnstack-server[", "cnnstack[")
            for r in theirs["project"]["optional-dependencies"][extra]
        ]
        assert own == ours["project"]["optional-dependencies"][extra], extra
    scripts = wheel_scripts(server_wheel)
    assert scripts == {
        "cnn-serve": ours["project"]["scripts"]["cnn-serve"],
        "cnn-loadtest": ours["project"]["scripts"]["cnn-loadtest"],
    }
    for target in scripts.values():
        assert target.split(":")[0].replace(".", "/") + ".py" in server_wheel.namelist()
    for gpu in (False, True):
        for name, svc in services(gpu).items():
            if svc.get("image", "").startswith("cnnstack-server"):
                ep = (svc.get("entrypoint") or json.loads(image(svc, gpu)[1]["ENTRYPOINT"]))[0]
                assert ep in scripts, f"{name}: {ep} is not installed in the server image"


def test_a_gpu_deployment_asks_for_cuda_not_auto() -> None:
    for name, cfg in server_configs(gpu=True).items():
        devices = services(gpu=True)[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
        assert cfg.device == "cuda", f"{name}: device {cfg.device} on a GPU could quietly serve on CPU"
    assert trainer_parser().parse_args(services(gpu=True)["trainer"]["command"]).device == "cuda"
    assert trainer_parser().parse_args(services()["trainer"]["command"]).device == "cpu"
    from packaging.requirements import Requirement

    linux = {"sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    for extra, want in (
        ("serve", ("onnxruntime", set())),
        ("serve-gpu", ("onnxruntime-gpu", {"cuda", "cudnn"})),
    ):
        reqs = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"][extra]]
        (ort,) = [
            r
            for r in reqs
            if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(linux))
        ]
        assert (ort.name, ort.extras) == want  # the GPU image: CUDA 13 + cuDNN 9 wheels; the CPU one: none


EXACT_TAG = re.compile(r"[\w./-]+:v?\d+\.\d+\.\d+[\w.-]*")  # registry/name:1.2.3[-variant]


def test_base_images_are_build_args_and_every_image_has_an_exact_tag() -> None:
    for rel in ("deploy/server.Dockerfile", "deploy/trainer.Dockerfile"):
        assert "PYTHON_BASE" in arg_defaults(rel), f"{rel}: the base image is a build ARG"
        for ref in base_images(rel):
            assert EXACT_TAG.fullmatch(ref) and "latest" not in ref, f"{rel}: FROM {ref}"
    for gpu in (False, True):
        for name, svc in services(gpu).items():
            ref = svc.get("image", "")
            if not ref.startswith("cnnstack-"):  # built here; everything else is pulled
                assert EXACT_TAG.fullmatch(ref) and "latest" not in ref, f"{name}: image {ref}"


def test_the_trainer_images_have_the_projects_torch_and_torchvision_and_cuda_a_c_compiler() -> None:
    rel = "deploy/trainer.Dockerfile"
    optional = pyproject()["project"]["optional-dependencies"]
    (pin,) = [r for r in optional["train-libs"] if re.match(r"torch\b", r)]
    (vision,) = optional["download"]
    args = arg_defaults(rel)
    assert args["TORCH"] == pin and args["TORCHVISION"] == vision.replace(".*", ".0"), "the project's pins"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # the CPU image by default
    runs = " ".join(a for i, a in stage(rel, "build") if i == "RUN")  # the venv both targets copy
    assert re.search(r'--index-url "\$\{TORCH_INDEX_URL\}"\s+\$\{TORCH\} \$\{TORCHVISION\}', runs)
    assert "[train]" in runs
    assert not [a for i, a in stage(rel, "cpu") if i == "RUN"], (
        "the CPU image adds nothing to the copied venv"
    )
    cuda = services(gpu=True)["trainer"]["build"]
    assert cuda["target"] == "cuda" and re.fullmatch(
        r"https://download\.pytorch\.org/whl/cu\d+", cuda["args"]["TORCH_INDEX_URL"]
    )
    cuda_runs = " ".join(a for i, a in stage(rel, "cuda") if i == "RUN")
    assert re.search(r"apt-get install .*\bbuild-essential\b", cuda_runs), (
        "torch.compile on CUDA (Triton) needs gcc"
    )
    assert services()["trainer"]["build"]["target"] == "cpu"


IMAGES = [
    ("deploy/server.Dockerfile", None),
    ("deploy/trainer.Dockerfile", "cpu"),
    ("deploy/trainer.Dockerfile", "cuda"),
]


@pytest.mark.parametrize(("rel", "target"), IMAGES)
def test_images_copy_a_venv_run_as_65534_with_a_home_and_onnxruntime_telemetry_off(
    rel: str, target: str | None
) -> None:
    final = stage(rel, target)
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in final if i == "ENV")))
    assert dict(final)["USER"] == "65534:65534", f"{rel}: runs as root"
    assert env["HOME"] == "/home/cnnstack" and env["PATH"].startswith("/opt/cnnstack/bin:")
    # onnxruntime 1.31's documented opt-out: without it, it writes a device id under $HOME/.cache
    # (and warns at every start where HOME is not writable) and uploads telemetry.
    assert env["ORT_DISABLE_TELEMETRY"] == "1"
    copies = [a for i, a in final if i == "COPY"]
    assert "--from=build /opt/cnnstack /opt/cnnstack" in copies, (
        f"{rel}: the venv is built in one stage, copied"
    )
    assert "--from=build --chown=65534:65534 /home/cnnstack /home/cnnstack" in copies
    assert not [a for i, a in final if i == "RUN" and "pip" in a], (
        f"{rel}: pip in the final image leaves dead layers"
    )
    for instr, args in [x for st in dockerfile(rel) for x in st]:
        if instr == "RUN" and "pip install" in args:  # a CA bundle for pip as a secret, never in a layer
            assert "--mount=type=secret,id=ca_bundle" in args and "PIP_CERT=/run/secrets/ca_bundle" in args


def test_the_server_image_exposes_every_port_and_checks_its_health_through_the_cli() -> None:
    final = dict(stage(SERVER_DOCKERFILE))
    defaults = ServerConfig(repository=Path("/models"))
    assert set(map(int, final["EXPOSE"].split())) == {
        defaults.http_port,
        defaults.port,
        defaults.metrics_port,
    }
    check = final["HEALTHCHECK"].split("CMD", 1)[1].split()
    assert check[:3] == ["python", "-m", "server.healthcheck"] and importlib.util.find_spec(check[2])
    assert check[3:] == ["--port", f'"${{CNN_SERVE_PORT:-{defaults.port}}}"']
    env = dict(re.findall(r"(\w+)=(\S+)", final["ENV"]))
    assert env["CNN_SERVE_HOST"] == "0.0.0.0" and env["CNN_SERVE_REPOSITORY"] == "/models"

"""Packaging: the extras' pins say what the code needs (Python, the generated stubs' runtimes),
every image tag is exact, and the built wheel
installed with only ``[serve]`` in a fresh virtualenv starts ``cnn-serve`` without torch,
matplotlib or onnx."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = ("pyproject.toml", "deploy/server.pyproject.toml")
NOT_IN_SERVE = ("torch", "onnx", "matplotlib", "onnxscript", "tqdm", "torchvision")


def project(rel: str = "pyproject.toml") -> dict:
    return pytest.importorskip("tomllib").loads((ROOT / rel).read_text())


def requirements(rel: str, extra: str) -> list:
    """The extra's requirements, the project's own extras it names followed (``cnnstack[serve-libs]``)."""
    from packaging.requirements import Requirement

    meta = project(rel)["project"]
    out, todo, seen = [], [extra], set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        for r in map(Requirement, meta["optional-dependencies"][name]):
            if r.name == meta["name"]:
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def stub_versions() -> tuple[str, str]:
    """(grpcio, protobuf) versions the generated stubs check at import."""
    grpc_v = {
        re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", p.read_text()).group(1)  # type: ignore[union-attr]
        for p in ROOT.glob("protos/**/*_pb2_grpc.py")
    }
    pb_v = {
        ".".join(re.search(r"Domain.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", p.read_text()).groups())  # type: ignore[union-attr]
        for p in ROOT.glob("protos/**/*_pb2.py")
    }
    assert len(grpc_v) == 1 and len(pb_v) == 1, (grpc_v, pb_v)
    return grpc_v.pop(), pb_v.pop()


def test_requires_python_is_what_the_code_uses() -> None:
    for rel in PYPROJECTS:
        assert project(rel)["project"]["requires-python"] == ">=3.11"  # asyncio.Runner, timeout_at
    assert project()["tool"]["ruff"]["target-version"] == "py311"


@pytest.mark.parametrize("rel", PYPROJECTS)
@pytest.mark.parametrize("extra", ["serve", "serve-gpu"])
def test_serve_carries_only_what_the_server_imports(rel: str, extra: str) -> None:
    names = {r.name.lower() for r in requirements(rel, extra)}
    assert not names & set(NOT_IN_SERVE)
    assert {"grpcio", "protobuf", "prometheus-client", "numpy", "pillow"} <= names
    assert [r.name for r in requirements(rel, "plot")] == ["matplotlib"]


def test_grpc_and_protobuf_lower_bounds_are_what_the_stubs_require() -> None:
    grpc_v, pb_v = stub_versions()
    want = {
        "grpcio": grpc_v,
        "grpcio-health-checking": grpc_v,
        "grpcio-reflection": grpc_v,
        "grpcio-tools": grpc_v,
        "protobuf": pb_v,
    }
    for rel in PYPROJECTS:
        extras = project(rel)["project"]["optional-dependencies"]
        for extra in extras:
            for r in requirements(rel, extra):
                if r.name in want:
                    lows = [s.version for s in r.specifier if s.operator == ">="]
                    assert lows == [want[r.name]], f"{rel} [{extra}] {r}: needs >={want[r.name]}"
                    assert r.specifier.contains(metadata.version(r.name))


@pytest.mark.parametrize("rel", PYPROJECTS)
def test_every_cap_says_why(rel: str) -> None:
    lines = (ROOT / rel).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r'\s*"[^"]*<[^"]*",', line):  # a requirement with an upper bound
            commented = "#" in line or any(lines[j].strip().startswith("#") for j in range(max(0, i - 6), i))
            assert commented, f"{rel}:{i + 1}: {line.strip()} has no comment saying why it is capped"


def image_refs() -> list[tuple[str, str]]:
    """(where, image) for every image compose, the Dockerfiles and the Kubernetes manifests name."""
    out = []
    for f in ("docker-compose.yml", "docker-compose.gpu.yml"):
        compose = yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (ROOT / f).read_text()))
        out += [(f, s["image"]) for s in compose["services"].values() if "image" in s]
    for df in ROOT.glob("deploy/*.Dockerfile"):
        text = df.read_text()
        defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))  # a base image is a build ARG
        stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
        for ref in re.findall(r"^FROM\s+(\S+)", text, re.M):
            ref = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], ref)  # noqa: B023
            if ref not in stages:
                out.append((df.name, ref))
    from tests import kustomize

    for k in ROOT.glob("deploy/kubernetes/*/kustomization.yaml"):  # as kustomize tags them
        text = json.dumps(kustomize.render(k.parent))
        out += [(k.parent.name, m) for m in re.findall(r'"image": "([^"]+)"', text)]
    return out


def test_every_image_tag_is_exact() -> None:
    version = project()["project"]["version"]
    refs = image_refs()
    assert len(refs) > 8
    for where, ref in refs:
        name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        assert tag, f"{where}: {ref} has no tag"
        assert "latest" not in tag and re.search(r"\d+\.\d+\.\d+", tag), f"{where}: {ref} is not an exact tag"
        if name.split("/")[-1].startswith("cnnstack-"):
            assert tag == version, (
                f"{where}: our own image {ref} is tagged with the project version {version}"
            )


def test_dockerignore_keeps_the_build_context_to_sources() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "artifacts", "data", "runs"} <= ignored


# ---------------------------------------------------------------- the wheel in a fresh virtualenv


def sources(dst: Path) -> Path:
    """The checkout's files (tracked or not ignored) copied to ``dst``: building there leaves no
    build/ or egg-info in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def closure(requires: list[str], extra: str, own: str = "cnnstack") -> dict[str, metadata.Distribution]:
    """Installed distributions these requirements pull in (markers evaluated here, the extras each
    requirement asks for followed), recursively; the project's own extras (``cnnstack[serve-libs]``)
    are followed in ``requires``, the project itself is not one of them."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    todo = [(r, {extra}) for r in requires]
    while todo:
        text, extras = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        key = req.name.lower().replace("_", "-")
        if key == own:
            todo += [(r, set(req.extras)) for r in requires]
            continue
        if key in found:
            continue
        dist = metadata.distribution(req.name)
        assert req.specifier.contains(dist.version, prereleases=True), (
            f"{req} but {dist.version} is installed"
        )
        found[key] = dist
        todo += [(r, {"", *req.extras}) for r in dist.requires or []]
    return found


def link_distributions(dists: dict[str, metadata.Distribution], site: Path) -> None:
    """Each distribution's files, linked one by one from this virtualenv into ``site`` (quick, no
    download, and nothing else of this virtualenv visible there; namespace folders such as
    ``nvidia/`` or ``google/`` hold several distributions)."""
    for dist in dists.values():
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            rel = Path(str(f))
            if rel.parts[0] == ".." or not (base / rel).exists() or (site / rel).exists():
                continue
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            (site / rel).symlink_to(base / rel)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv holding the project's wheel and, beside it, only what ``[serve]`` requires."""
    pytest.importorskip("packaging")
    tmp = tmp_path_factory.mktemp("fresh")
    src, wheels, venv = sources(tmp / "src"), tmp / "wheels", tmp / "venv"
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("cnnstack-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        requires = [
            v
            for k, v in (ln.split(": ", 1) for ln in zf.read(meta).decode().splitlines() if ": " in ln)
            if k == "Requires-Dist"
        ]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    link_distributions(closure(requires, "serve"), tmp / "serve-deps")
    (site / "serve-deps.pth").write_text(str(tmp / "serve-deps") + "\n")
    # pip resolves [serve] against what is there; --no-index: anything missing fails the install.
    install = subprocess.run(
        [*pip, "--python", str(py), "install", "-q", "--no-index", f"{wheel}[serve]"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    yield venv


def fresh_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.slow
def test_the_wheel_with_serve_alone_installs_and_serves(fresh_venv: Path, tmp_path: Path) -> None:
    import grpc

    from protos.cnnstack.classifier.v1 import classifier_pb2_grpc as pb_grpc
    from tests.server.helpers import publish, tiny_model
    from tests.server.worker_helpers import request

    py, bin_ = fresh_venv / "bin" / "python", fresh_venv / "bin"
    absent = subprocess.run(
        [
            str(py),
            "-c",
            f"import importlib.util as u; print([m for m in {list(NOT_IN_SERVE)!r} if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=fresh_env(),
        timeout=60,
    )
    assert absent.stdout.strip() == "[]", absent.stdout + absent.stderr
    root = tmp_path / "repo"
    data, tm = tiny_model()
    publish(root, "tiny", 1, data, tm.meta)
    cmd = [
        str(bin_ / "cnn-serve"),
        "--repository",
        str(root),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--workers",
        "2",
        "--poll-interval-s",
        "0",
    ]
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=fresh_env(), stdout=subprocess.PIPE, stderr=err, text=True
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the 'listening' line (or EOF if it failed)
        assert line, log.read_text()[-3000:]
        listening = json.loads(line)
        assert listening["event"] == "listening" and len(listening["workers"]) == 2
        with grpc.insecure_channel(f"127.0.0.1:{listening['port']}") as ch:
            reply = pb_grpc.ClassifierStub(ch).Classify(request(), timeout=30)
        assert reply.results[0].predictions
    finally:
        proc.terminate()
        code = proc.wait(60)
    assert code == 0, log.read_text()[-3000:]
    plot = subprocess.run(
        [str(bin_ / "cnn-loadtest"), "--target", "127.0.0.1:1", "--model", "m", "--plot", "p.png"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=fresh_env(),
        timeout=60,
    )
    assert plot.returncode == 2 and "cnnstack[plot]" in plot.stderr

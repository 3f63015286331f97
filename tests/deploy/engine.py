"""The container engine for the container tests: podman (or docker) found on PATH, the images built
by deploy/build.sh, and a Debian bookworm base made locally with mmdebstrap where no registry can
be reached, cached outside the checkout between runs on one machine.

Cached, and why that is honest: the base root file system (a tar under ``CNN_CONTAINER_CACHE``,
default ``~/.cache/cnnstack``, and the image imported from it), the engine's layer cache and pip's
download cache mount. The layers are keyed by what went into them (the base, each COPY's content,
each RUN line), so a changed source file rebuilds what depends on it; only the base ages, and
deleting the tar makes a new one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/cnnstack-base:bookworm"
# What deploy/*.Dockerfile need of a base: python3 with its venv module (pip comes from
# ensurepip), the CA certificates; docs, manuals and translations left out as the slim images do.
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
SLIM = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale", "info")]
TORCH_WHEEL_GLOB = "torch-2.13.0+cpu-cp311-*.whl"  # the pin, CPU build, the base's Python 3.11


def engine() -> str:
    """podman (preferred) or docker that answers; skips the test otherwise."""
    for name in ("podman", "docker"):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=60).returncode == 0:
            return path
    pytest.skip("no container engine: podman or docker must be installed and working")


def run(*argv: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnnstack"
    path = Path(os.environ.get("CNN_CONTAINER_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_image(eng: str) -> str:
    """The official base where a registry answers is not tried (none does here): a Debian bookworm
    root with python3 made by mmdebstrap, imported once and kept."""
    if run(eng, "image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    tar = cache_dir() / "debian-bookworm-python3.tar"
    if not tar.is_file():
        if shutil.which("mmdebstrap") is None:
            pytest.skip("mmdebstrap is not installed (it makes the Debian base; .ci/setup installs it)")
        part = tar.with_suffix(".part")
        cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}", *SLIM]
        run(*cmd, "bookworm", str(part), timeout=900)
        part.rename(tar)
    run(eng, "import", str(tar), BASE_IMAGE, timeout=300)
    return BASE_IMAGE


def ca_bundle() -> str | None:
    """The CA bundle pip trusts on this host (pip config's cert, else the system's), for pip in the
    build: TLS to PyPI may be re-signed on the way out, as behind many corporate proxies."""
    proc = run(shutil.which("python3") or "python3", "-m", "pip", "config", "get", "global.cert", check=False)
    for candidate in (proc.stdout.strip(), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def local_torch_wheel() -> Path | None:
    """A torch-2.13.0+cpu wheel in one of pip's configured find-links folders, if any."""
    proc = run(shutil.which("python3") or "python3", "-m", "pip", "config", "list", check=False)
    folders = [
        part
        for line in proc.stdout.splitlines()
        if line.split("=", 1)[0].endswith("find-links")
        for part in line.split("=", 1)[1].strip("'\"").split()
    ]
    for folder in folders:
        found = sorted(Path(folder.removeprefix("file://")).glob(TORCH_WHEEL_GLOB))
        if found:
            return found[-1]
    return None


def torch_index_reachable() -> bool:
    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10).close()
    except (urllib.error.URLError, OSError):
        return False
    return True


def build(eng: str, *targets: str) -> dict[str, float]:
    """deploy/build.sh TARGETS on the local base; seconds each took."""
    env = {**os.environ, "ENGINE": eng, "SERVER_BASE": base_image(eng), "TRAINER_BASE": base_image(eng)}
    bundle = ca_bundle()
    if bundle:
        env["CA_BUNDLE"] = bundle
    if "trainer" in targets and not torch_index_reachable():
        wheel = local_torch_wheel()
        if wheel is None:
            pytest.skip("PyTorch's CPU index is unreachable and pip knows no local torch-2.13.0+cpu wheel")
        env["TORCH_WHEEL"] = str(wheel)
    proc = run(str(ROOT / "deploy" / "build.sh"), *targets, env=env, timeout=1800)
    # Each changed build leaves its predecessors' layers behind, untagged: drop those a day old, so a
    # machine that runs CI often does not fill its disk, and today's layers still serve the next run.
    run(eng, "image", "prune", "-f", "--filter", "until=24h", check=False, timeout=300)
    return {
        line.split()[1].rstrip(":"): float(line.split()[-2])
        for line in proc.stdout.splitlines()
        if line.startswith("[build] ") and line.endswith(" s")
    }


def image_size_mb(eng: str, ref: str) -> float:
    out = run(eng, "image", "inspect", ref, "--format", "{{json .Size}}").stdout
    return json.loads(out) / 1e6

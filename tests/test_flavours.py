"""The install flavours never mix: onnxruntime and onnxruntime-gpu own the same module, so every
extra, every install the project documents or runs, and this environment hold exactly one of
them on every platform (the GPU one where PyPI has a wheel), uv refuses the mixes, and the
runtime is pinned to the tested minor."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
import yaml

from tests.test_packaging import PYPROJECTS, ROOT, project, requirements

PLATFORMS = {  # (sys_platform, platform_machine) -> PyPI has an onnxruntime-gpu wheel
    ("linux", "x86_64"): True,
    ("win32", "AMD64"): True,
    ("linux", "aarch64"): False,
    ("darwin", "arm64"): False,
    ("darwin", "x86_64"): False,
    ("win32", "ARM64"): False,
}
RUNTIMES = {"onnxruntime", "onnxruntime-gpu"}  # both own the module onnxruntime: never both
CPU_EXTRAS, GPU_EXTRAS = {"serve", "train"}, {"serve-gpu", "train-gpu"}


def runtimes(rel: str, extras: set[str], platform: tuple[str, str]) -> list[str]:
    """The onnxruntime distributions an install of ``extras`` resolves to on ``platform``."""
    env = {"sys_platform": platform[0], "platform_machine": platform[1], "extra": ""}
    chosen = {
        r.name
        for e in extras
        for r in requirements(rel, e)
        if r.name in RUNTIMES and (r.marker is None or r.marker.evaluate(env))
    }
    return sorted(chosen)


@pytest.mark.parametrize("extra", sorted(CPU_EXTRAS | GPU_EXTRAS))
def test_each_flavour_has_exactly_one_onnxruntime_on_every_platform(extra: str) -> None:
    for platform, has_gpu_wheel in PLATFORMS.items():
        want = ["onnxruntime-gpu"] if extra in GPU_EXTRAS and has_gpu_wheel else ["onnxruntime"]
        assert runtimes("pyproject.toml", {extra}, platform) == want, (extra, platform)
    gpu_linux = [r for r in requirements("pyproject.toml", extra) if r.name == "onnxruntime-gpu" and r.extras]
    assert [sorted(r.extras) for r in gpu_linux] == ([["cuda", "cudnn"]] if extra in GPU_EXTRAS else [])


def documented_installs() -> list[tuple[str, set[str]]]:
    """(where, extras) of every install the project documents or runs: README and docs (``.[a,b]``,
    ``cnnstack[a]``), .ci/setup's flavours, the Dockerfiles (their ARG default and every build arg
    compose gives them)."""
    out = []
    for rel in ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md"))]:
        for group in re.findall(r"(?:\.|cnnstack)\[([a-z][a-z,-]*)\]", (ROOT / rel).read_text()):
            out.append((rel, set(group.split(","))))
    for group in re.findall(r"extras=([a-z,-]+)", (ROOT / ".ci/setup").read_text()):
        out.append((".ci/setup", set(group.split(","))))
    compose_args = [
        svc.get("build", {}).get("args", {})
        for f in ("docker-compose.yml", "docker-compose.gpu.yml")
        for svc in yaml.safe_load((ROOT / f).read_text())["services"].values()
        if isinstance(svc.get("build"), dict)
    ]
    for df in ROOT.glob("deploy/*.Dockerfile"):
        text = df.read_text()
        defaults = dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))
        for args in [{}, *compose_args]:
            values = {**defaults, **args}
            for group in re.findall(r"\.\[([^\]]+)\]", text):
                group = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), group)  # noqa: B023
                out.append((df.name, set(group.split(","))))
    return out


def test_no_documented_install_resolves_both_runtimes() -> None:
    """Every install set the project documents or runs has one runtime on every platform: plain
    onnxruntime where it names a CPU extra, onnxruntime-gpu (where PyPI has it) for a GPU extra."""
    installs = documented_installs()
    named = {e for _, extras in installs for e in extras}
    assert {"serve", "serve-gpu", "train", "train-gpu"} <= named, named
    for where, extras in installs:
        extras = extras & set(project()["project"]["optional-dependencies"])
        if not extras & (CPU_EXTRAS | GPU_EXTRAS):
            continue  # [plot], [dev], [download]: no runtime of their own
        assert not (extras & CPU_EXTRAS and extras & GPU_EXTRAS), (
            f"{where}: {sorted(extras)} mixes the flavours"
        )
        for platform in PLATFORMS:
            found = runtimes("pyproject.toml", extras, platform)
            assert len(found) == 1, f"{where}: [{','.join(sorted(extras))}] on {platform} resolves {found}"


def test_uv_refuses_every_mix_of_the_flavours() -> None:
    declared = {frozenset(c["extra"] for c in pair) for pair in project()["tool"]["uv"]["conflicts"]}
    assert declared == {frozenset({c, g}) for c in CPU_EXTRAS for g in GPU_EXTRAS}


def test_this_environment_has_one_runtime_and_a_cpu_one_nothing_nvidia() -> None:
    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    (runtime,) = names & RUNTIMES
    if runtime == "onnxruntime":
        assert not [n for n in names if n.startswith("nvidia-")], "the CPU flavour holds NVIDIA wheels"


def test_onnxruntime_is_pinned_to_the_tested_minor() -> None:
    (installed,) = [metadata.version(n) for n in RUNTIMES if _installed(n)]
    minor = ".".join(installed.split(".")[:2])
    for rel in PYPROJECTS:
        for extra in ("serve", "serve-gpu"):
            for r in requirements(rel, extra):
                if r.name in RUNTIMES:
                    assert str(r.specifier) == f"=={minor}.*" and r.specifier.contains(installed)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True

"""Reading docker-compose*.yml and deploy/*.Dockerfile as the engines do, for the tests that check
them against the code (tests/test_deploy.py, tests/test_images.py) without running anything."""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from server.config import ENV_PREFIX, ServerConfig

ROOT = Path(__file__).resolve().parents[2]
HERE = PurePosixPath(".")
SERVER_DOCKERFILE = "deploy/server.Dockerfile"


@functools.cache
def load_yaml(rel: str) -> Any:
    # compose's ${VAR:-default} with every VAR unset
    return yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (ROOT / rel).read_text()))


def merge(base: Any, override: Any) -> Any:
    """Compose's override rule for what these files use: mappings merge key by key, the rest is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def services(gpu: bool = False) -> dict[str, dict[str, Any]]:
    """docker-compose.yml's services; with ``gpu``, as docker-compose.gpu.yml overrides them."""
    base = load_yaml("docker-compose.yml")["services"]
    return merge(base, load_yaml("docker-compose.gpu.yml")["services"]) if gpu else base


def server_configs(gpu: bool = False) -> dict[str, ServerConfig]:
    """Every service running the server, with the config its environment gives it."""
    out = {}
    for name, svc in services(gpu).items():
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
    """Stages of a Dockerfile, each a list of (INSTRUCTION, arguments); the ARGs before the first
    FROM (which FROM lines may use) are left out."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / rel).read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instr, _, rest = line.strip().partition(" ")
            if instr.upper() == "FROM":
                stages.append([])
            if stages:
                stages[-1].append((instr.upper(), rest.strip()))
    return stages


def arg_defaults(rel: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", (ROOT / rel).read_text(), re.M))


def stage(rel: str, target: str | None = None) -> list[tuple[str, str]]:
    """The instructions a target (default: the last stage) runs, those of the stages it is built
    FROM included, first to last."""
    stages = dockerfile(rel)
    named = {st[0][1].split()[-1]: st for st in stages if " as " in st[0][1].lower()}
    chosen = named[target] if target else stages[-1]
    parent = chosen[0][1].split()[0]
    return (stage(rel, parent) if parent in named else []) + chosen


def base_images(rel: str) -> list[str]:
    """The images the Dockerfile's stages start from (ARG defaults filled in; stages skipped)."""
    stages = dockerfile(rel)
    names = {st[0][1].split()[-1] for st in stages if " as " in st[0][1].lower()}
    refs = [
        re.sub(r"\$\{(\w+)\}", lambda m: arg_defaults(rel)[m.group(1)], st[0][1].split()[0]) for st in stages
    ]
    return [r for r in refs if r not in names]


def image(svc: dict[str, Any], gpu: bool = False) -> tuple[str, dict[str, str]]:
    """(Dockerfile, last value of each instruction its target runs) of a service's image."""
    built = {s["image"]: s["build"] for s in services(gpu).values() if "build" in s}
    assert svc["image"] in built, f"image {svc['image']} is built by no service (compose would pull it)"
    build = built[svc["image"]]
    return build["dockerfile"], dict(stage(build["dockerfile"], build.get("target")))


def run_user(svc: dict[str, Any], gpu: bool = False) -> str:
    return str(svc.get("user") or image(svc, gpu)[1].get("USER", "0")).split(":")[0]


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

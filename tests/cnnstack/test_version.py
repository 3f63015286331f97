"""One version, written once (pyproject.toml): the code reads it from the installed distribution,
and everything else that carries it (the server image's distribution, image tags, the server's
KServe metadata) must say the same."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from cnnstack import version

ROOT = Path(__file__).resolve().parents[2]


def project_version(path: Path) -> str:
    return tomllib.loads(path.read_text())["project"]["version"]


def test_the_code_reads_the_version_pyproject_writes() -> None:
    import cnnstack

    assert version() == project_version(ROOT / "pyproject.toml") == cnnstack.__version__


def test_the_server_image_distribution_has_the_same_version() -> None:
    assert project_version(ROOT / "deploy" / "server.pyproject.toml") == version()


def test_every_image_of_ours_is_tagged_with_the_version() -> None:
    tags = []
    for compose in ROOT.glob("docker-compose*.yml"):
        tags += re.findall(r"image:\s*cnnstack-[a-z-]+:(\S+)", compose.read_text())
    for kustomization in (ROOT / "deploy" / "kubernetes").rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        tags += [
            i["newTag"] for i in doc.get("images", []) if i["name"].startswith("cnnstack-") and "newTag" in i
        ]
    assert tags and set(tags) == {version()}, tags


def test_the_server_reports_the_version() -> None:
    from server.api.kserve.protocol import server_metadata

    assert server_metadata()["version"] == version()

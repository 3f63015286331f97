"""deploy/kubernetes rendered as ``kustomize build`` does, for the tests: ``kubectl kustomize`` where
it is installed, else the subset of kustomize these kustomizations use, in Python: ``resources``
(files and directories), ``patches`` given by ``path`` (strategic merge: maps merged, lists of
named items merged by ``name``, ``null`` removing a key, ``$patch: delete`` removing a resource)
and ``images`` (``newName`` / ``newTag``). Anything else in a kustomization is an error here, so the
fallback never silently renders less than kubectl would."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

KNOWN = {"apiVersion", "kind", "resources", "patches", "images"}


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(folder: Path, use_kubectl: bool | None = None) -> list[dict[str, Any]]:
    if use_kubectl is None:
        use_kubectl = kubectl() is not None
    if use_kubectl:
        out = subprocess.run(
            [str(kubectl()), "kustomize", str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return build(folder)


def build(folder: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN
    assert not unknown, f"{folder}: the Python fallback does not know {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = folder / res
        docs += build(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"{folder}: only file patches, got {patch}"
        docs = apply_patch(docs, yaml.safe_load((folder / patch["path"]).read_text()))
    for image in k.get("images", []):
        set_image(docs, image)
    return docs


def apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any]) -> list[dict[str, Any]]:
    key = (patch["kind"], patch["metadata"]["name"])
    hits = [d for d in docs if (d["kind"], d["metadata"]["name"]) == key]
    assert len(hits) == 1, f"patch target {key}: {len(hits)} resources"
    if patch.get("$patch") == "delete":
        return [d for d in docs if d is not hits[0]]
    merged = merge(hits[0], {k: v for k, v in patch.items() if k != "$patch"})
    return [merged if d is hits[0] else d for d in docs]


def merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if at is None:
                out.append(copy.deepcopy({k: v for k, v in item.items() if v is not None}))
            else:
                out[at] = merge(out[at], item)
        return out
    return copy.deepcopy(patch)


def set_image(docs: list[dict[str, Any]], image: dict[str, str]) -> None:
    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("image") == image["name"] or str(node.get("image", "")).startswith(
                image["name"] + ":"
            ):
                name = image.get("newName", image["name"])
                tag = image.get("newTag", str(node["image"]).partition(":")[2])
                node["image"] = f"{name}:{tag}" if tag else name
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(docs)

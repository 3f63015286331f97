"""The server's import table (docs/architecture.md, "Which server part may import which") held
against the code: every module of ``server/`` belongs to one part, and each import it makes (its
syntax tree, function-level and TYPE_CHECKING imports included) goes to a part the table allows."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TABLE_HEADING = "### Which server part may import which"
FORBIDDEN = ("torch", "trainer", "exporter", "cnnstack.pipeline", "cnnstack.serverproc")


def read_table() -> dict[str, tuple[list[str], set[str]]]:
    """part -> (module patterns, parts it may import), from the doc's table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split(TABLE_HEADING, 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    table = {}
    for row in rows[1:]:  # the first is the header
        part, modules, may = (cell.strip() for cell in row.strip("|").split("|"))
        if not re.fullmatch(r"[a-z]+", part):
            break
        table[part] = (re.findall(r"`([^`]+)`", modules), {p.strip() for p in may.split(",")})
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str, table: dict[str, tuple[list[str], set[str]]]) -> str | None:
    best, best_len = None, -1
    for part, (patterns, _) in table.items():
        for pattern in patterns:
            prefix = pattern[:-2] if pattern.endswith(".*") else None
            hit = module.startswith(prefix + ".") or module == prefix if prefix else module == pattern
            if hit and len(pattern) > best_len:
                best, best_len = part, len(pattern)
    return best


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, absolute; ``from pkg import name`` counts as ``pkg.name``
    when that is a module of ours (so ``from server.runtime import share`` is runtime.share)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[
                    : len(module.split(".")) - node.level + (path.name == "__init__.py")
                ]
                base = ".".join([*package, *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")}
    return out


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


TABLE = read_table()
MODULES = sorted((ROOT / "server").rglob("*.py"))


def test_the_table_names_every_part_it_lets_import() -> None:
    assert set(TABLE) == {"foundation", "runtime", "api", "assembly", "scaleout", "entry"}
    for part, (_, may) in TABLE.items():
        assert may <= set(TABLE), (part, may - set(TABLE))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_server_module_imports_only_what_its_part_may(path: Path) -> None:
    module = module_name(path)
    part = part_of(module, TABLE)
    assert part is not None, f"{module} belongs to no part of the table in docs/architecture.md"
    allowed = TABLE[part][1]
    for name in imports_of(path, module):
        assert not any(name == f or name.startswith(f + ".") for f in FORBIDDEN), f"{module} imports {name}"
        if name != "server" and not name.startswith("server."):
            continue
        target = part_of(name, TABLE)
        assert target in allowed, (
            f"{module} ({part}) imports {name} ({target}); {part} may import {sorted(allowed)}"
        )


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from server.api.dataplane import Inference\n\nfrom . import batcher\n")
    found = imports_of(fake, "server.runtime.fake")
    assert {"server.api.dataplane", "server.runtime.batcher"} <= found
    assert part_of("server.api.dataplane", TABLE) not in TABLE["runtime"][1]  # runtime may not import api

"""Imports go one way (docs/architecture.md): v1 <- common <- {worker, controller} <- headnode.

Every ``import`` statement of every module is read, function-level (lazy) imports included, so
a dependency cannot hide inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> its folder, and the edgeheads packages it may import (besides itself)
PACKAGES = {
    "edgeheads.v1": (ROOT / "protos" / "edgeheads" / "v1", set()),
    "edgeheads.common": (ROOT / "protos" / "edgeheads" / "common", {"edgeheads.v1"}),
    "edgeheads.worker": (ROOT / "worker", {"edgeheads.v1", "edgeheads.common"}),
    "edgeheads.controller": (ROOT / "controller", {"edgeheads.v1", "edgeheads.common"}),
    "edgeheads.headnode": (ROOT / "headnode", {"edgeheads.v1", "edgeheads.common", "edgeheads.worker",
                                                "edgeheads.controller"}),
}


def _package_of(module: str) -> str | None:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), None)


def edgeheads_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every edgeheads import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "edgeheads" or m.startswith("edgeheads.")]


def violations(package: str, folder: Path, allowed: set[str]) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in edgeheads_imports(path):
            target = _package_of(module)
            where = f"{path.relative_to(folder)}:{line}"
            if target is None:
                bad.append(f"{where}: imports {module}, which is in no known package")
            elif target != package and target not in allowed:
                bad.append(f"{where}: {package} must not import {module}")
    return bad


@pytest.mark.parametrize("package", list(PACKAGES))
def test_imports_go_one_way(package):
    folder, allowed = PACKAGES[package]
    assert folder.is_dir()
    assert violations(package, folder, allowed) == []


def test_the_walk_sees_a_wrong_import(tmp_path):
    """The check itself can fail: a worker module that imports the head node, even lazily."""
    (tmp_path / "bad.py").write_text("import edgeheads.v1\n\ndef f():\n    from edgeheads.headnode.cli import main\n")
    assert violations("edgeheads.worker", tmp_path, PACKAGES["edgeheads.worker"][1]) == [
        "bad.py:4: edgeheads.worker must not import edgeheads.headnode.cli"]

"""The layout is the architecture: imports point from the front ends to the core, never back.

``dimse``, ``dicomweb`` and ``viewer_links`` import ``gateway`` and never each other; ``gateway``
imports none of them except in its composition root (``gateway/server.py``, ``gateway/cli.py``).
The SQL stays in the core: a front end listed in :data:`NO_DATABASE` imports neither
``gateway.models`` nor ``sqlalchemy`` (its database access is a core module's, e.g.
``gateway.viewer_registry``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FRONT_ENDS = {"dimse", "dicomweb", "viewer_links"}
COMPOSITION_ROOT = {"gateway/server.py", "gateway/cli.py"}
NO_DATABASE = {"viewer_links"}  # front ends whose database access lives in the core
DATABASE_MODULES = {"gateway.models", "sqlalchemy"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, with each of its parents (``a.b.c`` gives a, a.b, a.b.c).

    Imports inside functions count too: ``ast.walk`` visits the whole tree.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return modules


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FRONT_ENDS))
def test_front_ends_do_not_import_each_other(package: str) -> None:
    others = FRONT_ENDS - {package}
    for path in python_files(package):
        wrong = imported_packages(path) & others
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_core_imports_no_front_end_outside_the_composition_root() -> None:
    for path in python_files("gateway"):
        relative = str(path.relative_to(ROOT))
        if relative in COMPOSITION_ROOT:
            continue
        wrong = imported_packages(path) & FRONT_ENDS
        assert not wrong, f"{relative} imports {sorted(wrong)}"


@pytest.mark.parametrize("package", sorted(NO_DATABASE))
def test_front_ends_leave_the_database_to_the_core(package: str) -> None:
    for path in python_files(package):
        wrong = imported_modules(path) & DATABASE_MODULES
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_checker_sees_a_database_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway import models\n"
                   "def f():\n    from sqlalchemy.orm import Session\n")
    assert DATABASE_MODULES <= imported_modules(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from dicomweb.app import create_app\nimport viewer_links.tokens\n")
    assert imported_packages(bad) == {"dicomweb", "viewer_links"}

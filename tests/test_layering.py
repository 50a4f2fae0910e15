"""The layout is the architecture: imports point from the front ends to the core, never back.

``dimse``, ``dicomweb`` and ``viewer_links`` import ``gateway`` and never each other; ``gateway``
imports none of them, nor aiohttp, except in its composition root (``gateway/server.py``,
``gateway/cli.py``). The SQL stays in the core: no front end imports ``gateway.models`` or
``sqlalchemy`` (they read instances through ``gateway.instances``; the viewer links' registry is
``gateway.viewer_registry``). Within ``dicomweb`` the imports form no cycle: the route modules
read their request context from ``dicomweb.context``, and ``dicomweb/app.py``, which imports
them to build the application, is imported by none of them. Inside ``dimse``, the services
both ways of running an association share (``dimse.services``) import neither way
(``dimse.loop``, ``dimse.toolkit``), and the own loop does not import pynetdicom's handlers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FRONT_ENDS = {"dimse", "dicomweb", "viewer_links"}
COMPOSITION_ROOT = {"gateway/server.py", "gateway/cli.py"}
# What only the composition root may bring into the core: the front ends and the HTTP stack.
COMPOSITION_ONLY = FRONT_ENDS | {"aiohttp"}
# The index's models and SQL stay in the core: front ends read instances through
# gateway.instances (one visibility rule, one reference type), never rows.
INDEX_INTERNALS = {"sqlalchemy", "gateway.models"}
# Inside dimse: subpackage -> the subpackages it may not import.
DIMSE_WAYS = {"services": {"dimse.loop", "dimse.toolkit"}, "loop": {"dimse.toolkit"}}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name (and each of its parents)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for module in modules:
            parts = module.split(".")
            names.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return names


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FRONT_ENDS))
def test_front_ends_do_not_import_each_other(package: str) -> None:
    others = FRONT_ENDS - {package}
    for path in python_files(package):
        wrong = imported_packages(path) & others
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_core_imports_no_front_end_nor_aiohttp_outside_the_composition_root() -> None:
    checked = 0
    for path in python_files("gateway"):
        relative = str(path.relative_to(ROOT))
        if relative in COMPOSITION_ROOT:
            continue
        wrong = imported_packages(path) & COMPOSITION_ONLY
        assert not wrong, f"{relative} imports {sorted(wrong)}"
        checked += 1
    assert checked > 30  # the whole core was read, not an empty folder


def test_the_composition_root_is_where_it_says() -> None:
    """Both modules exist, and server.py does wire the HTTP front ends and aiohttp."""
    assert all((ROOT / relative).is_file() for relative in COMPOSITION_ROOT)
    server = imported_packages(ROOT / "gateway/server.py")
    assert {"dicomweb", "viewer_links", "dimse", "aiohttp"} <= server


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` and the modules of the same package it imports (also inside
    functions: a deferred import still makes the modules depend on each other)."""
    paths = {module_name(path): path for path in python_files(package)}
    return {name: imported_modules(path) & set(paths) - {name}
            for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its modules (first repeated last), or ``None``.

    The package counts as a module (``dicomweb/__init__.py``): it runs before any of its
    modules, so a package that imports ``app`` while ``app`` imports the routes is a cycle too.
    """
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_dicomweb_imports_form_no_cycle() -> None:
    graph = import_graph("dicomweb")
    assert {"dicomweb.app", "dicomweb.qido", "dicomweb.wado"} <= set(graph)
    assert "dicomweb.media" in graph["dicomweb.qido"]  # the graph sees what routes import
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    importers_of_app = sorted(name for name, imports in graph.items()
                              if "dicomweb.app" in imports)
    assert importers_of_app in ([], ["dicomweb.fhir"]), importers_of_app
    assert "dicomweb.fhir" not in graph["dicomweb.app"]


def test_the_checker_sees_an_import_cycle(tmp_path: Path) -> None:
    graph = {"p.app": {"p.routes"}, "p.routes": {"p.helpers"}, "p.helpers": {"p.app"},
             "p.other": set()}
    assert find_cycle(graph) == ["p.app", "p.routes", "p.helpers", "p.app"]
    assert find_cycle({"p.app": {"p.routes"}, "p.routes": set()}) is None
    deferred = tmp_path / "routes.py"
    deferred.write_text("def handler():\n    from dicomweb.app import base_url\n")
    assert "dicomweb.app" in imported_modules(deferred)


def test_the_checker_sees_a_database_import_inside_a_function(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway import models\n"
                   "def f():\n    from sqlalchemy.orm import Session\n")
    assert INDEX_INTERNALS <= imported_modules(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from dicomweb.app import create_app\nimport viewer_links.tokens\n")
    assert imported_packages(bad) == {"dicomweb", "viewer_links"}


@pytest.mark.parametrize("package", sorted(FRONT_ENDS))
def test_front_ends_do_not_read_the_index_themselves(package: str) -> None:
    for path in python_files(package):
        wrong = imported_modules(path) & INDEX_INTERNALS
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_the_checker_sees_the_index_internals(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway.models import Instance\nfrom sqlalchemy.orm import Session\n")
    assert imported_modules(bad) & INDEX_INTERNALS == {"sqlalchemy", "gateway.models"}
    other = tmp_path / "other.py"
    other.write_text("from gateway import models\nimport sqlalchemy.orm\n")
    assert imported_modules(other) & INDEX_INTERNALS == {"sqlalchemy", "gateway.models"}


@pytest.mark.parametrize("subpackage", sorted(DIMSE_WAYS))
def test_dimse_services_do_not_depend_on_a_way_of_running_an_association(subpackage: str
                                                                          ) -> None:
    files = python_files(f"dimse/{subpackage}")
    assert files, f"dimse/{subpackage} has no modules"
    for path in files:
        wrong = imported_modules(path) & DIMSE_WAYS[subpackage]
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"

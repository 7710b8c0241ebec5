"""The package's layers: no import cycles, and the engine, the brokers and the clusters stand
alone.

The folders name the layers (``engine/``, ``brokers/``, ``clusters/``, ``app/``, ``book/``,
``course/``). A consumer runs the engine over a broker; the clusters start servers some
brokers talk to; the lab's processes and the book sit on top. So the engine, the brokers and
the clusters never import the app, the book or the course, not even lazily inside a
function; a broker is a client and never starts a cluster; and no module imports
itself back through others, even lazily or for type checking only (a cycle there is one
refactor away from an import error).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deliverylab

PACKAGE = Path(deliverylab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every deliverylab module ``name`` imports, anywhere in its source: at the top, inside
    functions and under ``TYPE_CHECKING``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` imports a module; `from mod import name` imports mod.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in MODULES else stem
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    # Importing a submodule runs its packages' __init__ first; those import nothing heavy.
    return found - {"deliverylab"}


def test_the_package_has_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


LOWER = sorted(n for n in MODULES if n.startswith(("deliverylab.engine", "deliverylab.brokers",
                                                    "deliverylab.clusters")))


def test_the_layers_are_folders():
    assert {n.split(".")[1] for n in MODULES if n.count(".") >= 2} == {
        "engine", "brokers", "clusters", "app", "book", "course"}
    assert "deliverylab.engine.store" in LOWER and "deliverylab.brokers.base" in LOWER
    assert "deliverylab.clusters.nats_cluster" in LOWER


@pytest.mark.parametrize("name", LOWER)
def test_engine_and_broker_modules_never_reach_up(name):
    """Not at import time, and not lazily inside a function either: a scenario that needs the
    book's lab belongs to the book."""
    upper = sorted(m for m in imports_of(name)
                   if m.split(".")[1:2] and m.split(".")[1] in ("app", "book", "course"))
    assert not upper, f"{name} imports {upper}"


ENGINE = sorted(n for n in MODULES if n.startswith("deliverylab.engine"))


@pytest.mark.parametrize("name", ENGINE)
def test_the_engine_never_imports_a_broker(name):
    """The contract lives in the engine (``engine/broker.py``) and the brokers implement it:
    the arrow runs from ``brokers/`` to ``engine/``, never back, not even lazily."""
    brokers = sorted(m for m in imports_of(name)
                     if m.startswith(("deliverylab.brokers", "deliverylab.clusters")))
    assert not brokers, f"{name} imports {brokers}"


BROKERS = sorted(n for n in MODULES if n.startswith("deliverylab.brokers"))


@pytest.mark.parametrize("name", BROKERS)
def test_a_broker_never_starts_a_cluster(name):
    """A broker is a client of a server someone else runs; the modules that start servers
    (``clusters/``) sit beside the brokers, and the arrow never runs from a broker to them."""
    clusters = sorted(m for m in imports_of(name) if m.startswith("deliverylab.clusters"))
    assert not clusters, f"{name} imports {clusters}"


@pytest.mark.parametrize("name", LOWER)
def test_engine_and_broker_modules_import_alone(name):
    """Each, first in a fresh interpreter, imports without the app or the book."""
    code = ("import importlib, sys; importlib.import_module(sys.argv[1]);"
            " print(sorted(m for m in sys.modules if m.startswith("
            "('deliverylab.app', 'deliverylab.book'))))")
    done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_tests_mirror_the_layers():
    """One test folder per layer of the package, beside ``chapters/`` (what the chapters claim),
    ``docs/`` (the book's build and pages) and ``support/`` (what the tests share)."""
    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    layers = {n.split(".")[1] for n in MODULES if n.count(".") >= 2}
    assert folders == layers | {"chapters", "docs", "support"}
    assert not list((tests / "support").glob("test_*.py")), "a test in tests/support/"

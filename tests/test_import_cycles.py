"""No import cycles between the project's modules, counting imports inside functions
and under ``if TYPE_CHECKING:``.

An import inside a function, or one that only type checkers run, hides a cycle
from Python (nothing executes it at import time) but not from a reader: the two
modules still depend on each other.  The graph is built statically with ``ast``
over every project package, so it sees those imports too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from titan_moe.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("titan_moe", "data_prep", "eval", "jobs", "benchmarks")



def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_modules(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules one file imports, anywhere in it (functions and
    ``if TYPE_CHECKING:`` blocks included: an annotation-only import is still a
    dependency a reader must follow)."""
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            names = [alias.name for alias in item.names]
        elif isinstance(item, ast.ImportFrom):
            base = item.module or ""
            if item.level:  # relative import
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (item.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import sub" imports the submodule pkg.sub when there is one.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in item.names]
        else:
            continue
        for name in names:
            # "import a.b.c" of a non-module attribute: the longest known prefix.
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = module_files(root, packages)
    known = set(files)
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_project_import_graph_is_acyclic():
    graph = import_graph(REPO, PACKAGES)
    assert "titan_moe.infra.parallelize" in graph and "titan_moe.model.config" in graph["titan_moe.model.args"]
    found = [sorted(c) for c in cycles(graph)]
    assert found == [], f"import cycles (function-level imports count): {found}"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import helper\n")
    (pkg / "b.py").write_text("def helper():\n    from pkg import a\n    return a\n")
    (pkg / "c.py").write_text("def later():\n    from . import a\n")  # relative, one way only
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b"})]


def test_a_cycle_through_a_type_checking_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("from pkg.setup import prepare\n")
    (pkg / "setup.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.config import Config\n"
    )
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.setup"] == {"pkg.config"}
    assert cycles(graph) == [frozenset({"pkg.config", "pkg.setup"})]


def test_the_model_package_stands_on_its_own_config_and_the_errors():
    """``import titan_moe.model`` loads no data layer, no run-config reader, no torchtitan."""
    code = (
        "import sys, titan_moe.model\n"
        "print(sorted(m for m in sys.modules if m.startswith(('titan_moe', 'torchtitan'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    errors = ConfigError.__module__.split(".")
    allowed = {".".join(errors[:i]) for i in range(1, len(errors) + 1)}  # the error module and its packages
    outside = {m for m in loaded if m not in allowed and not m.startswith("titan_moe.model")}
    assert outside == set(), f"importing titan_moe.model also loads {sorted(outside)}"
    assert "titan_moe.model.config" in loaded


def test_the_model_package_imports_nothing_else_statically():
    graph = import_graph(REPO, PACKAGES)
    model = {m for m in graph if m == "titan_moe.model" or m.startswith("titan_moe.model.")}
    deps = set().union(*(graph[m] for m in model)) - model
    assert deps == {ConfigError.__module__}, f"titan_moe.model depends on {sorted(deps)}"

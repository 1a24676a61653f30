"""The layering rules of the README's architecture section, read from the source (no imports run).

- No import cycle between modules of `pipelines/`, `workers/` and `storage/`, counting imports
  inside functions too (a deferred import hides a cycle, it does not remove it).
- `workers/` is pure: it imports no service client (Ray, MLflow, fsspec, S3, the Hub) and none
  of the I/O modules of `storage/`.
- MLflow is touched only in `storage/`.
- The subpackages of `pipelines/` are floors and every import points down: `spec/` at the
  ground, `report/` and `stages/` above it (neither imports the other), then `search/`, `run/`,
  `commands/` and `cli.py` at the top. `spec/`, `report/` and `search/` import no Ray: the run
  holds the actor handles and hands the search a scorer pool it calls synchronously.

Where today's code still breaks a rule, the exception is listed below with the module that
breaks it; the test fails on any new break and on a listed one that has gone (so the list only
shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("pipelines", "workers", "storage")
SERVICE_CLIENTS = (
    "ray",
    "mlflow",
    "fsspec",
    "s3fs",
    "boto3",
    "botocore",
    "huggingface_hub",
    "datasets",
)
STORAGE_IO = (
    "storage.objectstore",
    "storage.files",
    "storage.localfiles",
    "storage.tracking",
    "storage.tracking_guard",
    "storage.mlflow_model",
)
#: (module, what it imports) still breaking "workers/ is pure" (issue 17's I/O rule): none.
KNOWN_IMPURE_WORKERS: set[tuple[str, str]] = set()
#: MLflow outside storage/: none (the pyfunc wrappers are storage/serving*.py).
KNOWN_MLFLOW_OUTSIDE_STORAGE: set[tuple[str, str]] = set()
#: The floors of `pipelines/`, lowest first: a module imports only its own subpackage and the
#: floors below its own. `pipelines.serving` (kept for old models) is in no floor: unchecked.
FLOORS = (
    ("pipelines.spec",),
    ("pipelines.report", "pipelines.stages"),
    ("pipelines.search",),
    ("pipelines.run",),
    ("pipelines.commands",),
    ("pipelines.cli",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str) -> set[str]:
    """Every absolute module an import statement names, anywhere in the file; for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (c may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {
        name: {m for m in imported_names(path.read_text()) if m in files and m != name}
        for name, path in files.items()
    }


def external_imports(prefix: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    """(module, import) for each import under ``prefix`` of a ``forbidden`` module or package."""
    hits = set()
    for path in (REPO / prefix).rglob("*.py"):
        for name in imported_names(path.read_text()):
            for banned in forbidden:
                if name == banned or name.startswith(banned + "."):
                    hits.add((module_name(path), banned))
    return hits


def place(module: str, floors: tuple[tuple[str, ...], ...]) -> tuple[int, str] | None:
    """(floor, subpackage) of ``module``, or None when no floor names it."""
    for level, packages in enumerate(floors):
        for package in packages:
            if module == package or module.startswith(package + "."):
                return level, package
    return None


def upward_imports(
    graph: dict[str, set[str]], floors: tuple[tuple[str, ...], ...]
) -> set[tuple[str, str]]:
    """(module, import) for each import of a module on the same floor in another subpackage,
    or on a higher floor."""
    found = set()
    for module, imports in graph.items():
        here = place(module, floors)
        if here is None:
            continue
        for name in imports:
            there = place(name, floors)
            if there is not None and there[1] != here[1] and there[0] >= here[0]:
                found.add((module, name))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    deferred = "def f():\n    from pipelines.run.pipeline import search\n"
    assert "pipelines.run.pipeline" in imported_names(deferred)


def test_the_floors_of_pipelines_import_only_downwards() -> None:
    assert sorted(upward_imports(import_graph(), FLOORS)) == []


def test_the_spec_the_report_and_the_search_import_no_ray() -> None:
    # stages/ may: its work runs inside Ray (train_ray.py drives Ray Train from its stage).
    packages = ("spec", "report", "search")
    assert set().union(*(external_imports(f"pipelines/{p}", ("ray",)) for p in packages)) == set()


def test_the_floor_checker_flags_upward_and_sideways_imports() -> None:
    graph = {
        "pipelines.search.halving": {"pipelines.run.raysession", "pipelines.spec.plan"},
        "pipelines.stages.base": {"pipelines.report.progress", "pipelines.stages.statistics"},
        "pipelines.run.scoring": {"pipelines.search.pool", "pipelines.stages.search"},
        "pipelines.cli": {"pipelines.commands.merge", "pipelines.serving"},
        "pipelines.serving": {"pipelines.run.pipeline"},
    }
    assert upward_imports(graph, FLOORS) == {
        ("pipelines.search.halving", "pipelines.run.raysession"),
        ("pipelines.stages.base", "pipelines.report.progress"),
    }
    assert place("pipelines.runner", FLOORS) is None  # a prefix match needs the dot


def test_workers_import_no_service_client_and_no_storage_io() -> None:
    impure = external_imports("workers", SERVICE_CLIENTS + STORAGE_IO)
    assert impure - KNOWN_IMPURE_WORKERS == set(), "workers/ must take paths, bytes or tensors"
    assert KNOWN_IMPURE_WORKERS - impure == set(), "fixed: drop it from KNOWN_IMPURE_WORKERS"


def test_mlflow_is_touched_only_in_storage() -> None:
    outside = external_imports("pipelines", ("mlflow",)) | external_imports("workers", ("mlflow",))
    assert outside - KNOWN_MLFLOW_OUTSIDE_STORAGE == set()
    assert KNOWN_MLFLOW_OUTSIDE_STORAGE - outside == set(), "fixed: drop it from the list"

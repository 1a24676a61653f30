"""The layering rules of the README's architecture section, read from the source (no imports run).

- No import cycle between modules of `pipelines/`, `workers/` and `storage/`, counting imports
  inside functions too (a deferred import hides a cycle, it does not remove it).
- `workers/` is pure: it imports no service client (Ray, MLflow, fsspec, S3, the Hub) and none
  of the I/O modules of `storage/`.
- MLflow is touched only in `storage/`.

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


def test_workers_import_no_service_client_and_no_storage_io() -> None:
    impure = external_imports("workers", SERVICE_CLIENTS + STORAGE_IO)
    assert impure - KNOWN_IMPURE_WORKERS == set(), "workers/ must take paths, bytes or tensors"
    assert KNOWN_IMPURE_WORKERS - impure == set(), "fixed: drop it from KNOWN_IMPURE_WORKERS"


def test_mlflow_is_touched_only_in_storage() -> None:
    outside = external_imports("pipelines", ("mlflow",)) | external_imports("workers", ("mlflow",))
    assert outside - KNOWN_MLFLOW_OUTSIDE_STORAGE == set()
    assert KNOWN_MLFLOW_OUTSIDE_STORAGE - outside == set(), "fixed: drop it from the list"

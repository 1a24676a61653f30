"""Nothing unsafe is ever deserialised: a scan of the whole code base (AST, not grep)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

SCANNED = ["pipelines", "workers", "storage", "benchmarks", "examples", "tests"]
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}


def _python_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def _safe_loader_subclasses(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if isinstance(base, ast.Attribute) and base.attr in SAFE_YAML_LOADERS:
                    names.add(node.name)
    return names


def problems_in(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    safe_loaders = SAFE_YAML_LOADERS | _safe_loader_subclasses(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.split(".")[0] in {"pickle", "cloudpickle", "dill", "marshal", "shelve"}:
                    found.append(f"{where}: imports {module}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = (
            func.value.id
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            else ""
        )
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in {"eval", "exec"} or owner == "builtins":
            found.append(f"{where}: {name}() call")
        if owner == "torch" and name == "load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: torch.load without weights_only=True")
        if owner == "yaml" and name in {"load", "load_all"}:
            loader = keywords.get("Loader")
            loader_name = getattr(loader, "attr", getattr(loader, "id", None))
            if loader_name not in safe_loaders:
                found.append(f"{where}: yaml.{name} without a safe loader")
        if owner == "yaml" and name in {"unsafe_load", "full_load"}:
            found.append(f"{where}: yaml.{name}")
        if owner == "np" and name == "load":
            flag = keywords.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append(f"{where}: np.load with allow_pickle=True")
    return found


def test_the_code_base_deserialises_nothing_unsafe() -> None:
    problems = [problem for path in _python_files() for problem in problems_in(path)]
    assert problems == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from cloudpickle import loads",
        "import torch\ntorch.load('x')",
        "import torch\ntorch.load('x', weights_only=False)",
        "import yaml\nyaml.load('a: 1')",
        "import yaml\nyaml.load('a: 1', Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load('a')",
        "eval(input())",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
        "import numpy as np\nnp.load('x.npz', allow_pickle=True)",
    ],
)
def test_the_scan_catches_each_unsafe_pattern(snippet: str, tmp_path: Path, monkeypatch) -> None:
    path = REPO / "tests" / "unit" / f"_scan_probe_{abs(hash(snippet))}.py"
    try:
        path.write_text(snippet + "\n")
        assert problems_in(path), snippet
    finally:
        path.unlink(missing_ok=True)


def test_the_scan_accepts_the_safe_forms(tmp_path: Path) -> None:
    path = REPO / "tests" / "unit" / "_scan_probe_safe.py"
    try:
        path.write_text(
            "import yaml, torch, numpy as np\n"
            "class L(yaml.SafeLoader):\n    pass\n"
            "yaml.load('a', Loader=L)\nyaml.safe_load('a')\n"
            "torch.load('x', weights_only=True)\nnp.load('x.npz')\n"
            "torch.nn.Linear(2, 2).eval()\n"
        )
        assert problems_in(path) == []
    finally:
        path.unlink(missing_ok=True)

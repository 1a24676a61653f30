"""The generic top-level import names resolve to this repository and are listed explicitly."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.parametrize("name", ["pipelines", "workers", "storage"])
def test_import_names_resolve_here(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_pyproject_lists_the_packages_and_the_console_script() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"pipelines*", "workers*", "storage*"} <= set(include)
    assert project["project"]["name"] == "mergeline"
    assert project["project"]["scripts"]["mergeline"] == "pipelines.cli:main"


def test_pure_layers_do_not_import_services() -> None:
    forbidden = ("import ray", "import mlflow", "import boto3", "import s3fs", "import fsspec")
    for path in (REPO / "workers").rglob("*.py"):
        text = path.read_text()
        for word in forbidden:
            assert word not in text, f"{path} has {word!r}: workers stay free of services"

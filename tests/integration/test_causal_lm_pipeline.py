"""A causal language model through the whole pipeline, on a real local Ray and MLflow.

A tiny random tied-embedding Llama (``tests/lm_fixtures.py``, saved as a local model directory
with a word-level tokenizer and a chat template) is fine-tuned on two prompt -> completion
tasks, merged, searched on token accuracy and published. The published Hugging Face directory
must load with ``AutoModelForCausalLM`` and reproduce, with ``generate()``, the exact match the
run reported; the MLflow model (transformers flavor) must load and generate text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.run.pipeline import run_pipeline
from pipelines.spec.load import validate_document
from tests.lm_fixtures import write_tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
transformers = pytest.importorskip("transformers")
NUMBERS = "one two three four five six seven eight nine ten".split()
CAPITALS = {"france": "paris", "italy": "rome", "spain": "madrid", "germany": "berlin"}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def _write(path: Path, rows: list[dict[str, str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tasks(folder: Path) -> list[dict]:
    sums = [
        {"prompt": f"{NUMBERS[a]} plus {NUMBERS[b]} equals", "completion": NUMBERS[a + b + 1]}
        for a in range(9)
        for b in range(9 - a)
    ]
    capitals = [
        {"prompt": f"what is the capital of {country} ?", "completion": city}
        for country, city in CAPITALS.items()
    ] * 8
    tasks = []
    for name, rows in (("sums", sums), ("capitals", capitals)):
        tasks.append(
            {
                "name": name,
                "dataset": {
                    "source": "files",
                    "train": _write(folder / name / "train.jsonl", rows),
                    "test": _write(folder / name / "test.jsonl", rows[::2]),
                    "prompt_column": "prompt",
                    "completion_column": "completion",
                },
            }
        )
    return tasks


def _spec(tmp_path: Path, model: Path, mode: str) -> dict:
    return {
        "name": f"lm-{mode}",
        "base_model": {"source": "hf", "kind": "causal_lm", "model": str(model), "max_length": 16},
        "tasks": _tasks(tmp_path / "data"),
        "finetune": {"mode": mode, "steps": 40, "batch_size": 8, "lr": 1e-2},
        "merge": {
            "candidates": [
                {"method": "task_arithmetic", "coefficient": {"start": 0, "stop": 1, "num": 3}}
            ]
        },
        "evaluation": {"val_fraction": 0.2, "batch_size": 16, "max_new_tokens": 3},
        "storage": {"uri": f"file://{tmp_path}/store"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "lm"},
    }


def _run(document: dict, tmp_path: Path) -> dict:
    devnull = Console(file=open("/dev/null", "w"))
    return run_pipeline(validate_document(document), devnull, tmp_path / "summary.json")


def _generated_exact_match(model_dir: Path, rows: list[dict[str, str]]) -> float:
    """Exact match of greedy ``generate()`` on the published directory, row by row."""
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    hits = 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=3, do_sample=False)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += " ".join(answer.split()).lower() == row["completion"]
    return hits / len(rows)


def test_a_causal_lm_fine_tunes_merges_and_publishes_a_model_transformers_generates_with(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    summary = _run(_spec(tmp_path, tiny_llama_dir, "standard"), tmp_path)
    assert summary["status"] == "succeeded" and summary["spec"]["metric"] == "token_accuracy"
    for task in summary["tasks"].values():
        assert task["finetuned"]["test"] > task["zero_shot"]["test"]
        assert set(task["report"]["exact_match"]) == {"zero_shot", "finetuned"}
    report = summary["best"]["test"]["report"]["exact_match"]
    assert set(report) == {"sums", "capitals"}

    model_dir = Path(summary["model"]["uri"].removeprefix("file://")) / "transformers"
    assert any(model_dir.glob("*.safetensors")) and (model_dir / "generation_config.json").is_file()
    for name in ("sums", "capitals"):
        rows = [json.loads(line) for line in (tmp_path / "data" / name / "test.jsonl").open()]
        assert _generated_exact_match(model_dir, rows) == pytest.approx(report[name])

    import mlflow

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    served = mlflow.pyfunc.load_model("models:/lm-standard@champion")
    answer = served.predict(["what is the capital of france ?"])
    assert isinstance(answer[0], str)

    lineage = CliRunner().invoke(
        app, ["lineage", "models:/lm-standard@champion", "--tracking-uri", tracking, "--json"]
    )
    assert lineage.exit_code == 0, lineage.output
    chain = json.loads(lineage.stdout)
    statuses = [v["status"] for v in chain["task_vectors"]]
    statuses += [chain["merged_model"]["status"], chain["base_model"]["status"]]
    assert statuses == ["verified"] * 4

    again = _run(_spec(tmp_path, tiny_llama_dir, "standard"), tmp_path)  # the same spec
    assert all(task["cache_hit"] for task in again["tasks"].values())
    assert again["best"]["coefficients"] == summary["best"]["coefficients"]


def test_linear_mode_trains_in_the_tangent_space_and_exports_the_nonlinear_merge(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    summary = _run(_spec(tmp_path, tiny_llama_dir, "linear"), tmp_path)
    assert summary["status"] == "succeeded" and summary["mode"] == "linear"
    assert summary["search"]["fast_path"] is True  # token accuracy through the frozen LM head
    for task in summary["tasks"].values():
        assert task["finetuned"]["test"] > task["zero_shot"]["test"]
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["transformers_weights"] == "nonlinear_theta0_plus_tau"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir / "transformers"))
    assert model.config.tie_word_embeddings

"""LoRA task vectors through the whole pipeline, on a real local Ray, MLflow and DeepSpeed.

A tiny tied Llama (``tests/lm_fixtures.py``) is fine-tuned with ``finetune.adapter`` (PEFT LoRA)
on two prompt -> completion tasks, in standard mode and in the tangent space of the adapter.
The store keeps factors, not dense deltas; a linear merge is published both as a dense
Hugging Face model and as a PEFT adapter of rank Σ r_t, and the two must compute the same
logits; a non-linear method publishes the dense model only. Changing ``r`` rebuilds the task
vectors and nothing else. DeepSpeed (ZeRO 0-2, one or two workers) trains the adapter as the
plain loop does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.objectstore import open_store
from storage.taskvectors import read_adapter_task_vector
from tests.integration.test_causal_lm_deepspeed import CONFIG, _packed
from tests.integration.test_causal_lm_pipeline import _run, _spec
from tests.integration.test_deepspeed import process_group_env  # noqa: F401  (a fixture)
from tests.lm_fixtures import tiny_llama, write_tiny_llama
from workers.adapters import lora_trainable
from workers.finetune.engine import TorchEngine
from workers.finetune.loop import fit
from workers.kinds import get_kind
from workers.models.causal_lm import CausalLM

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]
transformers = pytest.importorskip("transformers")
ADAPTER = {"kind": "lora", "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def _adapter_spec(tmp_path: Path, model: Path, mode: str, **adapter) -> dict:
    document = copy.deepcopy(_spec(tmp_path, model, mode))
    document["finetune"]["adapter"] = ADAPTER | adapter
    return document


def _stored(summary: dict) -> dict[str, dict]:
    """Each task's stored manifest meta."""
    metas = {}
    for name, task in summary["tasks"].items():
        root, key = task["task_vector_uri"].rsplit("/task-vectors/", 1)
        path = Path(root.removeprefix("file://")) / "task-vectors" / key / "manifest.json"
        metas[name] = json.loads(path.read_text())["meta"]
    return metas


def _same_logits(model_dir: Path, base_dir: Path) -> None:
    """The published PEFT adapter on the base computes the published dense model."""
    from peft import PeftModel

    dense = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir / "transformers"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    adapted = PeftModel.from_pretrained(base, str(model_dir / "peft")).eval()
    ids = torch.randint(
        4, dense.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want, got = dense(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            plain = adapted(ids).logits
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert float((plain - want).abs().max()) > 1e-3 * float(want.abs().max())  # it did merge


def test_lora_task_vectors_publish_a_dense_model_and_an_equal_peft_adapter(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    summary = _run(_adapter_spec(tmp_path, tiny_llama_dir, "standard"), tmp_path)
    assert summary["status"] == "succeeded"
    for task in summary["tasks"].values():
        assert task["finetuned"]["test"] > task["zero_shot"]["test"]
    for meta in _stored(summary).values():
        assert meta["format"] == "lora" and meta["adapter"]["r"] == 4
        assert 0 < meta["adapter_bytes"] < 0.2 * meta["dense_bytes"]
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["peft_adapter"] == {
        "published": True,
        "folder": "peft",
        "rank": 8,
        "computes": "merged",
    }
    _same_logits(model_dir, tiny_llama_dir)

    # Another rank and a non-linear method: the task vectors (and nothing else) are rebuilt,
    # and ties publishes the dense model only.
    document = _adapter_spec(tmp_path, tiny_llama_dir, "standard", r=8)
    document["merge"]["candidates"] = [{"method": "ties", "coefficient": {"values": [0.5, 1.0]}}]
    ties = _run(document, tmp_path)
    assert {t["rebuilt_reason"] for t in ties["tasks"].values()} == {"new fine-tune config"}
    assert len(list((tmp_path / "store" / "base-models").iterdir())) == 1  # θ0 is not rebuilt
    assert {m["adapter"]["r"] for m in _stored(ties).values()} == {8}
    ties_dir = Path(ties["model"]["uri"].removeprefix("file://"))
    peft = json.loads((ties_dir / "config.json").read_text())["peft_adapter"]
    assert peft["published"] is False and "ties is not linear" in peft["reason"]
    assert not (ties_dir / "peft").exists()
    assert any((ties_dir / "transformers").glob("*.safetensors"))


def test_tangent_space_lora_searches_on_the_fast_path_and_publishes_its_adapter(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    document = _adapter_spec(tmp_path, tiny_llama_dir, "linear")
    # Only B moves (A stays at A0): a larger step, and every linear layer of the tiny model
    document["finetune"]["lr"] = 5e-2
    document["finetune"]["adapter"]["target_modules"] = [
        f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")
    ]
    summary = _run(document, tmp_path)
    assert summary["status"] == "succeeded" and summary["mode"] == "linear"
    assert summary["search"]["fast_path"] is True
    for task in summary["tasks"].values():
        assert task["finetuned"]["test"] > task["zero_shot"]["test"]
    root = summary["tasks"]["sums"]["task_vector_uri"].rsplit("/task-vectors/", 1)
    factors, _ = read_adapter_task_vector(open_store(root[0]), root[1])
    ranks = {v.shape[0] for k, v in factors.items() if k.endswith(".lora_A")}
    assert ranks == {4}  # τ = s·δB·A0: rank r, A at its start
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["peft_adapter"]["computes"] == "nonlinear_theta0_plus_tau"
    _same_logits(model_dir, tiny_llama_dir)


@pytest.mark.slow
def test_deepspeed_trains_an_adapter_like_the_plain_loop_in_both_modes(
    process_group_env: None,  # noqa: F811
) -> None:
    from workers.finetune.deepspeed_engine import DeepSpeedEngine

    loss = get_kind("causal_lm").loss
    x = _packed()
    y = np.zeros(len(x), dtype=np.int64)

    def model(mode: str) -> torch.nn.Module:
        return lora_trainable(CausalLM(tiny_llama()), ADAPTER, mode)

    for mode in ("standard", "linear"):
        plain = TorchEngine(model(mode), CONFIG, loss_fn=loss)
        fit(plain, x, y, CONFIG, "t")
        expected = plain.model_state()
        assert expected and all(".lora_" in k or k.startswith("delta.") for k in expected)
        assert any(v.abs().max() > 1e-3 for v in expected.values())
        for stage in (0, 1, 2):
            engine = DeepSpeedEngine(model(mode), CONFIG, stage, loss)
            fit(engine, x, y, CONFIG, "t")
            state = engine.model_state()
            assert set(state) == set(expected)
            for name, value in expected.items():
                torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_deepspeed_workers_give_the_adapter_of_one(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny-llama")
    factors = {}
    for workers in (1, 2):
        document = _adapter_spec(tmp_path / f"run{workers}", model, "linear")
        document["tasks"] = document["tasks"][:1]
        document["finetune"] |= {
            "steps": 4,
            "deepspeed": {"zero_stage": 2},
            "resources": {"num_cpus": 1, "num_workers": workers},
        }
        task = _run(document, tmp_path / f"run{workers}")["tasks"]["sums"]
        assert task["engine"] == "deepspeed" and task["workers"] == workers
        root, key = task["task_vector_uri"].rsplit("/task-vectors/", 1)
        factors[workers] = read_adapter_task_vector(open_store(root), key)[0]
    assert set(factors[1]) == set(factors[2])
    for name, value in factors[1].items():
        torch.testing.assert_close(factors[2][name], value, rtol=1e-4, atol=1e-5)


def test_a_hugging_face_encoder_takes_adapters_and_publishes_them_for_peft(tmp_path: Path) -> None:
    """The classification kind on a Hugging Face encoder: PEFT's BERT default (query, value),
    the adapter published under the encoder's own names. (That classification learns with an
    adapter: the MLP store of tests/e2e/test_merge_command.py.)"""
    from peft import PeftModel

    from tests.hf_fixtures import write_tiny_bert
    from tests.integration.test_hf_pipeline import _spec as text_spec

    model = write_tiny_bert(tmp_path / "tiny-bert")
    document = text_spec(tmp_path, str(model))
    document["finetune"] |= {"adapter": ADAPTER}  # a random BERT: it need not learn here
    summary = _run(document, tmp_path)
    assert summary["status"] == "succeeded"
    for meta in _stored(summary).values():
        assert meta["format"] == "lora" and meta["adapter_bytes"] < 0.2 * meta["dense_bytes"]
    model_dir = Path(summary["model"]["uri"].removeprefix("file://"))
    dense = transformers.AutoModel.from_pretrained(str(model_dir / "transformers")).eval()
    adapted = PeftModel.from_pretrained(
        transformers.AutoModel.from_pretrained(str(model)), str(model_dir / "peft")
    ).eval()
    config = json.loads((model_dir / "peft" / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {"query", "value"}
    ids = torch.randint(
        5, dense.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        want = dense(input_ids=ids).last_hidden_state
        got = adapted(input_ids=ids).last_hidden_state
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())

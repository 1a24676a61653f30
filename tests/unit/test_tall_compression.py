"""TALL-mask compression: τ_MTL once plus packed masks, stored and read back, and its search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipelines.search.retrieval import per_task_lambda_candidates
from pipelines.search.scorebook import ScoreBook
from pipelines.search.tangent import TangentSearch
from pipelines.spec.load import apply_overrides, validate_document
from pipelines.spec.plan import TALL_MASKS_LAMS, make_plan
from storage.errors import ArtifactError
from storage.objectstore import open_store
from storage.tall import MASKS, read_tall_artifact, write_tall_artifact
from tests.conftest import TINY_SPEC
from workers.merge import merge
from workers.merge.compression import compress_tall, compression_ratio, retrieve_task

TASKS = ("t1", "t2", "t3", "t4")


def make_inputs() -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(3)
    base = {
        "w1": torch.randn(16, 24, generator=generator),
        "b1": torch.randn(24, generator=generator),
        "w2": torch.randn(8, 16, generator=generator),
    }
    vectors = {
        task: {name: torch.randn(t.shape, generator=generator) for name, t in base.items()}
        for task in TASKS
    }
    return base, vectors


@pytest.mark.parametrize("use_ties", [False, True])
def test_stored_masks_rebuild_exactly_the_tall_masks_model_of_each_task(
    tmp_path: Path, use_ties: bool
) -> None:
    base, vectors = make_inputs()
    lams = {"t1": 0.2, "t2": 0.4, "t3": 0.6, "t4": 0.3}
    compressed = compress_tall(base, vectors, lams, use_ties=use_ties)
    store = open_store(f"file://{tmp_path}/store")
    info = {"lams": compressed.lams, "use_ties": use_ties,
            "compression": compression_ratio(compressed, vectors)}  # fmt: skip
    ref = write_tall_artifact(store, "tall/x", compressed.multi_task, compressed.masks, info)
    assert ref.meta["kind"] == "tall_masks"
    assert ref.meta["tall_masks"]["shapes"]["w1"] == [16, 24]
    multi_task, masks, stored = read_tall_artifact(store, "tall/x")
    assert stored["lams"] == lams and stored["use_ties"] is use_ties
    assert all(packed.dtype == torch.uint8 for m in masks.values() for packed in m.values())
    for task in TASKS:
        expected = merge("tall_masks", base, vectors, task=task, lam=lams[task], use_ties=use_ties)
        rebuilt = retrieve_task(base, multi_task, masks[task])
        for name in base:
            assert torch.equal(rebuilt[name], expected[name]), (task, name)
    other = merge("tall_masks", base, vectors, task="t1", lam=0.6, use_ties=use_ties)
    assert not torch.equal(retrieve_task(base, multi_task, masks["t1"])["w1"], other["w1"])


def test_compression_ratio_is_one_vector_plus_a_bit_per_entry_per_task() -> None:
    base, vectors = make_inputs()  # every tensor has a multiple of 8 entries: no padding
    compressed = compress_tall(base, vectors, 0.4)
    ratio = compression_ratio(compressed, vectors)
    tasks = len(TASKS)
    assert ratio["ratio"] == pytest.approx((1 + tasks / 32) / tasks)
    entries = sum(t.numel() for t in base.values())
    assert ratio["stored_bytes"] == 4 * entries + tasks * entries // 8
    assert ratio["task_vector_bytes"] == tasks * 4 * entries


def test_a_corrupt_mask_file_is_refused(tmp_path: Path) -> None:
    base, vectors = make_inputs()
    compressed = compress_tall(base, vectors, 0.4)
    store = open_store(f"file://{tmp_path}/store")
    write_tall_artifact(store, "tall/x", compressed.multi_task, compressed.masks, {"lams": {}})
    path = tmp_path / "store" / "tall" / "x" / MASKS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_tall_artifact(store, "tall/x")


def test_the_search_plans_a_lambda_grid_and_keeps_each_tasks_best_lambda() -> None:
    document = apply_overrides(TINY_SPEC, ["merge.candidates=[{method: tall_masks}]"])
    plan = make_plan(validate_document(document))  # no 'task' param: the search sets it
    assert [c.params["lam"] for c in plan.candidates] == list(TALL_MASKS_LAMS)
    assert {c.coefficient for c in plan.candidates} == {1.0}
    accuracy = {0.2: {"perm1": 0.9, "perm2": 0.5}, 0.3: {"perm1": 0.8, "perm2": 0.7},
                0.4: {"perm1": 0.9, "perm2": 0.6}}  # fmt: skip
    rows = [
        {"id": f"c{lam}", "method": "tall_masks", "params": {"lam": lam}, "accuracy": acc}
        for lam, acc in accuracy.items()
    ]
    rows.append({"id": "ta", "method": "task_arithmetic", "params": {}, "accuracy": {}})
    [(candidate, row)] = per_task_lambda_candidates(rows, {"perm1": 1.0, "perm2": 0.7})
    assert candidate.params == {"lam": {"perm1": 0.2, "perm2": 0.3}}  # ties: the smaller λ
    assert row["accuracy"] == {"perm1": 0.9, "perm2": 0.7} and row["derived"] is True
    assert row["objective"]["mean_normalized_accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    assert row["id"] == candidate.id


class NoScorers:
    """A scorer pool the search must not call: every score it needs is in the book."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the search asked the scorer pool for {name}")


def test_linear_mode_keeps_each_tasks_best_lambda_as_standard_mode_does() -> None:
    # The tangent-space search (linear mode) over stored linearized scores: perm1 is best at
    # λ 0.2 (0.9), perm2 at λ 0.5 (0.8); no shared λ gets both. Every score is in the book, so
    # the search scores nothing and needs no Ray actor.
    document = apply_overrides(
        TINY_SPEC, ["finetune.mode=linear", "merge.candidates=[{method: tall_masks}]"]
    )
    plan = make_plan(validate_document(document))
    accuracy = {0.2: {"perm1": 0.9, "perm2": 0.5}, 0.3: {"perm1": 0.7, "perm2": 0.6},
                0.4: {"perm1": 0.6, "perm2": 0.7}, 0.5: {"perm1": 0.5, "perm2": 0.8},
                0.6: {"perm1": 0.4, "perm2": 0.75}}  # fmt: skip
    book = ScoreBook("linear-tall")
    candidates = list(plan.candidates)
    book.put_many(candidates, [accuracy[c.params["lam"]] for c in candidates], split="val")
    reference = {task: {"finetuned": {"val": 1.0}} for task in ("perm1", "perm2")}
    outcome = TangentSearch(plan, NoScorers(), reference, book=book).run()
    assert outcome.best.params == {"lam": {"perm1": 0.2, "perm2": 0.5}}
    best_row = next(row for row in outcome.rows if row["id"] == outcome.best.id)
    assert best_row["accuracy"] == {"perm1": 0.9, "perm2": 0.8} and best_row["derived"] is True
    # the best shared λ (0.2 or 0.5, mean 0.7 or 0.65) is strictly worse than the per-task 0.85
    assert best_row["objective"]["mean_normalized_accuracy"] == pytest.approx(0.85)

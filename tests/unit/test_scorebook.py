"""Score keys: a stored score is reused only when everything it depends on is equal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipelines.search.scorebook import ScoreBook, score_context
from pipelines.spec.plan import Candidate

BASE = {"digest": "b" * 64, "config": {"source": "builtin", "name": "mlp"}}
EVALUATION = {"val_fraction": 0.1, "val_max": 5000, "split_seed": 0}


def tasks(sha: str = "s1", data: str = "d1") -> dict:
    return {
        "a": {"ref": SimpleNamespace(sha256=sha), "meta": {"dataset_digest": data}},
        "b": {"ref": SimpleNamespace(sha256="s2"), "meta": {"dataset_digest": "d2"}},
    }


def context(**change) -> str:
    args = {
        "code_version": "0.1.0+abc",
        "base_meta": BASE,
        "tasks": tasks(),
        "evaluation": EVALUATION,
        "mode": "standard",
    } | change
    return score_context(**args)


CANDIDATE = Candidate("ties", {"density": 0.2}, 0.5)


@pytest.mark.parametrize(
    "change",
    [
        {"code_version": "0.1.0+abd"},
        {"base_meta": BASE | {"digest": "c" * 64}},
        {"base_meta": BASE | {"config": {"source": "builtin", "name": "mlp", "hidden": [8]}}},
        {"tasks": tasks(sha="s1-new")},
        {"tasks": tasks(data="d1-new")},
        {"evaluation": EVALUATION | {"split_seed": 1}},
        {"evaluation": EVALUATION | {"metric": "exact_match"}},
        {"mode": "linear"},
        {"device": "cuda"},
    ],
)
def test_every_run_wide_input_changes_the_context(change: dict) -> None:
    assert context(**change) != context()


def test_a_cpu_scorer_keeps_the_context_it_had_before_scorers_could_use_gpus() -> None:
    # the digest of this context before merge.resources existed (no "device" field)
    from pipelines.search.scorebook import FORMAT
    from storage.digest import digest_json

    before = {
        "format": FORMAT,
        "code_version": "0.1.0+abc",
        "base": BASE,
        "tasks": {"a": {"task_vector_sha256": "s1", "dataset_digest": "d1"}}
        | {"b": {"task_vector_sha256": "s2", "dataset_digest": "d2"}},
        "evaluation": EVALUATION,
        "mode": "standard",
    }
    assert context(device="cpu") == context() == digest_json(before)


def test_the_context_ignores_task_order() -> None:
    flipped = dict(reversed(list(tasks().items())))
    assert context(tasks=flipped) == context()


@pytest.mark.parametrize(
    ("candidate", "how"),
    [
        (Candidate("ties", {"density": 0.4}, 0.5), {}),
        (Candidate("ties", {"density": 0.2}, 0.6), {}),
        (Candidate("ties", {"density": 0.2}, {"a": 0.5, "b": 0.5}), {}),
        (Candidate("task_arithmetic", {}, 0.5), {}),
        (CANDIDATE, {"split": "test"}),
        (CANDIDATE, {"metric": "exact_match"}),
        (CANDIDATE, {"rows": {"a": 9, "b": 9}}),
        (CANDIDATE, {"by": "fast_path"}),
    ],
)
def test_every_score_input_changes_the_key(candidate: Candidate, how: dict) -> None:
    book = ScoreBook(context())
    assert book.candidate_key(candidate, **({"split": "val"} | how)) != book.candidate_key(
        CANDIDATE, "val"
    )


def test_the_rung_seed_matters_only_for_a_subset() -> None:
    book = ScoreBook(context())
    rows = {"a": 9, "b": 9}
    assert book.candidate_key(CANDIDATE, "val", seed=1) == book.candidate_key(CANDIDATE, "val")
    assert book.candidate_key(CANDIDATE, "val", rows=rows, seed=1) != book.candidate_key(
        CANDIDATE, "val", rows=rows
    )


def test_a_new_context_finds_nothing_the_old_one_stored() -> None:
    old = ScoreBook(context())
    old.put(old.candidate_key(CANDIDATE, "val"), {"a": 0.9, "b": 0.8})
    same = ScoreBook(context(), known=old.record())
    changed = ScoreBook(context(tasks=tasks(sha="s1-new")), known=old.record())
    assert same.split([CANDIDATE], split="val") == ({CANDIDATE.id: {"a": 0.9, "b": 0.8}}, [])
    assert changed.split([CANDIDATE], split="val") == ({}, [CANDIDATE])


def test_the_record_holds_what_the_run_used_and_the_counts_say_which() -> None:
    first = ScoreBook(context())
    other = Candidate("task_arithmetic", {}, 0.3)
    first.put_many([CANDIDATE, other], [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.5}], split="val")
    second = ScoreBook(context(), known=first.record())
    found, missing = second.split([CANDIDATE, Candidate("tsv", {}, 1.0)], split="val")
    assert list(found) == [CANDIDATE.id] and [c.method for c in missing] == ["tsv"]
    second.put_many(missing, [{"a": 0.7, "b": 0.7}], split="val")
    # the unused stored score (other) is not carried on; the used and the new ones are
    assert len(second.record()) == 2
    assert second.counts() == {"scores_reused": 1, "scores_computed": 1}

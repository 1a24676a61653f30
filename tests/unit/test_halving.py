"""Successive halving: the rung schedule, the seeded, stratified row subsets and the loop over a
scorer pool (all without Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.search.halving import survivors
from pipelines.spec.plan import Candidate
from storage.errors import SpecError
from workers.search.halving import (
    Rung,
    halving_schedule,
    stratified_rows,
    survivor_counts,
    total_cost,
    uniform_rows,
    validation_subset,
)


def test_the_schedule_keeps_a_third_on_three_times_the_rows_until_three_remain() -> None:
    rungs = halving_schedule(27, {"a": 90, "b": 45}, eta=3)
    assert rungs == [
        Rung(27, {"a": 10, "b": 5}),
        Rung(9, {"a": 30, "b": 15}),
        Rung(3, {"a": 90, "b": 45}),
    ]
    assert [rung.cost for rung in rungs] == [405, 405, 405]
    assert total_cost(rungs) * 3 == 27 * 135  # a third of the full grid's rows


def test_survivor_counts_round_up_and_stop_at_eta() -> None:
    assert survivor_counts(81, 3) == [81, 27, 9, 3]
    assert survivor_counts(28, 3) == [28, 10, 4, 2]
    assert survivor_counts(5, 2) == [5, 3, 2]
    assert survivor_counts(3, 3) == [3]
    assert halving_schedule(3, {"a": 7}) == [Rung(3, {"a": 7})]  # one rung: the full split


def test_a_budget_shrinks_the_subset_rungs_and_keeps_the_full_last_rung() -> None:
    rows = {"a": 90, "b": 45}
    rungs = halving_schedule(27, rows, eta=3, budget=1000)
    assert total_cost(rungs) <= 1000
    assert total_cost(rungs) > 1000 - 27 * 2  # the largest subsets that fit, to a row
    assert rungs[-1] == Rung(3, rows)
    assert [rung.candidates for rung in rungs] == [27, 9, 3]
    assert rungs[0].rows["a"] <= rungs[1].rows["a"] < 90
    assert halving_schedule(27, rows, budget=1215) == halving_schedule(27, rows)


def test_a_budget_below_the_smallest_schedule_is_refused_naming_the_minimum() -> None:
    # 27 + 9 candidates on one row of each of 2 tasks, then 3 on all 135 rows: 477 rows
    assert total_cost(halving_schedule(27, {"a": 90, "b": 45}, budget=477)) == 477
    with pytest.raises(SpecError, match=r"budget 476 .* at least 477"):
        halving_schedule(27, {"a": 90, "b": 45}, budget=476)


def test_stratified_rows_give_each_class_its_share_with_the_same_seed_the_same_rows() -> None:
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    np.random.default_rng(5).shuffle(labels)
    rows = stratified_rows(labels, 10, 7)
    assert np.bincount(labels[rows]).tolist() == [6, 3, 1]
    assert len(set(rows.tolist())) == 10 and list(rows) == sorted(rows)
    assert np.array_equal(rows, stratified_rows(labels, 10, 7))
    assert not np.array_equal(rows, stratified_rows(labels, 10, 8))
    larger = stratified_rows(labels, 30, 7)
    assert np.bincount(labels[larger]).tolist() == [18, 9, 3]
    assert set(rows) <= set(larger)  # a larger rung reads the smaller one's rows too
    # shares 3.6, 1.8, 0.6 -> 3, 1, 0, plus one each to the largest remainders: class 1 (0.8),
    # then class 0 (0.6, tied with class 2 and first in class order)
    assert np.bincount(labels[stratified_rows(labels, 6, 0)], minlength=3).tolist() == [4, 2, 0]
    assert np.array_equal(stratified_rows(labels, 500, 0), np.arange(100))


def test_rows_without_classes_are_a_seeded_uniform_draw_and_tasks_differ() -> None:
    rows = uniform_rows(50, 5, 3)
    assert len(rows) == 5 and np.array_equal(rows, uniform_rows(50, 5, 3))
    assert set(rows) <= set(uniform_rows(50, 20, 3))
    zeros = np.zeros(50, dtype=np.int64)  # a causal LM's labels
    a, b = validation_subset("a", zeros, 0, 5, 0), validation_subset("b", zeros, 0, 5, 0)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, validation_subset("a", zeros, 0, 5, 0))
    labels = np.arange(50) % 2
    assert np.bincount(labels[validation_subset("a", labels, 2, 10, 0)]).tolist() == [5, 5]


def _candidates(values: list[float]) -> list[Candidate]:
    return [Candidate("task_arithmetic", {}, v) for v in values]


def test_survivors_are_the_best_in_the_search_order_and_the_kept_one_takes_the_last_place() -> None:
    alive = _candidates([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    rows = [
        {"id": c.id, "objective": {"mean_accuracy": s}}
        for c, s in zip(alive, [0.5, 0.9, 0.7, 0.9, 0.1, 0.2], strict=True)
    ]
    best = survivors(alive, rows, "mean_accuracy", 2, frozenset())
    assert [c.coefficient for c in best] == [0.2, 0.4]  # tie: the smaller coefficient first
    kept = survivors(alive, rows, "mean_accuracy", 2, frozenset({alive[4].id}))
    assert [c.coefficient for c in kept] == [0.2, 0.5]


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"strategy": "successive_halving", "per_task": True}, "successive_halving ranks shared"),
        ({"strategy": "bayesian", "budget": 10}, "bayesian proposes per-task"),
        ({"strategy": "bayesian", "per_task": True}, "bayesian needs merge.search.budget"),
        ({"eta": 1}, "eta"),
    ],
)
def test_strategies_that_do_not_fit_the_search_are_refused(search: dict, message: str) -> None:
    import copy

    from pipelines.spec.load import validate_document
    from tests.conftest import TINY_SPEC

    document = copy.deepcopy(TINY_SPEC)
    document["merge"]["search"] = search
    with pytest.raises(SpecError, match=message):
        validate_document(document)


def test_a_row_budget_too_small_for_the_plan_is_refused_before_fine_tuning() -> None:
    import copy

    from pipelines.search.halving import check_budget
    from pipelines.spec.load import validate_document
    from pipelines.spec.plan import make_plan
    from tests.conftest import TINY_SPEC

    document = copy.deepcopy(TINY_SPEC)  # 5 candidates: 5 on a subset, then 2 on the full split
    document["merge"]["search"] = {"strategy": "successive_halving", "budget": 50}
    plan = make_plan(validate_document(document))
    check_budget(plan, {"perm1": 10, "perm2": 8})  # 5 × (4 + 3) + 2 × 18 = 71 shrinks to ≤ 50
    with pytest.raises(SpecError, match="at least 54"):  # 5 × (1 + 1) + 2 × 22
        check_budget(plan, {"perm1": 10, "perm2": 12})


def test_the_early_budget_check_counts_a_warm_start_champion() -> None:
    import copy

    from pipelines.search.halving import check_budget
    from pipelines.spec.load import validate_document
    from pipelines.spec.plan import make_plan
    from tests.conftest import TINY_SPEC

    document = copy.deepcopy(TINY_SPEC)
    document["merge"]["search"] = {"strategy": "successive_halving", "budget": 55}
    check_budget(make_plan(validate_document(document)), {"perm1": 10, "perm2": 12})  # 54 fits
    document["merge"]["search"]["warm_start"] = "champion"
    with pytest.raises(SpecError, match="at least 56"):  # 6 × (1 + 1) + 2 × 22
        check_budget(make_plan(validate_document(document)), {"perm1": 10, "perm2": 12})


class PlantedPool:
    """A scorer pool without Ray: each task's accuracy peaks at coefficient 0.5, a little lower
    on a rung's row subset; it counts the candidates it is asked to score."""

    def __init__(self) -> None:
        self.scored: list[str] = []

    def score(self, candidates, split="val", metric=None, rows=None, seed=0, *, done=None, **_):
        scored = []
        for candidate in candidates:
            accuracy = 1.0 - abs(candidate.coefficient - 0.5) - (0.01 if rows else 0.0)
            scored.append({"id": candidate.id, "accuracy": {"perm1": accuracy, "perm2": accuracy}})
        self.scored += [c.id for c in candidates]
        for start in range(0, len(candidates), 2):  # in chunks, as the Ray pool reports them
            if done is not None:
                done(candidates[start : start + 2], scored[start : start + 2])
        return scored

    def split_rows(self, split="val"):
        return {"perm1": 30, "perm2": 24}


def test_successive_halving_runs_on_any_scorer_pool_and_reuses_the_book() -> None:
    import copy
    import io

    from rich.console import Console

    from pipelines.search.halving import successive_halving
    from pipelines.search.scorebook import ScoreBook
    from pipelines.spec.load import validate_document
    from pipelines.spec.plan import make_plan
    from tests.conftest import TINY_SPEC

    document = copy.deepcopy(TINY_SPEC)  # coefficients 0, 0.25, 0.5, 0.75, 1
    document["merge"]["search"] = {"strategy": "successive_halving", "eta": 3}
    plan = make_plan(validate_document(document))
    console, book, pool = Console(file=io.StringIO()), ScoreBook("halving"), PlantedPool()
    finetuned = {"perm1": 1.0, "perm2": 1.0}
    candidates = list(plan.candidates)
    rows, info = successive_halving(plan, pool, finetuned, console, candidates, book=book)
    assert [row["id"] for row in rows] == [c.id for c in candidates]
    full = [row for row in rows if row["full_split"]]
    # 5 on a subset, then the best 2 on the full split (a tie with 0.75 keeps the smaller 0.25)
    assert [row["coefficient"] for row in full] == [0.25, 0.5]
    assert full[1]["accuracy"] == {"perm1": 1.0, "perm2": 1.0}
    assert len(pool.scored) == 5 + 2 and [r["candidates"] for r in info["rungs"]] == [5, 2]
    again = PlantedPool()
    assert successive_halving(plan, again, finetuned, console, candidates, book=book)[0] == rows
    assert again.scored == []  # every score, and the split's row counts, came from the book

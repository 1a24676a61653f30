"""Champion promotion: a strictly better test objective, by at least min_improvement, on the
same tasks and datasets."""

from __future__ import annotations

from pipelines.search.selection import champion_score, decide_promotion

OBJECTIVE = "mean_normalized_accuracy"
CHAMPION = {
    "mergeline.tasks": "a,b",
    "mergeline.objective": OBJECTIVE,
    "mergeline.test_objective": "0.8",
    "mergeline.task.a.dataset_digest": "da",
    "mergeline.task.b.dataset_digest": "db",
}
DATASETS = {"a": "da", "b": "db"}


def test_the_first_version_becomes_champion() -> None:
    assert decide_promotion(0.1, OBJECTIVE, "a,b", None, 0.5, DATASETS) == (True, "no champion yet")


def test_min_improvement_is_the_margin_to_beat() -> None:
    promoted, reason = decide_promotion(0.86, OBJECTIVE, "a,b", CHAMPION, 0.05, DATASETS)
    assert promoted and "beats the champion's 0.8000" in reason
    promoted, reason = decide_promotion(0.84, OBJECTIVE, "a,b", CHAMPION, 0.05, DATASETS)
    assert not promoted and "by at least 0.05" in reason


def test_an_equal_score_does_not_replace_the_champion() -> None:
    promoted, reason = decide_promotion(0.8, OBJECTIVE, "a,b", CHAMPION, 0.0, DATASETS)
    assert not promoted and reason.startswith("not promoted") and "does not beat" in reason


def test_scores_on_other_tasks_datasets_or_objectives_are_not_compared() -> None:
    other_tasks = decide_promotion(0.99, OBJECTIVE, "a,b,c", CHAMPION, 0.0, DATASETS)
    other_data = decide_promotion(0.99, OBJECTIVE, "a,b", CHAMPION, 0.0, {"a": "da", "b": "new"})
    other_objective = decide_promotion(0.99, "mean_accuracy", "a,b", CHAMPION, 0.0, DATASETS)
    for promoted, reason in (other_tasks, other_data, other_objective):
        assert not promoted and "move the 'champion' alias by hand" in reason
    assert "['b']" in other_data[1] and OBJECTIVE in other_objective[1]


def test_the_champion_score_is_read_exactly_from_its_tag() -> None:
    assert champion_score({"mergeline.test_objective": repr(0.1 + 0.2)}) == 0.1 + 0.2
    assert champion_score({}) is None and champion_score(None) is None
    assert champion_score({"mergeline.test_objective": "nan"}) is None

"""The worker order of tests/ordering.py: slow files first in every worker's share, balanced."""

from __future__ import annotations

from tests.ordering import order_for_workers, recorded_durations, shares

SECONDS = {"e2e/a": 100.0, "e2e/b": 60.0, "e2e/c": 50.0, "integration/d": 10.0}


def _items() -> list[str]:
    slow = [f"e2e/{f}::{t}" for f in "abc" for t in range(2)] + ["integration/d::0"]
    return slow + [f"unit/u::{t}" for t in range(9)]


def _order(items: list[str], workers: int, seconds: dict[str, float] = SECONDS) -> list[str]:
    return order_for_workers(
        items, workers, lambda i: i.split("::")[0], lambda i: not i.startswith("unit/"), seconds
    )


def test_shares_are_what_worksteal_first_sends() -> None:
    assert shares(16, 2) == [8, 8] and shares(7, 2) == [3, 4] and shares(10, 3) == [3, 3, 4]


def test_slow_files_go_heaviest_first_to_the_least_loaded_share() -> None:
    ordered = _order(_items(), 2)
    first, second = ordered[:8], ordered[8:]
    assert sorted(ordered) == sorted(_items())  # nothing dropped or repeated
    assert first[:3] == ["e2e/a::0", "e2e/a::1", "integration/d::0"]  # 100 + 10 s
    assert second[:4] == ["e2e/b::0", "e2e/b::1", "e2e/c::0", "e2e/c::1"]  # 60 + 50 s
    assert all(i.startswith("unit/") for i in first[3:] + second[4:])
    assert first[3:] + second[4:] == [f"unit/u::{t}" for t in range(9)]  # unit order kept


def test_an_unrecorded_file_counts_as_the_mean() -> None:
    seconds = {"e2e/a": 100.0, "e2e/b": 60.0, "integration/d": 10.0}  # c: mean 56.7
    ordered = _order(_items(), 2, seconds)
    assert ordered[:3] == ["e2e/a::0", "e2e/a::1", "integration/d::0"]
    assert ordered[8:12] == ["e2e/b::0", "e2e/b::1", "e2e/c::0", "e2e/c::1"]


def test_one_worker_keeps_the_collection_order() -> None:
    assert _order(_items(), 1) == _items()


def test_a_slow_file_larger_than_a_share_puts_every_slow_test_first() -> None:
    items = ["unit/u::0"] + [f"e2e/a::{t}" for t in range(6)]
    assert _order(items, 2) == items[1:] + items[:1]


def test_the_recorded_durations_name_test_files_that_exist() -> None:
    from tests.conftest import REPO

    recorded = recorded_durations()
    assert recorded and all((REPO / name).is_file() for name in recorded)

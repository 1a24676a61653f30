"""The champion's candidate for ``merge.search.warm_start: champion``, read from its tags."""

from __future__ import annotations

import copy
import io

from rich.console import Console

from pipelines.search.warm_start import champion_candidate
from pipelines.spec.load import validate_document
from pipelines.spec.plan import Candidate, make_plan
from tests.conftest import TINY_SPEC


class Registry:
    enabled, disabled = True, None

    def __init__(self, version: dict | None) -> None:
        self.version = version

    def get_alias_version(self, name: str, alias: str) -> dict | None:
        assert (name, alias) == ("tiny", "champion")
        return self.version


def _champion(tags: dict[str, str] | None) -> tuple[Candidate | None, dict, str]:
    document = copy.deepcopy(TINY_SPEC)
    document["merge"]["search"] = {"warm_start": "champion"}
    out = io.StringIO()
    version = None if tags is None else {"version": 4, "tags": tags}
    found = champion_candidate(
        make_plan(validate_document(document)), Registry(version), Console(file=out)
    )
    return *found, out.getvalue()


TAGS = {
    "mergeline.tasks": "perm1,perm2",
    "mergeline.method": "ties",
    "mergeline.candidate.params": '{"density": 0.2}',
    "mergeline.candidate.coefficient": '{"perm1": 0.3, "perm2": 0.6}',
}


def test_the_champions_method_params_and_coefficients_become_a_candidate() -> None:
    candidate, info, said = _champion(TAGS)
    assert candidate == Candidate("ties", {"density": 0.2}, {"perm1": 0.3, "perm2": 0.6})
    assert info == {"champion_version": 4, "candidate": candidate.id}
    assert "version 4" in said


def test_no_champion_or_another_task_set_adds_nothing_and_says_why() -> None:
    candidate, info, said = _champion(None)
    assert candidate is None and "no champion of 'tiny' yet: nothing added" in said
    candidate, info, said = _champion(TAGS | {"mergeline.tasks": "perm1"})
    assert candidate is None and "serves tasks [perm1]" in info["reason"]
    candidate, _, said = _champion(TAGS | {"mergeline.method": "gone"})
    assert candidate is None and "not registered" in said

"""``merge.search.warm_start: champion``: the serving champion's candidate joins the search.

The registry version the ``champion`` alias points to records its method, params and
coefficients as tags (:func:`pipelines.run.publish.lineage_tags`); scoring that candidate on this
run's validation data means promotion compares like with like.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from pipelines.spec.plan import Candidate, Plan


def champion_candidate(
    plan: Plan, tracker: Any, console: Console
) -> tuple[Candidate | None, dict[str, Any]]:
    """The champion's candidate (None when there is none to add) and what the summary says."""
    from workers.merge import list_methods

    name = plan.spec.registered_model
    if not tracker.enabled:
        return _nothing(console, f"tracking is off ({tracker.disabled}), no champion to read")
    champion = tracker.get_alias_version(name, "champion")
    if champion is None:
        return _nothing(console, f"no champion of '{name}' yet")
    tags = champion.get("tags", {})
    tasks = ",".join(sorted(plan.task_names))
    if tags.get("mergeline.tasks") != tasks:
        shown = tags.get("mergeline.tasks", "unknown")
        return _nothing(console, f"the champion serves tasks [{shown}], not [{tasks}]")
    method = tags.get("mergeline.method")
    try:
        params = json.loads(tags.get("mergeline.candidate.params", "{}"))
        coefficient = json.loads(tags["mergeline.candidate.coefficient"])
    except (KeyError, ValueError):
        return _nothing(console, "the champion records no candidate")
    if method not in list_methods():
        return _nothing(console, f"the champion's method {method!r} is not registered here")
    candidate = Candidate(method, params, coefficient)
    console.print(
        f"warm start: the champion (version {champion['version']}) {candidate.id} is scored"
    )
    return candidate, {"champion_version": int(champion["version"]), "candidate": candidate.id}


def _nothing(console: Console, reason: str) -> tuple[None, dict[str, Any]]:
    console.print(f"warm start: {reason}: nothing added")
    return None, {"champion_version": None, "reason": reason}

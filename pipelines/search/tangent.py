"""Stage 5 on the driver for the tangent-space searches of DESIGN.md and MERGING.md.

Linear mode (scored as the linearized model; exact fast path where the method is linear in τ),
per-task coefficient search (coordinate ascent, a full grid or Optuna's TPE, with a budget),
the post-hoc linearization surrogate with verification of its best candidates, and task
negation. The plain standard-mode grid keeps its own path in `pipelines.search.grid`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.search.pool import ScorerPool
from pipelines.search.retrieval import per_task_lambda_candidates
from pipelines.search.scorebook import ScoreBook
from pipelines.search.selection import candidate_row, choose_best, objective_scores
from pipelines.spec.load import expand_params
from pipelines.spec.pipeline import Spec
from pipelines.spec.plan import Candidate, Plan
from pipelines.spec.search import resolve_search
from workers.search.fastpath import linear_weights
from workers.search.strategies import STRATEGIES, Point


@dataclass
class SearchOutcome:
    rows: list[dict[str, Any]]
    best: Candidate
    info: dict[str, Any] = field(default_factory=dict)


def task_scores(
    spec: Spec, accuracy: dict[str, float], reference: dict[str, dict[str, Any]], split: str
) -> dict[str, float]:
    """The objective columns of one candidate: mean (normalized) accuracy, and negation's."""
    finetuned = {t: reference[t]["finetuned"][split] for t in accuracy}
    scores = objective_scores(accuracy, finetuned)
    negate = spec.merge.negate
    if negate is not None:
        control_zero_shot = reference[negate.control]["zero_shot"][split]
        scores |= {
            "target_accuracy": accuracy[negate.target],
            "control_accuracy": accuracy[negate.control],
            "control_retention": accuracy[negate.control] / max(control_zero_shot, 1e-12),
            "negate": 1.0 - accuracy[negate.target],  # forgetting: higher is better
        }
    return scores


class TangentSearch:
    """Runs one search over ``pool`` (scorers holding the tangent evaluator) and chooses the
    best candidate."""

    def __init__(
        self,
        plan: Plan,
        pool: ScorerPool,
        reference: dict[str, dict[str, Any]],
        extra: list[Candidate] | None = None,
        book: ScoreBook | None = None,
    ) -> None:
        """``extra``: candidates always scored and considered (the champion's warm start);
        ``book``: stored scores to reuse (and to add this search's to)."""
        self.plan, self.spec, self.pool = plan, plan.spec, pool
        self.book = book or ScoreBook("")
        self.extra = list(extra or [])
        self.reference = reference
        self.settings = resolve_search(plan.spec)
        self.tasks = plan.task_names

    def run(self) -> SearchOutcome:
        s = self.settings
        info: dict[str, Any] = {
            "strategy": s.strategy,
            "per_task": s.per_task,
            "fast_path": s.fast_path,
        }
        if self.spec.merge.negate is not None:
            rows, candidates = self._score(self._negation_candidates())
            return SearchOutcome(rows, self._choose_negation(candidates, rows), info)
        if s.per_task:
            rows, candidates = self._per_task()
        else:
            rows, candidates = self._score(list(self.plan.candidates))
        known = {c.id for c in candidates}
        missing = [c for c in self.extra if c.id not in known]
        if missing:
            extra_rows, _ = self._score(missing)
            rows, candidates = rows + extra_rows, candidates + missing
        # tall_masks: each task keeps its own best λ_t, read off the grid as in standard mode
        finetuned = {t: self.reference[t]["finetuned"]["val"] for t in self.tasks}
        for candidate, row in per_task_lambda_candidates(rows, finetuned):
            rows, candidates = [*rows, row], [*candidates, candidate]
        if s.surrogate:
            return self._verify(rows, candidates, info)
        return SearchOutcome(rows, self._choose(candidates, rows), info)

    # ------------------------------------------------------------------ candidates
    def _negation_candidates(self) -> list[Candidate]:
        negate = self.spec.merge.negate
        out = []
        for candidate in self.plan.candidates:
            coefficients = {t: 0.0 for t in self.tasks}
            coefficients[negate.target] = -float(candidate.coefficient)
            out.append(Candidate(candidate.method, candidate.params, coefficients))
        return list(dict((c.id, c) for c in out).values())

    def _exact(self, candidate: Candidate) -> bool:
        if not (self.settings.fast_path or self.settings.surrogate):
            return False
        return (
            linear_weights(candidate.method, candidate.params, candidate.coefficient, self.tasks)
            is not None
        )

    # ------------------------------------------------------------------ scoring
    def _score(self, candidates: list[Candidate]) -> tuple[list[dict], list[Candidate]]:
        """Fast path (or surrogate) for the candidates it fits, forward passes for the rest."""
        fast = [c for c in candidates if self._exact(c)]
        slow = [c for c in candidates if not self._exact(c)]
        results: dict[str, dict[str, float]] = {}
        if fast:
            label = "surrogate" if self.settings.surrogate else "fast_path"
            found, missing = self.book.split(fast, split="val", by=label)
            if missing:
                scored = self.pool.fast_score(missing, "val")
                accuracy = [row["accuracy"] for row in scored]
                self.book.put_many(missing, accuracy, split="val", by=label)
                found |= {row["id"]: row["accuracy"] for row in scored}
            results |= {k: v | {"_by": label} for k, v in found.items()}
        if slow:
            results |= {k: v | {"_by": "forward"} for k, v in self._forward(slow, "val").items()}
        return [self._row(c, results[c.id]) for c in candidates], candidates

    def _forward(self, candidates: list[Candidate], split: str) -> dict[str, dict[str, float]]:
        """Real (linearized, in linear mode) forward passes fanned out over the pool; stored
        scores are reused."""
        results, candidates = self.book.split(candidates, split=split)
        if not candidates:
            return results

        def record(chunk: list[Candidate], scored: list[dict[str, Any]]) -> None:
            self.book.put_many(chunk, [row["accuracy"] for row in scored], split=split)
            for row in scored:
                results[row["id"]] = row["accuracy"]

        self.pool.score(candidates, split, progress="merge search", done=record)
        return results

    def _row(self, candidate: Candidate, accuracy: dict[str, Any]) -> dict[str, Any]:
        accuracy = dict(accuracy)
        scored_by = accuracy.pop("_by", "forward")
        objective = task_scores(self.spec, accuracy, self.reference, "val")
        return candidate_row(candidate, accuracy, objective, scored_by=scored_by)

    # ------------------------------------------------------------------ per task
    def _per_task(self) -> tuple[list[dict], list[Candidate]]:
        budget, seed = self.spec.merge.search.budget, self.spec.merge.search.seed
        # Points proposed at once: one per actor the spec asks for (not per actor started,
        # which depends on the cluster), so the same spec proposes the same points anywhere.
        batch = self.spec.merge.num_actors
        objective = self.spec.merge.objective
        finetuned = {t: self.reference[t]["finetuned"]["val"] for t in self.tasks}
        rows, candidates = [], []
        for spec_candidate in self.spec.merge.candidates:
            grid = spec_candidate.coefficient.points()
            for params in expand_params(spec_candidate.params):
                probe = Candidate(spec_candidate.method, params, dict.fromkeys(self.tasks, 1.0))
                if self._exact(probe):
                    label = "surrogate" if self.settings.surrogate else "fast_path"
                    arguments = (self.settings.strategy, grid, budget, objective, finetuned, seed)
                    key = self.book.key(
                        "per_task_search",
                        method=spec_candidate.method,
                        params=params,
                        arguments=arguments,
                        by=label,
                    )
                    found = self.book.get(key)
                    if found is None:
                        found = self.pool.fast_per_task_search(*arguments)
                        self.book.put(key, found)
                    for coefficients, accuracy in found:
                        candidate = Candidate(spec_candidate.method, params, coefficients)
                        candidates.append(candidate)
                        rows.append(self._row(candidate, accuracy | {"_by": label}))
                    continue

                def evaluate(points: list[Point], params=params, method=spec_candidate.method):
                    batch = [
                        Candidate(method, params, dict(zip(self.tasks, p, strict=True)))
                        for p in points
                    ]
                    scored, _ = self._score(batch)
                    candidates.extend(batch)
                    rows.extend(scored)
                    return [row["objective"][objective] for row in scored]

                STRATEGIES[self.settings.strategy](
                    evaluate, len(self.tasks), grid, budget, seed=seed, batch=batch
                )
        return rows, candidates

    # ------------------------------------------------------------------ choice
    def _choose(self, candidates: list[Candidate], rows: list[dict]) -> Candidate:
        scores = {row["id"]: row["objective"] for row in rows}
        return choose_best(candidates, scores, self.spec.merge.objective)

    def _verify(self, rows: list[dict], candidates: list[Candidate], info: dict) -> SearchOutcome:
        """Re-score the surrogate's best ``verify_top`` by real forward passes; pick among them."""
        objective = self.spec.merge.objective
        scores = {row["id"]: row["objective"] for row in rows}
        ranked = sorted(
            candidates,
            key=lambda c: (
                -round(scores[c.id][objective], 12),
                c.coefficient_norm(),
                c.method,
                c.id,
            ),
        )
        top = ranked[: self.spec.merge.search.verify_top]
        top += [c for c in ranked[len(top) :] if c.id in {e.id for e in self.extra}]
        real = self._forward(top, "val")
        by_id = {row["id"]: row for row in rows}
        for candidate in top:
            by_id[candidate.id] = self._row(candidate, real[candidate.id])
        verified = [by_id[c.id] for c in top]
        best = self._choose(top, verified)
        info |= {
            "surrogate": "posthoc_linear",
            "verified": len(top),
            "surrogate_best": ranked[0].id,
            "verified_best": best.id,
            "surrogate_best_is_verified_best": ranked[0].id == best.id,
        }
        return SearchOutcome([by_id[c.id] for c in candidates], best, info)

    def _choose_negation(self, candidates: list[Candidate], rows: list[dict]) -> Candidate:
        """Lowest target accuracy with control ≥ retention × zero-shot control (val)."""
        retention = self.spec.merge.negate.control_retention
        scores = {row["id"]: row["objective"] for row in rows}
        feasible = [c for c in candidates if scores[c.id]["control_retention"] >= retention - 1e-12]
        if feasible:
            return min(
                feasible,
                key=lambda c: (
                    round(scores[c.id]["target_accuracy"], 12),
                    c.coefficient_norm(),
                    c.id,
                ),
            )
        return min(candidates, key=lambda c: (-scores[c.id]["control_retention"], c.id))

"""A method's properties live in its registration, and they alone drive behaviour.

Retrieval (one model per task), linearity in the coefficients (fast path, fused kernel, LoRA
factor-space merges) and the data a method needs are declared with ``register(...)``; no code
under ``pipelines/`` or ``workers/`` decides them by testing a method's name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from pipelines.search.retrieval import per_task_lambda_candidates
from pipelines.spec.load import apply_overrides, validate_document
from pipelines.spec.plan import TALL_MASKS_LAMS, Candidate, make_plan, statistics_needs
from pipelines.spec.search import resolve_search
from storage.names import Name
from tests.conftest import REPO, TINY_SPEC
from tests.unit.test_merge_engine import CASES as ENGINE_CASES
from tests.unit.test_merge_engine import make_base, make_statistics, make_task_vectors
from workers.merge import LinearForm, get_method, list_methods, merge, registry
from workers.merge.backbone import finish, prepare_vectors, split_coefficient, sum_tasks
from workers.merge.engine import StateSource, merge_stream, plan_merge, specs_of
from workers.search.fastpath import linear_weights

SCANNED = ("pipelines", "workers")
TASKS = ["perm1", "perm2"]  # TINY_SPEC's


class ProbeRetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: Name
    lam: float = 0.4


class ProbeLinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    note: str = ""


class ProbeStatisticsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = 16


def probe_retrieval(base, task_vectors, coefficient, params):
    """Task t's own model θ0 + λ_t τ_t: one model per task."""
    return {name: base[name] + params.lam * task_vectors[params.task][name] for name in base}


def probe_linear(base, task_vectors, coefficient, params):
    """θ0 + (1/T) Σ_t α_t τ_t: linear, per-task coefficients, each divided by T."""
    scales, lam = split_coefficient(coefficient, list(task_vectors))
    prepared = prepare_vectors(task_vectors, scales)
    count = len(prepared)
    return {name: finish(base[name], sum_tasks(prepared, name) / count, lam) for name in base}


def probe_statistics(base, task_vectors, coefficient, params, statistics=None):
    """The mean of the task vectors; registered as reading Gram matrices."""
    return probe_linear(base, task_vectors, 1.0, params)


@pytest.fixture()
def probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three throwaway methods under names no method file uses, gone after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for implementation, properties in [
        (
            probe_retrieval,
            {
                "params_model": ProbeRetrievalParams,
                "retrieval": True,
                "uses_coefficient": False,
                "per_task_coefficients": False,
            },
        ),
        (probe_linear, {"params_model": ProbeLinearParams, "linear": LinearForm(mean=True)}),
        (
            probe_statistics,
            {
                "params_model": ProbeStatisticsParams,
                "statistics": "gram",
                "internal_params": ("statistics",),
            },
        ),
    ]:
        name = implementation.__name__
        monkeypatch.setattr(implementation, "__module__", f"tests.unit.{name}")  # its "file"
        registry.register(name, **properties)(implementation)


def _spec(*overrides: str):
    return validate_document(apply_overrides(TINY_SPEC, list(overrides)))


def test_a_retrieval_registration_makes_one_model_per_task_with_its_own_lambda(probes) -> None:
    plan = make_plan(_spec("merge.candidates=[{method: probe_retrieval}]"))
    assert sorted(c.params["lam"] for c in plan.candidates) == sorted(TALL_MASKS_LAMS)
    rows = [
        {
            "method": "probe_retrieval",
            "params": {"lam": lam},
            "accuracy": {"perm1": 0.5 + lam, "perm2": 0.9 - lam},
        }
        for lam in (0.2, 0.4)
    ]
    ((candidate, row),) = per_task_lambda_candidates(rows, {"perm1": 1.0, "perm2": 1.0})
    assert candidate.params == {"lam": {"perm1": 0.4, "perm2": 0.2}}
    assert row["accuracy"] == pytest.approx({"perm1": 0.9, "perm2": 0.7})


def test_each_task_of_a_retrieval_candidate_gets_its_own_params(probes) -> None:
    from pipelines.spec.plan import task_params

    candidate = Candidate("probe_retrieval", {"lam": {"perm1": 0.2, "perm2": 0.3}}, 1.0)
    assert task_params(candidate, TASKS) == {
        "perm1": {"lam": 0.2, "task": "perm1"},
        "perm2": {"lam": 0.3, "task": "perm2"},
    }
    assert task_params(Candidate("probe_linear", {}, 1.0), TASKS) is None


def test_a_linear_registration_gets_the_fast_path_and_the_fused_kernel(probes) -> None:
    assert linear_weights("probe_linear", {}, {"perm1": 1.0, "perm2": 0.5}, TASKS) == [0.5, 0.25]
    assert linear_weights("probe_linear", {"note": "x"}, 1.0, TASKS) is None  # params: not linear
    spec = _spec("finetune.mode=linear", "merge.candidates=[{method: probe_linear}]")
    settings = resolve_search(spec)
    assert (settings.per_task, settings.all_fast) == (True, True)
    # the surrogate ranks only linear merges: the spec validates (raises SpecError otherwise)
    _spec("merge.search.surrogate=posthoc_linear", "merge.candidates=[{method: probe_linear}]")

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=generator)}
    vectors = {t: {"w": torch.randn(3, 4, generator=generator)} for t in TASKS}
    coefficient = {"perm1": 0.75, "perm2": -0.5}
    plan = plan_merge(
        "probe_linear", specs_of(base), {t: specs_of(v) for t, v in vectors.items()}, coefficient
    )
    assert plan.kernel(plan.tensors[0]) == "linear"
    tasks = {t: StateSource(v) for t, v in vectors.items()}
    streamed = dict(merge_stream(plan, StateSource(base), tasks))
    torch.testing.assert_close(streamed, merge("probe_linear", base, vectors, coefficient))


def test_a_statistics_registration_is_planned_for(probes) -> None:
    plan = make_plan(_spec("merge.candidates=[{method: probe_statistics, params: {n: 8}}]"))
    assert statistics_needs(plan.candidates) == [("gram", 8)]


def test_a_registration_refuses_properties_its_params_cannot_honour(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(probe_linear, "__module__", "tests.unit.probe_linear")
    with pytest.raises(ValueError, match="needs params 'task' and 'lam'"):
        registry.register("probe_linear", params_model=ProbeLinearParams, retrieval=True)(
            probe_linear
        )
    with pytest.raises(ValueError, match="ignores its coefficient: it is not linear"):
        registry.register(
            "probe_linear",
            params_model=ProbeLinearParams,
            uses_coefficient=False,
            linear=LinearForm(),
        )(probe_linear)
    assert "probe_linear" not in list_methods()


def test_the_shipped_methods_declare_their_properties() -> None:
    assert [m for m in list_methods() if get_method(m).retrieval] == ["tall_masks"]
    linear = {m: get_method(m).linear for m in list_methods() if get_method(m).linear}
    assert linear == {"task_arithmetic": LinearForm(), "weight_average": LinearForm(mean=True)}
    assert {m: get_method(m).statistics for m in list_methods() if get_method(m).statistics} == {
        "fisher": "fisher",
        "regmean": "gram",
    }


_COLLECTION_CALLS = {"frozenset", "set", "tuple", "list"}


def _method_names(node: ast.AST, registered: set[str]) -> list[str]:
    """The registered method names a literal spells: one string, or a collection of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in registered else []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id in _COLLECTION_CALLS and len(node.args) == 1:
            return _method_names(node.args[0], registered)
        return []
    if isinstance(node, ast.Tuple | ast.List | ast.Set) and node.elts:
        strings = [e.value for e in node.elts if isinstance(e, ast.Constant)]
        if len(strings) == len(node.elts) and all(s in registered for s in strings):
            return list(strings)
    return []


def _names_a_method(node: ast.AST) -> bool:
    """Whether an expression reads a method's name: ``method``, ``c.method``, ``row["method"]``,
    ``plan.method.name``."""
    if isinstance(node, ast.Name):
        return node.id in {"method", "method_name"}
    if isinstance(node, ast.Attribute):
        if node.attr in {"method", "method_name"}:
            return True
        return node.attr == "name" and _names_a_method(node.value)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value in {"method", "method_name"}
    return False


def name_tests(source: str, registered: set[str]) -> list[tuple[int, str]]:
    """(line, text) of each decision by method name: a method name compared with a registered
    method's name (or a collection of them), or such a collection kept in a variable."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literal = any(_method_names(side, registered) for side in sides)
            if literal and any(_names_a_method(side) for side in sides):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            if not isinstance(node.value, ast.Constant) and _method_names(node.value, registered):
                found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_the_scan_finds_each_form_of_name_test() -> None:
    """The scanner itself: every form flagged, strings that are not decisions left alone."""
    registered = {"tall_masks", "task_arithmetic", "ties", "dare"}
    flagged = """
if candidate.method == "tall_masks": pass
if row["method"] in ("tall_masks",): pass
LINEAR = frozenset({"task_arithmetic"})
if method not in LINEAR: pass
if plan.method.name != "dare": pass
if "ties" == self.method.name: pass
"""
    assert [line for line, _ in name_tests(flagged, registered)] == [2, 3, 4, 6, 7]
    left_alone = '''
"""merge("tall_masks", base, vectors) retrieves one task."""
then: Literal["task_arithmetic", "ties"] = "task_arithmetic"
if params.then == "ties": pass
state = merge_state("task_arithmetic", base, vectors, 1.0)
if kind == "fisher": pass
'''
    assert name_tests(left_alone, registered) == []


def test_no_call_site_decides_by_method_name() -> None:
    registered = set(list_methods())
    found = []
    for package in SCANNED:
        for path in sorted(Path(REPO, package).rglob("*.py")):
            for line, text in name_tests(path.read_text(encoding="utf-8"), registered):
                found.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert found == [], "decide by the registration (workers.merge.registry), not the name:\n" + (
        "\n".join(found)
    )


SCALED = list(
    {repr((m, p)): (m, p) for m, p, _ in ENGINE_CASES if get_method(m).scales_delta}.values()
)


@pytest.mark.parametrize(("method", "params"), SCALED, ids=[f"{m}-{p}" for m, p in SCALED])
def test_a_scales_delta_method_is_theta0_plus_lambda_times_one_delta(method, params) -> None:
    """``scales_delta``: the merge at any shared λ is finish(θ0, Δ, λ) with Δ the merge onto a
    zero θ0 at λ = 1, bit for bit (a search reuses Δ across a coefficient grid)."""
    base = make_base()
    vectors = make_task_vectors(base)
    stats = make_statistics(method, base)
    extra = {} if stats is None else {"statistics": stats}
    zeros = {
        name: torch.zeros_like(t, dtype=torch.float64 if t.dtype == torch.float64 else None).to(
            torch.float64 if t.dtype == torch.float64 else torch.float32
        )
        for name, t in base.items()
    }
    delta = merge(method, zeros, vectors, 1.0, **params, **extra)
    for lam in (0.3, 1.7, -0.6):
        merged = merge(method, base, vectors, lam, **params, **extra)
        for name in base:
            assert torch.equal(merged[name], finish(base[name], delta[name], lam)), (lam, name)


def test_scales_delta_is_declared_by_exactly_the_methods_whose_merges_scale() -> None:
    """slerp interpolates on the sphere and model_stock and tall_masks ignore λ: none scales
    one delta; every other method does and says so."""
    assert {m for m in list_methods() if get_method(m).scales_delta} == set(list_methods()) - {
        "slerp",
        "model_stock",
        "tall_masks",
    }

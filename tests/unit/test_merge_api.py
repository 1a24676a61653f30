"""The merge entry point: registry, params and coefficient validation, negation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import Tensor

import workers.merge as merge_package
from storage.errors import MergeInputError
from tests.unit.test_merge_contract import DEFAULT_PARAMS, make_base, make_task_vectors, tasks_for
from workers.merge import get_method, list_methods, merge, negate, validate_task_vectors
from workers.merge.registry import register


@pytest.fixture()
def base() -> dict[str, Tensor]:
    return make_base()


@pytest.fixture()
def task_vectors(base) -> dict[str, dict[str, Tensor]]:
    return make_task_vectors(base)


def test_every_method_file_is_registered_under_its_name():
    package = Path(merge_package.__file__).parent
    files = {path.stem for path in package.glob("*.py")} - {"__init__"}
    assert set(list_methods()) == files - merge_package.SUPPORT_MODULES
    assert {"ties", "dare", "breadcrumbs", "tall_masks", "consensus"} <= set(list_methods())


def test_merge_package_imports_no_io_or_orchestration_library():
    forbidden = {"ray", "mlflow", "fsspec", "s3fs", "boto3", "botocore", "safetensors"}
    for path in Path(merge_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.name} imports {roots & forbidden}"


@pytest.mark.parametrize("name", list_methods())
def test_params_model_is_frozen_and_forbids_extra(name):
    config = get_method(name).params_model.model_config
    assert config["extra"] == "forbid" and config["frozen"] is True


@pytest.mark.parametrize("name", list_methods())
def test_unknown_param_names_method_and_param(name, base, task_vectors):
    params = {**DEFAULT_PARAMS.get(name, {}), "densty": 0.3}
    with pytest.raises(MergeInputError, match=f"^{name} param 'densty': Extra inputs"):
        merge(name, base, tasks_for(name, task_vectors), 1.0, **params)


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"scope": "layer"}, "scope"),
        ("ties", {"merge": "median"}, "merge"),
        ("dare", {"p": 1.0}, "p"),
        ("dare", {"seed": 1.5}, "seed"),
        ("breadcrumbs", {"beta": 1.0}, "beta"),
        ("breadcrumbs", {"gamma": -0.1}, "gamma"),
        ("consensus", {"k": -1}, "k"),
        ("consensus", {"k": True}, "k"),
        ("consensus", {"lam": float("nan")}, "lam"),
        ("tall_masks", {}, "task"),
        ("tall_masks", {"task": "a", "lam": -1.0}, "lam"),
    ],
)
def test_bad_params_name_method_and_param(name, params, field, base, task_vectors):
    with pytest.raises(MergeInputError, match=f"^{name} param '{field}'"):
        merge(name, base, task_vectors, 1.0, **params)


def test_cross_field_and_task_dependent_params_are_checked(base, task_vectors):
    with pytest.raises(MergeInputError, match="'density' and 'scope' apply only with then: ties"):
        merge("dare", base, task_vectors, density=0.5)
    with pytest.raises(
        MergeInputError, match="'task' is 'z', which has no task vector: choose one of a, b, c"
    ):
        merge("tall_masks", base, task_vectors, task="z")
    with pytest.raises(MergeInputError, match="consensus param 'lam' names tasks"):
        merge("consensus", base, task_vectors, lam={"a": 0.4})
    with pytest.raises(MergeInputError, match="'thresholds' applies only to a global ties trim"):
        merge(
            "ties",
            base,
            task_vectors,
            scope="per_tensor",
            thresholds={"a": 0.0, "b": 0.0, "c": 0.0},
        )
    with pytest.raises(MergeInputError, match="no valid value for task 'c'"):
        merge("ties", base, task_vectors, thresholds={"a": 0.0, "b": 0.0}, majority=1.0)
    with pytest.raises(MergeInputError, match="needs both 'thresholds'"):
        merge("ties", base, task_vectors, thresholds={"a": 0.0, "b": 0.0, "c": 0.0})
    with pytest.raises(MergeInputError, match="param 'majority' is 0.0: use 1.0 or -1.0"):
        merge("ties", base, task_vectors, thresholds=dict.fromkeys("abc", 0.0), majority=0.0)
    with pytest.raises(MergeInputError, match="'majority' applies only to a global ties trim"):
        merge("ties", base, task_vectors, scope="per_tensor", majority=1.0)


@pytest.mark.parametrize("coefficient", [float("nan"), float("inf"), True, "0.5", None])
def test_bad_coefficient_is_refused(coefficient, base, task_vectors):
    with pytest.raises(MergeInputError, match="coefficient of 'task_arithmetic'"):
        merge("task_arithmetic", base, task_vectors, coefficient)


def test_unknown_method_lists_known_names(base, task_vectors):
    with pytest.raises(
        MergeInputError,
        match="unknown merge method 'tie': choose one of breadcrumbs, .*weight_average",
    ):
        merge("tie", base, task_vectors)


def test_validate_task_vectors_refuses_empty_and_non_float_inputs(base, task_vectors):
    validate_task_vectors(base, task_vectors)
    with pytest.raises(MergeInputError, match="no task vectors"):
        validate_task_vectors(base, {})
    with pytest.raises(MergeInputError, match="base tensor 'steps' is torch.int64"):
        validate_task_vectors({**base, "steps": torch.tensor([1])}, task_vectors)
    base["layer1.bias"][0] = float("nan")
    with pytest.raises(MergeInputError, match="base tensor 'layer1.bias' has 1 NaN/Inf"):
        validate_task_vectors(base, task_vectors)


def test_registering_a_duplicate_or_misnamed_method_fails():
    def implementation(base, task_vectors, coefficient, params):
        return dict(base)

    model = get_method("task_arithmetic").params_model
    with pytest.raises(ValueError, match="'ties' is already registered by workers.merge.ties"):
        register("ties", params_model=model)(implementation)
    with pytest.raises(ValueError, match="must be registered from a file named averaging.py"):
        register("averaging", params_model=model)(implementation)
    assert "averaging" not in list_methods()


def test_task_arithmetic_is_linear_and_one_task_gives_the_fine_tuned_model(base, task_vectors):
    one = {"a": task_vectors["a"]}
    fine_tuned = {
        k: (base[k].double() + task_vectors["a"][k].double()).to(base[k].dtype) for k in base
    }
    for key, tensor in merge("task_arithmetic", base, one, 1.0).items():
        assert torch.equal(tensor, fine_tuned[key]), key
    full = merge("task_arithmetic", base, task_vectors, {"a": 0.5, "b": -1.0, "c": 2.0})
    parts = [
        merge("task_arithmetic", base, {t: task_vectors[t]}, c)
        for t, c in (("a", 0.5), ("b", -1.0), ("c", 2.0))
    ]
    key = "layer1.weight"
    assert torch.allclose(full[key], sum(p[key] - base[key] for p in parts) + base[key], atol=1e-5)


def test_negate_subtracts_and_validates(base, task_vectors):
    negated = negate(base, task_vectors["a"], 0.5)
    key = "layer1.weight"
    assert torch.allclose(negated[key], base[key] - 0.5 * task_vectors["a"][key])
    del task_vectors["a"][key]
    with pytest.raises(
        MergeInputError, match="task vector 'negated' has no tensor 'layer1.weight'"
    ):
        negate(base, task_vectors["a"], 0.5)
    with pytest.raises(MergeInputError, match="negation coefficient"):
        negate(base, task_vectors["b"], float("nan"))

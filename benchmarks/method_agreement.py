"""Agreement of mergeline's merge methods with mergekit and FusionBench on the same inputs.

    python benchmarks/method_agreement.py    # writes benchmarks/results/method_agreement.json

Builds seeded random float64 inputs (θ0 with two 2-D weights and two 1-D biases, three
fine-tuned models θ_t = θ0 + τ_t sharing a common direction, per-task input Gram matrices
G_t = XᵀX / n for both linear layers and positive diagonal Fishers), runs each method through
``workers.merge.merge`` and through the peer's own merge function, and records the largest
absolute difference per tensor kind (2-D / 1-D), relative to the largest entry of the peer's
merged update θ − θ0. A relative difference above 1e-5 is not rounding: the JSON then says
why, from the peer's source. Seeded random methods (della, dare) compare expectations: the
mean over ``--draws`` seeds on each side, with the Monte Carlo standard error of the
difference; they agree when no entry differs by more than 5 standard errors.

Peers run in their own virtualenvs, through a small script written to a temporary directory
(inputs and outputs as safetensors), created on first use and reused after: torch==2.13.0
first (the local CPU wheel), then the peer from PyPI.

- mergekit (``--mergekit-venv``, shared with benchmarks/merge_throughput.py): its merge
  methods' functional API (``mergekit.merge_methods.registry.get(name)`` called on one
  ``TensorGroup`` per tensor, what mergekit-yaml runs per tensor): slerp, model_stock, della,
  and ties / dare_linear as sanity rows.
- FusionBench (``--fusionbench-venv``, PyPI ``fusion-bench`` with all its dependencies): the
  module-level helpers that take task-vector / parameter dicts (TSV-M's
  ``compute_and_sum_svd_mem_reduction``, ``iso_c``, ``iso_cts``,
  ``merging_with_regmean_weights``, ``merging_with_fisher_weights``,
  ``slerp_on_state_dicts``) and ``ModelStock.run`` on a model pool of tiny modules.

A method that mergeline does not register yet is recorded as "not available in mergeline
yet"; a peer call that fails is recorded with its error. Both run with one torch thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "method_agreement.json"
CACHE = Path.home() / ".cache" / "mergeline"
TASKS = ("a", "b", "c")
SHAPES = {
    "layer0.weight": (12, 9),
    "layer0.bias": (12,),
    "layer1.weight": (8, 12),
    "layer1.bias": (8,),
}
LINEARS = ("layer0", "layer1")
ROUNDING = 1e-5  # relative difference below which two results agree
Z_LIMIT = 5.0  # Monte Carlo: standard errors of the difference below which expectations agree
PEER_PACKAGES = {"mergekit": "mergekit", "fusion_bench": "fusion-bench"}


@dataclass(frozen=True)
class Case:
    """One comparison: a mergeline method and the peer call that should compute the same."""

    name: str  # row name in the results
    method: str  # mergeline registry name
    peer: str  # "mergekit" or "fusion_bench"
    call: str  # what the peer script runs
    tasks: tuple[str, ...] = TASKS
    coefficient: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # mergeline params
    peer_params: dict[str, Any] = field(default_factory=dict)
    draws: int = 0  # > 0: seeded random, compare the means over this many seeds
    divergence: str = ""  # why the peer differs, from its source; kept when they differ
    note: str = ""  # what a difference within rounding comes from, when it is not rounding
    unbiased: bool = False  # random and E[θ] = θ0 + λ Σ τ_t by definition: test each side


CLAMP = (
    "layer1.bias has a negative mean pairwise cosine of its task vectors in these inputs "
    "(-0.086 over 3 tasks, -0.178 over 2). mergeline's model_stock counts a negative mean "
    "cosine as 0, so t = 0 and the tensor stays θ0 (a choice its docstring states; MERGING.md "
    "is silent); {peer} applies t = k cos / (1 + (k - 1) cos) as it is, a negative t that "
    "moves away from the fine-tunes"
)
OTHERS_AGREE = ". The other tensors agree to rounding (by_tensor)"
CASES = [
    Case("slerp", "slerp", "mergekit", "slerp", TASKS[:2], 0.3, peer_params={"t": 0.3}),
    Case("slerp", "slerp", "fusion_bench", "slerp", TASKS[:2], 0.3, peer_params={"t": 0.3}),
    Case("model_stock", "model_stock", "mergekit", "model_stock", divergence=CLAMP.format(
        peer="mergekit's model_stock (merge_methods/model_stock.py, keeping θ0 only where "
        "|1 + (k - 1) cos| < 1e-6)"
    ) + OTHERS_AGREE),
    Case("model_stock (2 tasks)", "model_stock", "mergekit", "model_stock", TASKS[:2],
         divergence=CLAMP.format(peer="mergekit's model_stock") + OTHERS_AGREE),
    Case("model_stock", "model_stock", "fusion_bench", "model_stock", divergence=(
        "Every tensor: FusionBench's ModelStock.run (method/model_stock/model_stock.py) "
        "averages the pairwise angles in degrees (np.rad2deg(acos(cos))) and takes the cosine "
        "of that mean when k > 2, where MERGING.md (and mergekit) average the pairwise "
        "cosines; cos(mean angle) != mean(cos), so t differs (~5e-4 relative here; with 2 "
        "tasks the tensors with a positive cosine agree, next row). layer1.bias, besides: "
        + CLAMP.format(peer="FusionBench (compute_ratio)")
    )),
    Case("model_stock (2 tasks)", "model_stock", "fusion_bench", "model_stock", TASKS[:2],
         divergence=CLAMP.format(peer="FusionBench's compute_ratio") + OTHERS_AGREE + (
        "; their ~4e-8 relative is FusionBench's EPS = 1e-8 added to the cosine's and the "
        "ratio's denominators"
    )),
    Case("della", "della", "mergekit", "della", params={"density": 0.5, "epsilon": 0.2},
         peer_params={"weight": 1.0, "density": 0.5, "epsilon": 0.1}, draws=10000, divergence=(
        "Same keep probabilities on both sides (mergekit keeps with density ± epsilon, a spread "
        "of 2ε, mergeline's ε is the full spread: 0.1 there is 0.2 here). Left: mergekit's "
        "della_magprune (sparsify.py) ranks |τ| within each row of a 2-D tensor (argsort along "
        "dim 1), not over the whole tensor, and rescales the kept entries to match the "
        "tensor's L1 norm (rescale_norm=l1, della's default) instead of by 1/(1 - p_i) per "
        "entry, so its expectation is not τ. 1-D tensors are ranked the same on both sides: "
        "their difference is the rescale alone"
    )),
    Case("della (1 task)", "della", "mergekit", "della", TASKS[:1],
         params={"density": 0.5, "epsilon": 0.2},
         peer_params={"weight": 1.0, "density": 0.5, "epsilon": 0.1}, draws=10000,
         unbiased=True, divergence=(
        "With one task the election keeps every surviving entry, so E[θ] = θ0 + λ τ when the "
        "pruning is unbiased: mergeline's mean matches it (ours_vs_exact_max_z), mergekit's "
        "does not: its L1-norm rescale (rescaled_masked_tensor) is not 1/(1 - p_i), and its "
        "per-row ranks give 2-D entries other keep probabilities"
    )),
    Case("ties (per_tensor)", "ties", "mergekit", "ties",
         params={"density": 0.5, "scope": "per_tensor"},
         peer_params={"weight": 1.0, "density": 0.5}),
    Case("dare_linear", "dare", "mergekit", "dare_linear",
         params={"p": 0.5, "then": "task_arithmetic"},
         peer_params={"weight": 1.0, "density": 0.5}, draws=10000, unbiased=True, divergence=(
        "mergekit's dare_linear rescales the kept entries to match the tensor's L1 norm "
        "(sparsify.py rescaled_masked_tensor, norm l1) instead of by 1/(1 - p): E[l1-rescaled] "
        "is not τ on small tensors (MERGING.md's known divergence)"
    )),
    Case("tsv", "tsv", "fusion_bench", "tsv", divergence=(
        "FusionBench's compute_and_sum_svd_mem_reduction (TSVM_utils.py, the paper's code) "
        "averages 1-D tensors over tasks (running mean) and keeps k = int(r / T) triplets per "
        "task, leaving r - kT columns of the concatenated U, Σ, V zero"
    )),
    Case("iso_c", "iso_c", "fusion_bench", "iso_c", divergence=(
        "FusionBench's iso_c (isotropic_merging/iso_utils.py, the paper's code) averages 1-D "
        "tensors over tasks (sum / T) and applies the isotropic spectrum only to 2-D tensors"
    )),
    Case("iso_cts", "iso_cts", "fusion_bench", "iso_cts", params={"common": 0.8},
         peer_params={"common_space_fraction": 0.8}, divergence=(
        "FusionBench's iso_cts (iso_utils.py) takes common = int(r · fraction), then rounds "
        "the task-specific total to a multiple of T: common = r - round((r - common) / T) · T, "
        "n_per_task = (r - common) / T; 1-D tensors are averaged"
    )),
    Case("regmean", "regmean", "fusion_bench", "regmean", params={"alpha": 0.9},
         peer_params={"reduce_non_diagonal_ratio": 0.9}, note=(
        "FusionBench (regmean/regmean.py) solves with torch.inverse, mergeline with "
        "torch.linalg.lstsq (gelsd): the ~3e-8 relative on 2-D weights is the Gram "
        "matrices' conditioning, both in float64"
    )),
    Case("fisher", "fisher", "fusion_bench", "fisher",
         peer_params={"normalize_fisher_weight": False, "minimal_fisher_weight": 1e-6},
         note=(
        "FusionBench's merging_with_fisher_weights (fisher_merging/fisher_merging.py) adds "
        "minimal_fisher_weight = 1e-6 to every F_t where mergeline clamps F_t at floor 1e-6: "
        "with F_t ≥ 0.01 here that moves the weights by ~1e-4 relative, the ~2e-6 seen"
    )),
    Case("fisher (FusionBench default normalize)", "fisher", "fusion_bench", "fisher",
         peer_params={"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6},
         divergence=(
        "FusionBench's default normalize_fisher_weight=True (config fisher_merging.yaml) first "
        "scales each task's Fishers by 1 / (its L2 norm over all parameters), normalised over "
        "tasks (get_models_fisher_norm): a task-level reweighting that Matena & Raffel's "
        "θ* = Σ F_t θ_t / Σ F_t does not have"
    )),
]  # fmt: skip

MERGEKIT_PEER = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get

torch.set_num_threads(1)
inputs, spec = load_file(sys.argv[1]), json.load(open(sys.argv[2]))
names, outputs, status = spec["names"], {}, {}


def merged(case):
    method = get(case["call"])
    base_id = case["tasks"][0] if case["call"] == "slerp" else "base"
    sources = {t: f"ft/{t}/{{}}" for t in case["tasks"]}
    if case["call"] != "slerp":
        sources = {"base": "base/{}", **sources}
    result = {}
    for name in names:
        tensors = [inputs[key.format(name)] for key in sources.values()]
        group = TensorGroup.from_tensors(
            tensors, ids=list(sources), base_index=list(sources).index(base_id), name=name
        )
        (result[name],) = method([group], parameters=case["peer_params"])
    return result


for case in spec["cases"]:
    try:
        if case["draws"]:
            total, squares = {}, {}
            for seed in range(case["draws"]):
                torch.manual_seed(seed)
                for name, tensor in merged(case).items():
                    total[name] = total.get(name, 0) + tensor
                    squares[name] = squares.get(name, 0) + tensor * tensor
            for name in names:
                outputs[f"{case['key']}/{name}"] = total[name] / case["draws"]
                outputs[f"{case['key']}/sq/{name}"] = squares[name] / case["draws"]
        else:
            for name, tensor in merged(case).items():
                outputs[f"{case['key']}/{name}"] = tensor.contiguous()
        status[case["key"]] = "ok"
    except Exception as error:
        status[case["key"]] = f"{type(error).__name__}: {error}"
save_file(outputs, sys.argv[3])
json.dump(status, open(sys.argv[4], "w"))
"""

FUSIONBENCH_PEER = """
import json, sys
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)
inputs, spec = load_file(sys.argv[1]), json.load(open(sys.argv[2]))
names, outputs, status = spec["names"], {}, {}
base = {n: inputs[f"base/{n}"] for n in names}


def finetuned(t):
    return {n: inputs[f"ft/{t}/{n}"] for n in names}


def task_vector(t):
    return {n: inputs[f"tv/{t}/{n}"] for n in names}


def module_of(state):
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    return root


def plus(update, scale):
    return {n: base[n] + scale * update[n] for n in names}


def merged(case):
    call, tasks, params = case["call"], case["tasks"], case["peer_params"]
    if call == "tsv":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )
        tvs = [task_vector(t) for t in tasks]
        return plus(compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"), case["coefficient"])
    if call == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c
        return plus(iso_c([task_vector(t) for t in tasks], accelerator="cpu"), case["coefficient"])
    if call == "iso_cts":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_cts
        update = iso_cts([task_vector(t) for t in tasks], accelerator="cpu", **params)
        return plus(update, case["coefficient"])
    if call == "regmean":
        from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
        grams = [
            {m: inputs[f"gram/{t}/{m}.weight"] for m in spec["linears"]} for t in tasks
        ]
        param_lists = {n: [finetuned(t)[n] for t in tasks] for n in names}
        return merging_with_regmean_weights(param_lists, grams, **params)
    if call == "fisher":
        from fusion_bench.method.fisher_merging.fisher_merging import (
            merging_with_fisher_weights,
        )
        fishers = [{n: inputs[f"fisher/{t}/{n}"] for n in names} for t in tasks]
        param_lists = {n: [finetuned(t)[n] for t in tasks] for n in names}
        scaling = torch.ones(len(tasks)) / len(tasks)  # fisher_merging's default
        return merging_with_fisher_weights(param_lists, fishers, scaling, **params)
    if call == "model_stock":
        from fusion_bench import BaseModelPool
        from fusion_bench.method.model_stock.model_stock import ModelStock
        pool = BaseModelPool(
            {"_pretrained_": module_of(base), **{t: module_of(finetuned(t)) for t in tasks}}
        )
        return ModelStock(ignore_keys=[], model_save_path=None).run(pool).state_dict()
    if call == "slerp":
        from fusion_bench.method.slerp.slerp import slerp_on_state_dicts
        return slerp_on_state_dicts(params["t"], finetuned(tasks[0]), finetuned(tasks[1]))
    raise ValueError(f"unknown call {call}")


for case in spec["cases"]:
    try:
        for name, tensor in merged(case).items():
            outputs[f"{case['key']}/{name}"] = tensor.detach().contiguous()
        status[case["key"]] = "ok"
    except Exception as error:
        status[case["key"]] = f"{type(error).__name__}: {error}"
save_file(outputs, sys.argv[3])
json.dump(status, open(sys.argv[4], "w"))
"""

PEER_SCRIPTS = {"mergekit": MERGEKIT_PEER, "fusion_bench": FUSIONBENCH_PEER}


def ensure_venv(venv: Path, package: str) -> str:
    """A virtualenv with torch==2.13.0 installed first, then `package`; returns its version."""
    python = venv / "bin" / "python"
    version = (
        "import importlib.metadata as m, sys; print(m.version(sys.argv[1]), m.version('torch'))"
    )
    found = subprocess.run([str(python), "-c", version, package], capture_output=True, text=True)
    if found.returncode != 0:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, package], check=True)
        found = subprocess.run(
            [str(python), "-c", version, package], capture_output=True, text=True, check=True
        )
    package_version, torch_version = found.stdout.split()
    if not torch_version.startswith("2.13.0"):
        raise SystemExit(f"{venv} has torch {torch_version}, expected 2.13.0")
    return package_version


def build_inputs(seed: int = 0) -> dict[str, Any]:
    """θ0, τ_t, θ_t, per-layer Gram matrices and diagonal Fishers, all float64 and seeded."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    base = {name: normal(*shape) for name, shape in SHAPES.items()}
    shared = {name: normal(*shape) for name, shape in SHAPES.items()}
    tvs = {t: {n: 0.05 * shared[n] + 0.05 * normal(*s) for n, s in SHAPES.items()} for t in TASKS}
    finetuned = {t: {n: base[n] + tvs[t][n] for n in SHAPES} for t in TASKS}
    grams: dict[str, dict[str, torch.Tensor]] = {}
    for t in TASKS:
        grams[t] = {}
        for layer in LINEARS:
            width = SHAPES[f"{layer}.weight"][1]
            rows = normal(32, width) @ (
                torch.eye(width, dtype=torch.float64) + 0.5 * normal(width, width)
            )
            grams[t][f"{layer}.weight"] = rows.T @ rows / rows.shape[0]
    fishers = {t: {n: normal(*s) ** 2 + 0.01 for n, s in SHAPES.items()} for t in TASKS}
    return {"base": base, "tvs": tvs, "finetuned": finetuned, "grams": grams, "fishers": fishers}


def flat_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat = {f"base/{n}": v for n, v in inputs["base"].items()}
    for kind, prefix in (
        ("tvs", "tv"),
        ("finetuned", "ft"),
        ("grams", "gram"),
        ("fishers", "fisher"),
    ):
        for t, state in inputs[kind].items():
            flat |= {f"{prefix}/{t}/{n}": v.contiguous() for n, v in state.items()}
    return flat


def case_key(case: Case) -> str:
    return f"{case.peer}:{case.name}"


def run_peer(
    peer: str, venv: Path, cases: list[Case], inputs: dict, root: Path
) -> tuple[dict, dict]:
    """Run the peer's script on its cases; returns (outputs by key, status by case key)."""
    from safetensors.torch import load_file, save_file

    script, spec = root / f"{peer}_peer.py", root / f"{peer}_cases.json"
    script.write_text(PEER_SCRIPTS[peer])
    save_file(flat_inputs(inputs), root / "inputs.safetensors")
    spec.write_text(json.dumps({
        "names": list(SHAPES), "linears": list(LINEARS),
        "cases": [{"key": case_key(c), "call": c.call, "tasks": list(c.tasks),
                   "coefficient": c.coefficient, "peer_params": c.peer_params, "draws": c.draws}
                  for c in cases],
    }))  # fmt: skip
    out, status = root / f"{peer}_out.safetensors", root / f"{peer}_status.json"
    command = [str(venv / "bin" / "python"), str(script), str(root / "inputs.safetensors")]
    done = subprocess.run(
        [*command, str(spec), str(out), str(status)], capture_output=True, text=True
    )
    if done.returncode != 0:
        error = f"peer script failed: {done.stderr.strip().splitlines()[-1:]}"
        return {}, {case_key(c): error for c in cases}
    return load_file(out), json.loads(status.read_text())


def run_ours(case: Case, inputs: dict) -> dict[str, torch.Tensor]:
    """mergeline's merge for the case (means and second moments over seeds when random)."""
    from workers.merge import get_method, merge

    params = dict(case.params)
    if case.method == "iso_cts":  # the fraction's name is the method's choice
        fields = get_method("iso_cts").params_model.model_fields
        name = next((f for f in fields if "common" in f), "common")
        params = {name: params.pop("common")}
    if case.method == "regmean":
        params["statistics"] = {t: inputs["grams"][t] for t in case.tasks}
    if case.method == "fisher":
        params["statistics"] = {t: inputs["fishers"][t] for t in case.tasks}
    tvs = {t: inputs["tvs"][t] for t in case.tasks}
    if not case.draws:
        return merge(case.method, inputs["base"], tvs, coefficient=case.coefficient, **params)
    total: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    for seed in range(case.draws):
        merged = merge(
            case.method, inputs["base"], tvs, coefficient=case.coefficient, seed=seed, **params
        )
        for name, tensor in merged.items():
            total[name] = total.get(name, 0) + tensor
            squares[name] = squares.get(name, 0) + tensor * tensor
    return {name: total[name] / case.draws for name in total} | {
        f"sq/{name}": squares[name] / case.draws for name in total
    }


def compare(case: Case, ours: dict, theirs: dict, base: dict, tvs: dict) -> dict:
    """Max |difference| per tensor kind, relative to the peer's largest update entry."""
    by_kind: dict[str, dict[str, Any]] = {}
    by_tensor: dict[str, float] = {}
    for name in SHAPES:
        kind = f"{len(SHAPES[name])}-D"
        mine, peer = ours[name].to(torch.float64), theirs[name].to(torch.float64)
        row = by_kind.setdefault(kind, {"max_abs_diff": 0.0, "max_update": 0.0})
        difference = (mine - peer).abs()
        by_tensor[name] = float(difference.max())
        row["max_abs_diff"] = max(row["max_abs_diff"], float(difference.max()))
        row["max_update"] = max(row["max_update"], float((peer - base[name]).abs().max()))
        if case.draws:
            variance = (ours[f"sq/{name}"] - mine**2).clamp(min=0) + (
                theirs[f"sq/{name}"] - peer**2
            ).clamp(min=0)
            error = (variance / case.draws).sqrt().clamp(min=1e-12)
            row["max_z"] = max(row.get("max_z", 0.0), float((difference / error).max()))
        if case.unbiased:  # each side's mean against the exact expectation θ0 + λ Σ τ_t
            exact = base[name] + case.coefficient * sum(tvs[t][name] for t in case.tasks)
            for side, mean, square in (("ours", mine, ours), ("peer", peer, theirs)):
                variance = (square[f"sq/{name}"] - mean**2).clamp(min=0) / case.draws
                z = float(((mean - exact).abs() / variance.sqrt().clamp(min=1e-12)).max())
                row[f"{side}_vs_exact_max_z"] = max(row.get(f"{side}_vs_exact_max_z", 0.0), z)
    for row in by_kind.values():
        row["max_rel_diff"] = row["max_abs_diff"] / max(row["max_update"], 1e-30)
        row["agrees"] = row["max_z"] < Z_LIMIT if case.draws else row["max_rel_diff"] <= ROUNDING
    agrees = all(row["agrees"] for row in by_kind.values())
    result: dict[str, Any] = {"agrees": agrees, "by_kind": by_kind, "by_tensor": by_tensor}
    if case.draws:
        result["draws"] = case.draws
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit-venv", type=Path, default=CACHE / "mergekit-venv")
    parser.add_argument("--fusionbench-venv", type=Path, default=CACHE / "fusionbench-venv")
    parser.add_argument("--draws", type=int, default=None, help="seeds per random method")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    from workers.merge import list_methods

    torch.set_num_threads(1)
    cases = [c if args.draws is None or not c.draws else Case(**{**c.__dict__, "draws": args.draws})
             for c in CASES]  # fmt: skip
    venvs = {"mergekit": args.mergekit_venv, "fusion_bench": args.fusionbench_venv}
    versions = {peer: ensure_venv(venvs[peer], PEER_PACKAGES[peer]) for peer in venvs}
    inputs = build_inputs()
    available = set(list_methods())
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mergeline-agree-") as root:
        for peer in venvs:
            mine = [c for c in cases if c.peer == peer]
            outputs, status = run_peer(peer, venvs[peer], mine, inputs, Path(root))
            for case in mine:
                key = case_key(case)
                row: dict[str, Any] = {"peer": peer, "peer_version": versions[peer],
                                       "mergeline_method": case.method, "peer_call": case.call,
                                       "tasks": len(case.tasks), "coefficient": case.coefficient,
                                       "params": case.params, "peer_params": case.peer_params,
                                       "peer_status": status.get(key)}  # fmt: skip
                if case.method not in available:
                    row["status"] = "not available in mergeline yet"
                elif status.get(key) != "ok":
                    row["status"] = f"peer failed: {status.get(key)}"
                else:
                    theirs = {k.removeprefix(f"{key}/"): v for k, v in outputs.items()
                              if k.startswith(f"{key}/")}  # fmt: skip
                    try:
                        ours = run_ours(case, inputs)
                    except Exception as error:  # a method mid-integration: record, go on
                        row["status"] = f"mergeline failed: {type(error).__name__}: {error}"
                    else:
                        row |= {"status": "compared"} | compare(
                            case, ours, theirs, inputs["base"], inputs["tvs"]
                        )
                        if not row["agrees"]:
                            row["explanation"] = case.divergence or "not explained yet"
                        elif case.note:
                            row["note"] = case.note
                rows[key] = row
    result = {
        "comparisons": rows,
        "inputs": {
            "dtype": "float64", "seed": 0, "tasks": list(TASKS),
            "shapes": {n: list(s) for n, s in SHAPES.items()},
            "task_vectors": "0.05 · shared + 0.05 · own standard normal, per tensor",
            "gram": "XᵀX / 32, X = 32 normal rows times (I + 0.5 · normal), per linear layer",
            "fisher": "normal² + 0.01",
        },
        "agreement": {
            "deterministic": f"max |ours − peer| / max |peer − θ0| ≤ {ROUNDING}, per tensor kind",
            "random": f"means over seeds differ by < {Z_LIMIT} Monte Carlo standard errors",
        },
        "versions": {**versions, "torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/method_agreement.py",
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print_table(rows)


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'peer:method':52} {'kind':5} {'max|Δ|':>10} {'rel':>10} {'z':>7}  status")
    for key, row in rows.items():
        if row["status"] != "compared":
            print(f"{key:52} {'':5} {'':>10} {'':>10} {'':>7}  {row['status']}")
            continue
        for kind, numbers in row["by_kind"].items():
            z = f"{numbers['max_z']:7.1f}" if "max_z" in numbers else f"{'':>7}"
            verdict = "agrees" if numbers["agrees"] else "DIFFERS"
            print(f"{key:52} {kind:5} {numbers['max_abs_diff']:10.2e} "
                  f"{numbers['max_rel_diff']:10.2e} {z}  {verdict}")  # fmt: skip
    for key, row in rows.items():
        if "explanation" in row:
            print(f"\n{key}: {row['explanation']}")


if __name__ == "__main__":
    main()

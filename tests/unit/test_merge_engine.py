"""The streaming engine: the in-memory `merge()` result, tensor by tensor, from files."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipelines.commands.merge_files import merge_files
from storage.digest import digest_state
from storage.errors import ArtifactError, MergeInputError
from storage.shards import INDEX_NAME, SafetensorsReader, ShardedWriter, digest_model
from workers.merge import get_method, merge
from workers.merge.engine import StateSource, merge_stream, plan_merge, specs_of, trim_thresholds
from workers.merge.kernels import Workspace, kth_largest
from workers.merge.ties import global_trim_thresholds

TASKS = ("a", "b", "c")
CASES = [
    ("weight_average", {}, 0.8),
    ("task_arithmetic", {}, 0.3),
    ("task_arithmetic", {}, {"a": 0.2, "b": -0.5, "c": 1.0}),
    ("ties", {}, 1.0),
    ("ties", {"scope": "per_tensor", "density": 0.5}, 0.8),
    ("ties", {"scope": "per_tensor", "merge": "max"}, {"a": 0.2, "b": 0.5, "c": 1.0}),
    ("ties", {"scope": "per_tensor", "merge": "sum", "density": 1.0}, 1.2),
    ("ties", {"merge": "max", "density": 0.3}, {"a": 0.2, "b": 0.5, "c": 1.0}),
    ("dare", {"seed": 7}, 0.5),
    ("dare", {"then": "ties", "p": 0.3}, 1.0),
    ("breadcrumbs", {"beta": 0.5, "gamma": 0.2}, 0.7),
    ("breadcrumbs", {"beta": 0.5, "gamma": 0.2, "then": "ties"}, 0.7),
    ("consensus", {"k": 2}, 0.6),
    ("consensus", {"use_ties": True, "k": 1}, {"a": 0.2, "b": 0.5, "c": 1.0}),
    ("tall_masks", {"task": "b", "lam": 0.3}, 1.0),
    ("tall_masks", {"task": "a", "use_ties": True}, 1.0),
    ("della", {"seed": 3}, 0.7),
    ("della", {"density": 0.3, "epsilon": 0.5}, {"a": 0.2, "b": -0.5, "c": 1.0}),
    ("model_stock", {}, 1.0),
    ("tsv", {}, 0.8),
    ("tsv", {"fraction": 0.5}, {"a": 0.2, "b": -0.5, "c": 1.0}),
    ("iso_c", {}, 1.2),
    ("iso_cts", {"common": 0.5}, 0.9),
    ("regmean", {"alpha": 0.7}, 1.0),
    ("regmean", {}, {"a": 0.2, "b": -0.5, "c": 1.0}),
    ("fisher", {}, 0.8),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for m, p, _ in CASES]


def make_base(dtypes: bool = True) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(30, 16, generator=generator),
        "layer.0.weight": torch.randn(16, 16, generator=generator),
        "layer.0.bias": torch.randn(16, generator=generator),
        "layer.1.weight": torch.randn(8, 16, generator=generator),
        "scale": torch.randn((), generator=generator),
    }
    if dtypes:
        base["norm.half"] = torch.randn(6, generator=generator).to(torch.bfloat16)
        base["norm.double"] = torch.randn(5, generator=generator, dtype=torch.float64)
    return base


def make_task_vectors(base: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    vectors = {
        task: {
            name: torch.randn(t.shape, generator=generator).to(t.dtype) for name, t in base.items()
        }
        for task in TASKS
    }
    vectors["a"]["layer.0.weight"][0] = 0.0  # exact zero sign sums for the election
    vectors["b"]["layer.0.weight"][0] = 0.0
    vectors["c"]["layer.0.weight"][1] = vectors["a"]["layer.0.weight"][1]  # equal magnitudes
    return vectors


def make_statistics(method: str, base: dict[str, Tensor]) -> dict[str, dict[str, Tensor]] | None:
    """Seeded statistics of a data-aware method (Gram of 2-D weights, Fisher of all), else None."""
    kind = get_method(method).statistics
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(5)
    stats: dict[str, dict[str, Tensor]] = {task: {} for task in TASKS}
    for task in TASKS:
        for name, tensor in base.items():
            if kind == "fisher":
                stats[task][name] = torch.rand(tensor.shape, generator=generator)
            elif tensor.dim() == 2:
                rows = torch.randn(24, tensor.shape[1], generator=generator)
                stats[task][name] = rows.T @ rows / 24
    return stats


def stream_all(method, params, coefficient, base, vectors, reuse_buffers) -> dict[str, Tensor]:
    plan = plan_merge(
        method, specs_of(base), {t: specs_of(v) for t, v in vectors.items()}, coefficient, params
    )
    sources = {task: StateSource(v) for task, v in vectors.items()}
    stream = merge_stream(
        plan,
        StateSource(base),
        sources,
        reuse_buffers=reuse_buffers,
        statistics=make_statistics(method, base),
    )
    return {name: tensor.clone() for name, tensor in stream}


@pytest.mark.parametrize("reuse_buffers", [False, True])
@pytest.mark.parametrize(("method", "params", "coefficient"), CASES, ids=IDS)
def test_streamed_merge_equals_in_memory_merge(method, params, coefficient, reuse_buffers) -> None:
    base = make_base()
    vectors = make_task_vectors(base)
    stats = make_statistics(method, base)
    extra = {} if stats is None else {"statistics": stats}
    expected = merge(method, base, vectors, coefficient, **params, **extra)
    streamed = stream_all(method, params, coefficient, base, vectors, reuse_buffers)
    assert list(streamed) == list(base)
    for name in base:
        assert streamed[name].dtype == base[name].dtype
        assert torch.equal(streamed[name], expected[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_global_ties_elects_with_the_whole_backbones_majority(dtype) -> None:
    # test_merge_methods.py's hand-computed case: w alone has a + majority, v alone a −, the
    # backbone −; the fused kernel (float32) and the method per tensor (float64) both stream.
    base = {"w": torch.zeros(3, dtype=dtype), "v": torch.zeros(5, dtype=dtype)}
    vectors = {
        "a": {"w": torch.tensor([2, 3, 1.0]), "v": torch.tensor([-1, -1, -1, -1, 5.0])},
        "b": {"w": torch.tensor([-2, 1, 1.0]), "v": torch.tensor([-1, -1, -1, -1, -5.0])},
    }
    vectors = {task: {n: x.to(dtype) for n, x in v.items()} for task, v in vectors.items()}
    streamed = stream_all("ties", {"density": 1.0}, 1.0, base, vectors, reuse_buffers=True)
    assert torch.equal(streamed["w"], torch.tensor([-2, 2, 1.0], dtype=dtype))
    assert torch.equal(streamed["v"], torch.tensor([-1, -1, -1, -1, -5.0], dtype=dtype))
    in_memory = merge("ties", base, vectors, 1.0, density=1.0)
    assert all(torch.equal(streamed[name], in_memory[name]) for name in base)


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize(
    ("method", "params", "coefficient"),
    [("task_arithmetic", {}, 0.4), ("ties", {"scope": "per_tensor"}, 1.0), ("ties", {}, 1.0)],
)
def test_merge_from_files_into_shards_equals_in_memory(
    tmp_path: Path, method, params, coefficient, mmap
) -> None:
    base = make_base(dtypes=False)
    vectors = make_task_vectors(base)
    save_file(base, tmp_path / "base.safetensors")
    for task, vector in vectors.items():
        save_file(vector, tmp_path / f"{task}.safetensors")
    readers = {t: SafetensorsReader(tmp_path / f"{t}.safetensors", mmap=mmap) for t in TASKS}
    result = merge_files(
        SafetensorsReader(tmp_path / "base.safetensors", mmap=mmap), readers, tmp_path / "out",
        method, coefficient, params, max_shard_bytes=1024,
        side_files={"config.json": b"{}"},
    )  # fmt: skip
    assert result["shards"] > 1
    assert (tmp_path / "out" / "config.json").read_bytes() == b"{}"
    expected = merge(method, base, vectors, coefficient, **params)
    with SafetensorsReader(tmp_path / "out") as merged:
        assert sorted(merged.names()) == sorted(base)
        for name in base:
            assert torch.equal(merged.read(name), expected[name]), name


def test_shards_and_index_follow_the_hugging_face_layout(tmp_path: Path) -> None:
    tensors = make_base() | {"count": torch.arange(5), "flags": torch.tensor([True, False])}
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path / "model", specs, max_shard_bytes=1500, metadata={"k": "v"})
    assert not (tmp_path / "model").exists()  # invisible until finished
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    directory = writer.finish()
    index = json.loads((directory / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    loaded: dict[str, Tensor] = {}
    for shard in shards:  # each shard is a valid safetensors file on its own
        loaded |= load_file(str(directory / shard))
    assert set(loaded) == set(index["weight_map"]) == set(tensors)
    with SafetensorsReader(directory) as reader, SafetensorsReader(directory, mmap=True) as mapped:
        for name, tensor in tensors.items():
            assert torch.equal(loaded[name], tensor)
            assert torch.equal(reader.read(name), tensor) and torch.equal(mapped.read(name), tensor)
            buffer = torch.empty_like(tensor)
            assert reader.read(name, out=buffer) is not None and torch.equal(buffer, tensor)
    no_scalars = {k: v for k, v in tensors.items() if v.dim()}  # digest_state needs dim >= 1
    save_file(no_scalars, tmp_path / "single.safetensors")
    with SafetensorsReader(tmp_path / "single.safetensors") as reader:
        assert digest_model(reader) == digest_state(no_scalars)


def test_writer_refuses_out_of_order_and_non_empty_directories(tmp_path: Path) -> None:
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    writer = ShardedWriter(tmp_path / "out", specs)
    with pytest.raises(ValueError, match="expected 'a', got 'b'"):
        writer.write("b", torch.zeros(3))
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ArtifactError, match="not empty"):
        ShardedWriter(tmp_path / "full", specs)


class CountingSource:
    """Hands out a fresh tensor per read and counts how many of them are alive at once."""

    def __init__(self, state: dict[str, Tensor], counter: dict[str, int]) -> None:
        self.state, self.counter = state, counter

    def _released(self) -> None:
        self.counter["alive"] -= 1

    def read(self, name: str, out: Tensor | None = None) -> Tensor:
        tensor = self.state[name].clone() if out is None else out.copy_(self.state[name])
        self.counter["alive"] += 1
        self.counter["reads"] += 1
        self.counter["peak"] = max(self.counter["peak"], self.counter["alive"])
        weakref.finalize(tensor, self._released)
        return tensor


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {}),
        ("ties", {"scope": "per_tensor"}),
        ("ties", {}),
        ("dare", {"then": "ties"}),
        ("breadcrumbs", {}),
        ("consensus", {}),
        ("della", {}),
        ("model_stock", {}),
        ("tsv", {}),
        ("iso_c", {}),
        ("iso_cts", {}),
        ("regmean", {}),
        ("fisher", {}),
    ],
)
def test_peak_memory_is_one_tensor_per_input_not_the_model(method, params) -> None:
    generator = torch.Generator().manual_seed(2)
    base = {f"layer.{i}.weight": torch.randn(8, 8, generator=generator) for i in range(12)}
    vectors = {t: {n: torch.randn(8, 8, generator=generator) for n in base} for t in TASKS}
    counter = {"alive": 0, "peak": 0, "reads": 0}
    plan = plan_merge(method, specs_of(base), {t: specs_of(base) for t in TASKS}, 0.5, params)
    sources = {task: CountingSource(v, counter) for task, v in vectors.items()}
    stats = make_statistics(method, base)
    for reuse in (False, True):
        merged = 0
        stream = merge_stream(
            plan, CountingSource(base, counter), sources, reuse_buffers=reuse, statistics=stats
        )
        for _name, _tensor in stream:
            merged += 1
        assert merged == len(base)
    assert counter["reads"] >= 2 * len(base) * (len(TASKS) + 1)  # every input was read
    assert counter["peak"] <= len(TASKS) + 1  # θ0 and each τ_t of one tensor, never the model


def test_engine_rejects_mismatched_task_vectors_naming_the_first() -> None:
    base = make_base(dtypes=False)
    vectors = make_task_vectors(base)
    specs = {t: specs_of(v) for t, v in vectors.items()}
    specs["b"] = [s for s in specs["b"] if s.name != "layer.0.bias"]
    with pytest.raises(MergeInputError, match="'b' has no tensor 'layer.0.bias'"):
        plan_merge("ties", specs_of(base), specs)
    vectors["c"]["layer.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeInputError, match="'c' tensor 'layer.1.weight' has shape"):
        plan_merge("ties", specs_of(base), {t: specs_of(v) for t, v in vectors.items()})
    with pytest.raises(MergeInputError, match="ties param 'density'"):
        plan_merge("ties", specs_of(base), {"a": specs_of(base)}, 1.0, {"density": 2})


def test_non_finite_inputs_are_refused_by_the_fused_kernels() -> None:
    base = make_base(dtypes=False)
    vectors = make_task_vectors(base)
    vectors["b"]["layer.1.weight"][2, 3] = float("nan")
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(
            MergeInputError, match="task vector 'b' tensor 'layer.1.weight' holds NaN/Inf"
        ):
            stream_all(method, {"scope": "per_tensor"} if method == "ties" else {}, 1.0, base,
                       vectors, True)  # fmt: skip


@pytest.mark.parametrize("size", [1, 7, 1000, 4099])
def test_kth_largest_is_exact(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    values = torch.randn(size, generator=generator).abs()
    values[: size // 3] = values[0]  # many equal values
    values[size // 2 :: 5] = 0.0
    for k in sorted({1, max(1, size // 5), max(1, size // 2), size}):
        expected = float(values.kthvalue(size - k + 1).values)
        assert kth_largest(values, k, Workspace()) == expected


@pytest.mark.parametrize("coefficient", [1.0, {"a": 0.3, "b": -2.0, "c": 1.0}])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 1.0])
def test_float32_global_thresholds_equal_the_library_radix_select(density, coefficient) -> None:
    base = make_base(dtypes=False)
    vectors = make_task_vectors(base)
    plan = plan_merge("ties", specs_of(base), {t: specs_of(v) for t, v in vectors.items()},
                      coefficient, {"density": density})  # fmt: skip
    sources = {task: StateSource(v) for task, v in vectors.items()}

    def stream():
        return ((task, vectors[task][name]) for name in base for task in TASKS)

    expected = global_trim_thresholds(stream, density, coefficient)
    assert trim_thresholds(plan, sources) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average", "ties"])
def test_the_fused_kernels_merge_half_precision_exactly_as_the_method(method, dtype) -> None:
    base = {name: t.to(dtype) for name, t in make_base(dtypes=False).items()}
    vectors = {
        t: {n: v.to(dtype) for n, v in tv.items()} for t, tv in make_task_vectors(base).items()
    }
    coefficient = {"a": 0.3, "b": 0.9, "c": -0.4} if method != "weight_average" else 0.7
    plan = plan_merge(
        method, specs_of(base), {t: specs_of(v) for t, v in vectors.items()}, coefficient
    )
    kernel = "ties" if method == "ties" else "linear"
    assert {plan.kernel(spec) for spec in plan.tensors} == {kernel}
    expected = merge(method, base, vectors, coefficient)
    streamed = stream_all(method, {}, coefficient, base, vectors, reuse_buffers=True)
    for name in base:
        assert streamed[name].dtype == dtype
        assert torch.equal(streamed[name], expected[name]), name
    doubled = plan_merge(
        method,
        specs_of({n: t.double() for n, t in base.items()}),
        {t: specs_of({n: x.double() for n, x in v.items()}) for t, v in vectors.items()},
        coefficient,
    )
    assert {doubled.kernel(spec) for spec in doubled.tensors} == {None}  # float64 stays exact


class RowCounting(StateSource):
    """A state source that counts the row blocks read."""

    blocks = 0

    def read_rows(self, name, start, stop, out=None):
        RowCounting.blocks += 1
        return super().read_rows(name, start, stop, out)


SIX = ("a", "b", "c", "d", "e", "f")  # with more than 4 tasks Tensor.sum orders differently


@pytest.mark.parametrize("tasks", [3, 6])
@pytest.mark.parametrize(
    ("method", "params", "coefficient"),
    [
        ("task_arithmetic", {}, {"a": 0.3, "b": 0.9, "c": -0.4}),
        ("weight_average", {}, 0.7),
        ("ties", {}, 1.0),
        ("ties", {"scope": "per_tensor", "density": 0.5}, 0.8),
        ("ties", {"merge": "sum", "density": 0.3}, {"a": 0.2, "b": 0.5, "c": 1.0}),
        ("ties", {"scope": "per_tensor", "merge": "max"}, 1.1),
    ],
)
def test_large_tensors_merge_in_blocks_of_rows_bit_for_bit(
    monkeypatch, method, params, coefficient, tasks
):
    from workers.merge import blocks

    monkeypatch.setattr(blocks, "BLOCK_BYTES", 64)  # 16 float32 entries: most tensors split
    base = make_base()
    vectors = make_task_vectors(base)
    generator = torch.Generator().manual_seed(9)
    for task in SIX[3:tasks]:
        vectors[task] = {
            n: torch.randn(t.shape, generator=generator).to(t.dtype) for n, t in base.items()
        }
    if isinstance(coefficient, dict):
        coefficient = {task: coefficient.get(task, 0.6) for task in vectors}
    expected = merge(method, base, vectors, coefficient, **params)
    plan = plan_merge(
        method, specs_of(base), {t: specs_of(v) for t, v in vectors.items()}, coefficient, params
    )
    RowCounting.blocks = 0
    sources = {task: RowCounting(v) for task, v in vectors.items()}
    stream = merge_stream(plan, RowCounting(base), sources, reuse_buffers=True)
    streamed = {name: tensor.clone() for name, tensor in stream}
    assert RowCounting.blocks > 4 * len(base)  # the large tensors went in blocks
    for name in base:
        assert streamed[name].dtype == base[name].dtype
        assert torch.equal(streamed[name], expected[name]), name


def test_theta0_plus_lambda_delta_in_blocks_of_rows_equals_the_method(monkeypatch) -> None:
    from workers.merge import blocks, engine
    from workers.merge.engine import ZeroSource, scaled_stream

    monkeypatch.setattr(blocks, "BLOCK_BYTES", 64)
    base = make_base()
    vectors = make_task_vectors(base)
    zero = [
        engine.TensorSpec(
            s.name, torch.float64 if s.dtype == torch.float64 else torch.float32, s.shape
        )
        for s in specs_of(base)
    ]
    plan = plan_merge("tsv", zero, {t: specs_of(v) for t, v in vectors.items()}, 1.0)
    sources = {task: StateSource(v) for task, v in vectors.items()}
    delta = {n: t.clone() for n, t in merge_stream(plan, ZeroSource(zero), sources)}
    RowCounting.blocks = 0
    scaled = dict(scaled_stream(specs_of(base), RowCounting(base), RowCounting(delta), 0.8))
    assert RowCounting.blocks > 4 * len(base)
    expected = merge("tsv", base, vectors, 0.8)
    for name in base:
        assert torch.equal(scaled[name], expected[name]), name

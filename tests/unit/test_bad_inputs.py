# ruff: noqa: E501  (a table reads best one case per line)
"""Every bad input: exit code 2, a short message naming what is wrong, no traceback, nothing
published. The CLI runs in-process (its real entry point), so the table stays fast."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from tests.conftest import REPO, TINY_SPEC

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


def _tiny(tmp_path: Path, **changes: object) -> str:
    """A copy of the tiny spec with top-level sections replaced, written to a file."""
    document = {**TINY_SPEC, **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


S = "--set"
HUGE = 200_000  # characters of one bad value: the error line must still be short
# (id, argv builder taking tmp_path, fragment expected in the message)
CASES = [
    # --- spec: unknown fields, wrong types, out-of-range values
    ("unknown-top-field", lambda t: ["validate", QUICKSTART, S, "colour=blue"], "colour"),
    ("unknown-nested-field", lambda t: ["validate", QUICKSTART, S, "finetune.epochs=3"], "finetune.epochs"),
    ("steps-string", lambda t: ["validate", QUICKSTART, S, "finetune.steps=many"], "finetune.steps"),
    ("steps-negative", lambda t: ["validate", QUICKSTART, S, "finetune.steps=-1"], "finetune.steps"),
    ("steps-zero", lambda t: ["validate", QUICKSTART, S, "finetune.steps=0"], "finetune.steps"),
    ("batch-size-zero", lambda t: ["validate", QUICKSTART, S, "finetune.batch_size=0"], "finetune.batch_size"),
    ("lr-negative", lambda t: ["validate", QUICKSTART, S, "finetune.lr=-0.1"], "finetune.lr"),
    ("val-fraction-zero", lambda t: ["validate", QUICKSTART, S, "evaluation.val_fraction=0"], "evaluation.val_fraction"),
    ("val-fraction-one", lambda t: ["validate", QUICKSTART, S, "evaluation.val_fraction=1"], "evaluation.val_fraction"),
    ("val-max-zero", lambda t: ["validate", QUICKSTART, S, "evaluation.val_max=0"], "evaluation.val_max"),
    ("density-zero", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=ties", S, "merge.candidates.0.params.density=0"], "density"),
    ("density-above-one", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=ties", S, "merge.candidates.0.params.density=1.5"], "density"),
    ("dare-p-one", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=dare", S, "merge.candidates.0.params.p=1.0"], "merge.candidates[0].params"),
    ("unknown-method-param", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.params.density=0.2"], "merge.candidates[0]"),
    ("coefficient-nan", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.coefficient.values=[.nan]"], "finite"),
    ("coefficient-inf", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.coefficient.stop=.inf"], "finite"),
    ("coefficient-empty", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.coefficient.values=[]"], "coefficient.values"),
    ("coefficient-num-zero", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.coefficient.num=0"], "coefficient.num"),
    ("no-candidates", lambda t: ["validate", QUICKSTART, S, "merge.candidates=[]"], "merge.candidates"),
    ("no-tasks", lambda t: ["validate", QUICKSTART, S, "tasks=[]"], "tasks"),
    # --- spec: unknown method / mode / source / scheme
    ("unknown-method", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=magic"], "unknown merge method"),
    ("unknown-mode", lambda t: ["validate", QUICKSTART, S, "finetune.mode=quadratic"], "finetune.mode"),
    ("unknown-dataset-source", lambda t: ["validate", QUICKSTART, S, "tasks.0.dataset.source=ftp"], "tasks[0].dataset"),
    ("unknown-model-source", lambda t: ["validate", QUICKSTART, S, "base_model.source=zoo"], "base_model"),
    ("unknown-builtin-model", lambda t: ["validate", QUICKSTART, S, "base_model.name=resnet"], "base_model.name"),
    ("unknown-storage-scheme", lambda t: ["validate", QUICKSTART, S, "storage.uri=gs://bucket/x"], "storage.uri"),
    ("unknown-tracking-scheme", lambda t: ["validate", QUICKSTART, S, "tracking.uri=postgres://db"], "tracking.uri"),
    ("unknown-objective", lambda t: ["validate", QUICKSTART, S, "merge.objective=vibes"], "merge.objective"),
    ("unknown-transform", lambda t: ["validate", QUICKSTART, S, "tasks.0.dataset.transform.kind=blur"], "transform.kind"),
    # --- spec: task names
    ("duplicate-task-names", lambda t: ["validate", QUICKSTART, S, "tasks.1.name=digits-perm1"], "used twice"),
    ("task-name-dotdot", lambda t: ["validate", QUICKSTART, S, "tasks.0.name=../escape"], "path component"),
    ("task-name-slash", lambda t: ["validate", QUICKSTART, S, "tasks.0.name=a/b"], "path component"),
    ("task-name-empty", lambda t: ["validate", QUICKSTART, S, "tasks.0.name="], "tasks[0].name"),
    ("spec-name-unsafe", lambda t: ["validate", QUICKSTART, S, "name=../../etc"], "field 'name'"),
    # --- spec: the file itself
    ("yaml-syntax", lambda t: ["validate", _write(t, "name: [oops\n")], "YAML"),
    ("empty-file", lambda t: ["validate", _write(t, "")], "empty"),
    ("comment-only-file", lambda t: ["validate", _write(t, "# nothing here\n")], "empty"),
    ("non-mapping", lambda t: ["validate", _write(t, "- just\n- a list\n")], "mapping"),
    ("scalar-document", lambda t: ["validate", _write(t, "42\n")], "mapping"),
    ("missing-spec-file", lambda t: ["run", str(t / "absent.yaml")], "does not exist"),
    ("linear-with-zero3", lambda t: ["validate", QUICKSTART, S, "finetune.mode=linear", S, "finetune.deepspeed.zero_stage=3"], "ZeRO stage 3"),
    ("bad-override-syntax", lambda t: ["validate", QUICKSTART, S, "no-equals-sign"], "dotted.key=value"),
    ("bad-override-index", lambda t: ["validate", QUICKSTART, S, "tasks.9.name=x"], "tasks.9"),
    ("bad-override-yaml", lambda t: ["validate", QUICKSTART, S, "finetune.steps=[1"], "not valid YAML"),
    # --- data (run: fails while fingerprinting, before any service starts)
    ("unknown-dataset-name", lambda t: ["run", _tiny(t), S, "tasks.0.dataset.name=imagenet"], "tasks[0].dataset.name"),
    ("missing-classes", lambda t: ["run", _tiny(t), S, "tasks.0.dataset.classes=[3, 11]"], "[11] do not exist"),
    ("one-class-only", lambda t: ["validate", _tiny(t), S, "tasks.0.dataset.classes=[3]"], "tasks[0].dataset.classes"),
    ("split-too-small", lambda t: ["run", _tiny(t), S, "tasks.0.dataset.name=iris", S, "evaluation.val_fraction=0.001"], "too few"),
    ("mismatched-feature-dims", lambda t: ["run", _tiny(t), S, "tasks.1.dataset.name=wine", S, "tasks.1.dataset.pool=all", S, "tasks.1.dataset.transform.kind=none"], "feature dimensions"),
    ("pretrain-dims-mismatch", lambda t: ["run", _tiny(t), S, "base_model.pretrain.dataset.name=iris", S, "base_model.pretrain.dataset.pool=all"], "pretrain"),
    ("square-transform-on-tabular", lambda t: ["run", _tiny(t), S, "tasks.0.dataset.name=wine", S, "tasks.0.dataset.transform.kind=rot90"], "square"),
    # --- services (bounded time, never a hang)
    ("unreachable-ray", lambda t: ["run", _tiny(t), S, "compute.ray_address=127.0.0.1:1"], "unreachable"),
    ("malformed-ray-address", lambda t: ["run", _tiny(t), S, "compute.ray_address=nowhere"], "compute.ray_address"),
    ("unreachable-tracking", lambda t: ["run", _tiny(t), S, "tracking.uri=http://127.0.0.1:1"], "127.0.0.1:1"),
    # --- issue 19 (B): names that become paths, store keys or MLflow names: one rule, at load time
    ("registered-model-escapes-store", lambda t: ["run", _tiny(t), S, "tracking.registered_model=../../../../x", S, "tracking.on_error=warn"], "tracking.registered_model"),
    ("registered-model-mlflow-refuses", lambda t: ["run", _tiny(t), S, "tracking.registered_model=team/digits"], "tracking.registered_model"),
    ("registered-model-colon", lambda t: ["validate", QUICKSTART, S, "tracking.registered_model=team:digits"], "tracking.registered_model"),
    ("experiment-unsafe", lambda t: ["validate", QUICKSTART, S, "tracking.experiment=../x"], "tracking.experiment"),
    ("method-name-path", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=../ties"], "merge.candidates[0].method"),
    ("negate-target-unsafe", lambda t: ["validate", QUICKSTART, S, "merge.objective=negate", S, "merge.negate.target=a/b", S, "merge.negate.control=digits-perm1"], "merge.negate.target"),
    ("task-name-trailing-newline", lambda t: ["validate", _tiny(t, tasks=[{"name": "perm1\n", "dataset": TINY_SPEC["tasks"][0]["dataset"]}, TINY_SPEC["tasks"][1]])], "tasks[0].name"),
    ("task-name-colon", lambda t: ["validate", QUICKSTART, S, "tasks.0.name=a:b"], "tasks[0].name"),
    ("spec-name-too-long", lambda t: ["validate", QUICKSTART, S, "name=" + "x" * 65], "field 'name'"),
    ("tall-masks-task-param-unsafe", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=tall_masks", S, "merge.candidates.0.params.task=../x"], "merge.candidates[0].params"),
    # --- issue 19 (B): YAML 1.2 scalars (off/no stay text) and duplicate keys
    ("fast-path-real-boolean", lambda t: ["validate", QUICKSTART, S, "merge.fast_path=false"], "merge.fast_path"),
    ("duplicate-top-level-key", lambda t: ["validate", _write(t, "name: a\nname: b\ntasks: []\n")], "lines 1 and 2"),
    ("duplicate-nested-key", lambda t: ["validate", _write(t, "name: a\nfinetune:\n  steps: 300\n  steps: 2\n")], "'steps' is given twice"),
    ("duplicate-key-in-set", lambda t: ["validate", QUICKSTART, S, "finetune={steps: 3, steps: 4}"], "given twice"),
    # --- issue 19 (B): error lines quote user input cut to a readable length, whatever its size
    ("huge-task-name-set", lambda t: ["validate", QUICKSTART, S, "tasks.0.name=" + "x" * 5_000_000], "…"),
    ("huge-task-name-file", lambda t: ["validate", _tiny(t, tasks=[{"name": "y" * HUGE, "dataset": {"source": "sklearn"}}])], "…"),
    ("huge-unknown-key", lambda t: ["validate", QUICKSTART, S, "k" * HUGE + "=1"], "…"),
    ("huge-override-no-equals", lambda t: ["validate", QUICKSTART, S, "k" * HUGE], "…"),
    ("huge-override-bad-index", lambda t: ["validate", QUICKSTART, S, "tasks.9.name=" + "x" * HUGE], "…"),
    ("huge-storage-uri", lambda t: ["validate", QUICKSTART, S, "storage.uri=gs://" + "b" * HUGE], "storage.uri"),
    ("huge-tracking-uri", lambda t: ["validate", QUICKSTART, S, "tracking.uri=ftp://" + "b" * HUGE], "tracking.uri"),
    ("huge-method-name", lambda t: ["validate", QUICKSTART, S, "merge.candidates.0.method=" + "m" * HUGE], "…"),
    ("huge-data-file-name", lambda t: ["validate", QUICKSTART, S, "tasks.0.dataset={source: files, train: " + "d" * HUGE + ", test: t.csv}"], "…"),
    # --- issue 19 (C): output paths, stores that do not exist
    ("summary-is-a-directory", lambda t: ["run", _tiny(t), "--summary", str(t)], "--summary"),
    ("summary-parent-is-a-file", lambda t: ["run", _tiny(t), "--summary", _tiny(t) + "/summary.json"], "is a file"),
    ("report-out-is-a-file", lambda t: ["report", "20250101-000000-aaaaaa", "--store", f"file://{t}", "--out", _tiny(t)], "--out"),
    ("runs-store-missing", lambda t: ["runs", "--store", f"file://{t}/absent"], "does not exist"),
    ("report-run-id-trailing-newline", lambda t: ["report", "20250101-000000-aaaaaa\n", "--store", f"file://{t}", "--out", str(t / "r")], "run id"),
    ("ls-store-missing", lambda t: ["ls", "--store", f"file://{t}/absent"], "does not exist"),
    ("report-store-missing", lambda t: ["report", "20250101-000000-aaaaaa", "--store", f"file://{t}/absent", "--out", str(t / "r")], "does not exist"),
    # --- issue 19 (C): text that is not UTF-8, label typos
    ("text-csv-not-utf8", lambda t: ["run", _files_spec(t, "csv", _LATIN1_CSV, _HF_BASE, text_column="text")], "line 3 is not valid utf-8"),
    ("text-jsonl-not-utf8", lambda t: ["run", _files_spec(t, "jsonl", _LATIN1_JSONL, _HF_BASE, text_column="text")], "line 2 is not valid utf-8"),
    ("text-unknown-encoding", lambda t: ["validate", _files_spec(t, "csv", _LATIN1_CSV, _HF_BASE, text_column="text", encoding="klingon-8")], "klingon-8"),
    ("label-typo-huge", lambda t: ["run", _files_spec(t, "csv", _typo_csv(10**12))], "row 17"),
    ("label-negative", lambda t: ["run", _files_spec(t, "csv", _typo_csv(-3))], "row 17"),
    ("num-classes-huge", lambda t: ["run", _files_spec(t, "csv", _typo_csv(1), num_classes=10**12)], "num_classes"),
    # --- issue 13: instruction data for a causal LM (prompt / completion or messages columns)
    ("prompt-without-completion", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, prompt_column="prompt")], "prompt_column needs completion_column"),
    ("prompt-and-text-columns", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, text_column="prompt", **_PROMPT_COLUMNS)], "set text_column or prompt_column/messages_column"),
    ("messages-and-prompt-columns", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, messages_column="m", **_PROMPT_COLUMNS)], "set messages_column or prompt_column/completion_column"),
    ("prompt-with-label-column", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, label_column="y", **_PROMPT_COLUMNS)], "label_column has no meaning"),
    ("overflow-unknown", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, overflow="truncate", **_PROMPT_COLUMNS)], "overflow"),
    ("prompt-column-absent", lambda t: ["run", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, prompt_column="question", completion_column="completion")], "no column 'question'"),
    ("completion-cell-missing", lambda t: ["run", _files_spec(t, "jsonl", _PROMPTS_JSONL + b'{"prompt": "why", "completion": null}\n', _LM_BASE, **_PROMPT_COLUMNS)], "column 'completion', row 4 (counting from 0) is missing"),
    ("prompt-cell-empty", lambda t: ["run", _files_spec(t, "csv", b"prompt,completion\nwhy,because\n,nothing\n", _LM_BASE, **_PROMPT_COLUMNS)], "column 'prompt', row 1 (counting from 0) is empty"),
    ("messages-end-with-user", lambda t: ["run", _files_spec(t, "jsonl", b'{"m": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', _LM_BASE, messages_column="m")], "the last message must be the assistant's answer"),
    ("messages-csv-not-json", lambda t: ["run", _files_spec(t, "csv", b"m\n[{oops\n", _LM_BASE, messages_column="m")], "column 'm', row 0 (counting from 0) is not a JSON list"),
    # --- issue 13: multiple-choice data (choices_column + answer_column) and choice_accuracy
    ("answer-without-choices", lambda t: ["validate", _files_spec(t, "jsonl", _CHOICES_JSONL, _LM_BASE, prompt_column="q", answer_column="a")], "answer_column needs choices_column"),
    ("choices-without-answer", lambda t: ["validate", _files_spec(t, "jsonl", _CHOICES_JSONL, _LM_BASE, prompt_column="q", choices_column="c")], "choices_column needs answer_column"),
    ("choices-without-prompt", lambda t: ["validate", _files_spec(t, "jsonl", _CHOICES_JSONL, _LM_BASE, choices_column="c", answer_column="a")], "choices_column needs prompt_column"),
    ("choices-with-messages", lambda t: ["validate", _files_spec(t, "jsonl", _CHOICES_JSONL, _LM_BASE, messages_column="m", **_CHOICE_COLUMNS)], "choices_column takes prompt_column, not messages_column"),
    ("choices-with-completion", lambda t: ["validate", _files_spec(t, "jsonl", _CHOICES_JSONL, _LM_BASE, completion_column="x", **_CHOICE_COLUMNS)], "set completion_column or choices_column/answer_column"),
    ("choice-accuracy-without-choices", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, **_PROMPT_COLUMNS), S, "evaluation.metric=choice_accuracy"], "'choice_accuracy' needs choices_column and answer_column"),
    ("causal-lm-reads-text-column", lambda t: ["validate", _files_spec(t, "jsonl", b'{"text": "hi", "label": 0}\n', _LM_BASE, text_column="text")], "base_model.kind 'causal_lm' trains on prompt -> completion"),
    ("classifier-reads-prompt-column", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _HF_BASE, **_PROMPT_COLUMNS)], "prompt_column needs base_model.kind: causal_lm"),
    ("gguf-file-on-a-classifier", lambda t: ["validate", _files_spec(t, "jsonl", b'{"text": "hi", "label": 0}\n', _HF_BASE | {"gguf_file": "m.gguf"}, text_column="text")], "base_model.gguf_file holds a causal LM"),
    ("search-on-nll", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, **_PROMPT_COLUMNS), S, "evaluation.metric=nll"], "'nll' is reported, not optimised"),
    ("surrogate-on-a-causal-lm", lambda t: ["validate", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, **_PROMPT_COLUMNS), S, "merge.search.surrogate=posthoc_linear"], "a causal_lm's candidates are scored by forward passes"),
    ("diagnose-a-causal-lm", lambda t: ["diagnose", "disentanglement", _files_spec(t, "jsonl", _PROMPTS_JSONL, _LM_BASE, **_PROMPT_COLUMNS), "--tasks", "one,two", "--out", str(t)], "base_model.kind 'causal_lm' has none"),
    ("choice-accuracy-classifier", lambda t: ["validate", QUICKSTART, S, "evaluation.metric=choice_accuracy"], "does not score a classification task"),
    ("answer-index-out-of-range", lambda t: ["run", _files_spec(t, "jsonl", _CHOICES_JSONL + b'{"q": "why", "c": ["x", "y"], "a": 2}\n', _LM_BASE, **_CHOICE_COLUMNS)], "column 'a', row 4 (counting from 0) has 2, not a choice index"),
    ("answer-text-not-a-choice", lambda t: ["run", _files_spec(t, "jsonl", b'{"q": "why", "c": ["x", "y"], "a": "y"}\n{"q": "why", "c": ["x", "y"], "a": "z"}\n', _LM_BASE, **_CHOICE_COLUMNS)], "column 'a', row 1 (counting from 0) has 'z', not one of the row's choices"),
    ("one-choice", lambda t: ["run", _files_spec(t, "jsonl", _CHOICES_JSONL + b'{"q": "why", "c": ["x"], "a": 0}\n', _LM_BASE, **_CHOICE_COLUMNS)], "column 'c', row 4 (counting from 0) needs a list of at least two choices"),
    ("empty-choice", lambda t: ["run", _files_spec(t, "csv", b'q,c,a\nwhy,"[""x"", "" ""]",0\n', _LM_BASE, **_CHOICE_COLUMNS)], "column 'c', row 0 (counting from 0) choice 1 is empty"),
    ("choices-csv-not-json", lambda t: ["run", _files_spec(t, "csv", b"q,c,a\nwhy,[oops,0\n", _LM_BASE, **_CHOICE_COLUMNS)], "column 'c', row 0 (counting from 0) is not a JSON list of choices"),
    # --- issue 19 (C): resource requests a local Ray can never grant (refused, never a hang)
    ("cpus-beyond-local-ray", lambda t: ["run", _tiny(t), S, "compute.num_cpus=2", S, "finetune.resources.num_cpus=4"], "finetune.resources.num_cpus"),
    ("gpus-on-a-cpu-ray", lambda t: ["run", _tiny(t), S, "compute.num_cpus=2", S, "finetune.resources.num_gpus=64"], "finetune.resources.num_gpus"),
    ("diagnose-cpus-beyond-local-ray", lambda t: ["diagnose", "disentanglement", _tiny(t), "--tasks", "perm1,perm2", "--out", str(t), S, "compute.num_cpus=2", S, "finetune.resources.num_cpus=4"], "finetune.resources.num_cpus"),
    ("workers-beyond-local-ray", lambda t: ["run", _tiny(t), S, "compute.num_cpus=2", S, "finetune.resources.num_workers=4", S, "finetune.deepspeed.zero_stage=0"], "finetune.resources.num_workers"),
]

_HF_BASE = {"source": "hf", "model": "/nonexistent/minilm"}  # the data fails before the model loads
_LATIN1_CSV = "text,label\nfine,0\ncaf\u00e9,1\nrain,0\nsun,1\n".encode("latin-1")
_LM_BASE = _HF_BASE | {"kind": "causal_lm"}
_PROMPT_COLUMNS = {"prompt_column": "prompt", "completion_column": "completion"}
_CHOICE_COLUMNS = {"prompt_column": "q", "choices_column": "c", "answer_column": "a"}
_CHOICES_JSONL = b"".join(b'{"q": "q%d", "c": ["a%d", "b%d"], "a": %d}\n' % (i, i, i, i % 2) for i in range(4))
_PROMPTS_JSONL = b"".join(b'{"prompt": "q%d", "completion": "a%d"}\n' % (i, i) for i in range(4))
_LATIN1_JSONL = '{"text": "fine", "label": 0}\n{"text": "caf\u00e9", "label": 1}\n'.encode("latin-1")


def _typo_csv(label: int) -> bytes:
    rows = [f"{i},{i % 3}" for i in range(40)]
    rows[17] = f"17,{label}"
    return ("x,label\n" + "\n".join(rows) + "\n").encode()


def _files_spec(tmp_path: Path, suffix: str, content: bytes, base: dict | None = None, **dataset: object) -> str:
    """The tiny spec with both tasks reading one file of ``content``."""
    path = tmp_path / f"data.{suffix}"
    path.write_bytes(content)
    files = {"source": "files", "train": str(path), "test": str(path), **dataset}
    changes: dict[str, object] = {"tasks": [{"name": n, "dataset": files} for n in ("one", "two")]}
    return _tiny(tmp_path, **changes, **({"base_model": base} if base else {}))


@pytest.mark.parametrize(("argv", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_error(argv, fragment: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mergeline", *argv(tmp_path)])
    with pytest.raises(SystemExit) as caught:
        main()
    out, err = capsys.readouterr()
    assert caught.value.code == 2, err
    assert fragment in err, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 4, err
    assert max(len(line) for line in lines) <= 1100, err[:2000]  # however long the input
    assert err.startswith("error:")
    assert not (tmp_path / ".mergeline" / "store" / "models").exists()
    assert not list(tmp_path.rglob("manifest.json"))


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "spec.yaml", "--bogus"], "No such option: --bogus"),
        (["bogus"], "No such command 'bogus'"),
        (["run"], "Missing argument"),
    ],
)
def test_a_command_line_typo_gets_usage_and_exit_2_not_a_traceback(
    argv: list[str], fragment: str, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", ["mergeline", *argv])
    with pytest.raises(SystemExit) as caught:
        main()
    out, err = capsys.readouterr()
    assert caught.value.code == 2, err
    assert fragment in err and "Traceback" not in out + err
    assert err.startswith("Usage: mergeline") and len(err.splitlines()) <= 5, err

"""Load a spec from YAML, apply ``--set dotted.key=value`` overrides, validate it."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.spec.base import has_credentials
from pipelines.spec.pipeline import Spec
from pipelines.spec.search import check_search
from pipelines.spec.yaml_reader import DuplicateKeyError, load_yaml
from storage.errors import MergeInputError, SpecError
from storage.quoting import QUOTE_LIMIT, cut, quoted


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], value parsed as a YAML scalar or list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {quoted(text)} is not of the form dotted.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except DuplicateKeyError as error:
        raise SpecError(f"--set {quoted(text)}: {error.what}: keep one") from None
    except yaml.YAMLError as error:
        raise SpecError(
            f"--set {quoted(text)}: the value is not valid YAML ({error.problem})"
        ) from None
    return key.strip().split("."), value


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``document`` with each override applied in order."""
    result = copy.deepcopy(document)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, where, text)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise SpecError(f"--set {quoted(text)}: {quoted(where)} is not a mapping or list")
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, ".".join(path), text)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise SpecError(
                f"--set {quoted(text)}: the parent of {quoted(last)} is not a mapping or list"
            )
    return result


def _list_index(node: list[Any], part: str, where: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise SpecError(
            f"--set {quoted(text)}: {quoted(where)} is not an index of a list of {len(node)}"
        )
    return int(part)


def read_document(path: str | Path) -> dict[str, Any]:
    spec_path = Path(path)
    if not spec_path.is_file():
        raise SpecError(f"spec file {quoted(str(spec_path))} does not exist: check the path")
    try:
        document = load_yaml(spec_path.read_text(encoding="utf-8"))
    except DuplicateKeyError as error:
        raise SpecError(f"{spec_path}: {error.problem}: keep one") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "syntax error"
        raise SpecError(f"{spec_path}: YAML {problem}{where}: fix the syntax") from None
    except UnicodeDecodeError:
        raise SpecError(f"{spec_path}: not a UTF-8 text file") from None
    if document is None:
        raise SpecError(f"{spec_path}: the file is empty: write a spec (see examples/)")
    if not isinstance(document, dict):
        raise SpecError(f"{spec_path}: the document must be a mapping of spec fields")
    return document


def validate_document(document: dict[str, Any], origin: str = "spec") -> Spec:
    try:
        spec = Spec.model_validate(locate_files(document))
    except ValidationError as error:
        raise SpecError(f"{origin}: {describe_validation_error(error)}") from None
    check_candidates(spec, origin)
    check_search(spec, origin)
    return spec


def locate_files(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` whose local dataset files and model directory are absolute paths.

    Ray workers do not share the driver's working directory, so relative paths are resolved
    once, against the directory the spec is loaded in. A value the spec refuses is left as it
    is, for validation to name its field.
    """
    if not isinstance(document, dict):
        return document  # validation refuses it
    result = copy.deepcopy(document)
    tasks = result.get("tasks")
    datasets = (
        [task.get("dataset") for task in tasks if isinstance(task, dict)]
        if isinstance(tasks, list)
        else []
    )
    base_model = result.get("base_model")
    if isinstance(base_model, dict):
        pretrain = base_model.get("pretrain")
        if isinstance(pretrain, dict):
            datasets.append(pretrain.get("dataset"))
        model = base_model.get("model")
        if base_model.get("source") == "hf" and isinstance(model, str):
            base_model["model"] = _model_location(model)
    for dataset in datasets:
        if not isinstance(dataset, dict):
            continue
        if dataset.get("source") == "files":
            for split in ("train", "test", "val"):
                uri = dataset.get(split)
                if isinstance(uri, str) and not has_credentials(uri):
                    dataset[split] = _file_location(uri)
        elif dataset.get("source") == "huggingface" and isinstance(dataset.get("data_files"), dict):
            dataset["data_files"] = {
                split: _file_locations(files) for split, files in dataset["data_files"].items()
            }
    return result


def _file_location(uri: str) -> str:
    """A local path made absolute; an ``s3://`` URI, or one the spec refuses, unchanged."""
    from storage.files import absolute_uri

    try:
        return absolute_uri(uri)
    except ValueError:
        return uri  # an unreadable scheme: the spec names it


def _file_locations(files: Any) -> Any:
    """One file or a list of files (a Hugging Face split's ``data_files``), located."""
    if isinstance(files, list):
        return [_file_location(f) if isinstance(f, str) else f for f in files]
    return _file_location(files) if isinstance(files, str) else files


def _model_location(value: str) -> str:
    """A local model directory made absolute; a Hub id, ``package:`` or ``s3://`` unchanged."""
    if has_credentials(value) or value.startswith(("package:", "s3://")):
        return value
    value = value.removeprefix("file://")
    path = Path(value).expanduser()
    if path.is_dir() or value.startswith(("/", ".", "~")):
        return str(path.resolve())
    return value  # a Hub id


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    document = apply_overrides(read_document(path), overrides or [])
    return validate_document(document, str(path))


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per problem, each naming the field path."""
    lines = []
    for item in error.errors()[:5]:
        where = _field_path(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field: remove it or check its spelling (see `mergeline schema`)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"field '{where}': {message}" if where else message)
    more = len(error.errors()) - 5
    if more > 0:
        lines.append(f"... and {more} more")
    return "; ".join(lines)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1]}[{part}]"] if parts else [f"[{part}]"]
        elif part in {"sklearn", "files", "huggingface", "builtin", "hf"} and parts:
            continue  # discriminator tags pydantic inserts into the location
        else:
            parts.append(cut(str(part), QUOTE_LIMIT))  # an unknown key is the user's input
    return ".".join(parts)


def check_candidates(spec: Spec, origin: str) -> None:
    """Every candidate names a registered method that takes this many tasks and whose params
    (each value or list) validate."""
    from workers.merge import get_method

    for index, candidate in enumerate(spec.merge.candidates):
        where = f"merge.candidates[{index}]"
        try:
            method = get_method(candidate.method)
            method.check_task_count(len(spec.tasks))
            for params in expand_params(candidate.params):
                if method.retrieval:  # the search sets each task
                    params = {"task": spec.tasks[0].name} | params
                method.params_model.model_validate(params)
        except MergeInputError as error:
            raise SpecError(f"{origin}: field '{where}': {error}") from None
        except ValidationError as error:
            raise SpecError(
                f"{origin}: field '{where}.params': {describe_validation_error(error)}"
            ) from None


def expand_params(params: dict[str, Any]) -> list[dict[str, Any]]:
    """A params mapping whose values may be lists -> every combination, in a stable order."""
    if not params:
        return [{}]
    keys = sorted(params)
    axes = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]

"""``mergeline lineage``: from a registered model version back to every input.

registered version → merged model and its candidate → task vectors (URI, sha256, mode) →
datasets (content digest) and the base model (digest). The chain is read from the version's
tags (written at publish, see :func:`pipelines.run.publish.lineage_tags`); each artifact is then
checked against its manifest in the store and the manifest against the files it lists:
``verified`` (the manifest's sha256 is the one the version recorded, and every file exists
with its size and sha256), ``sizes match`` (the same, with ``quick``: sizes only, no file
read), ``file missing`` or ``corrupt`` (a file the manifest lists is gone or differs; the
entry's ``problem`` names it), ``mismatch`` (the artifact at that URI changed since),
``missing`` (no manifest) or ``unreadable`` (the store could not be read: credentials,
network).
"""

from __future__ import annotations

import json
import re
from typing import Any

from rich.console import Console

from storage.artifacts import find_artifact
from storage.errors import (
    ArtifactError,
    ArtifactMissing,
    LineageError,
    MergelineError,
    ServiceError,
    SystemFailure,
)
from storage.localfiles import check_files
from storage.objectstore import FsspecStore, open_store
from storage.tracking import MlflowTracker, redact_uri

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
STORE_RETRY_SECONDS = 10.0
GOOD = ("verified", "sizes match")
FULL_CHECK = "every file's size and sha256"
QUICK_CHECK = "sizes only (--quick): sha256 not read"


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, alias, version)."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise LineageError(
            f"{uri!r} is not a registered model URI: write models:/<name>@<alias> "
            "(e.g. models:/digits@champion) or models:/<name>/<version>"
        )
    version = match["version"]
    return match["name"], match["alias"], int(version) if version else None


def trace_lineage(model_uri: str, tracking_uri: str, quick: bool = False) -> dict[str, Any]:
    """Everything ``model_uri`` was built from, as plain JSON-able data; ``quick`` checks the
    artifacts' file sizes but not their sha256."""
    record = _find_version(model_uri, tracking_uri)
    tags = record["tags"]
    manifests = _Manifests(
        tags.get("mergeline.store"), tags.get("mergeline.store_endpoint_url"), quick
    )
    base_digest = tags.get("mergeline.base_digest")
    vectors, datasets = [], []
    for task in [t for t in tags.get("mergeline.tasks", "").split(",") if t]:
        prefix = f"mergeline.task.{task}."
        uri, sha = tags.get(prefix + "task_vector_uri"), tags.get(prefix + "task_vector_sha256")
        dataset_digest = tags.get(prefix + "dataset_digest")
        status, meta, problem = manifests.check(uri, sha)
        vectors.append(
            {
                "task": task,
                "uri": uri,
                "sha256": sha,
                "mode": tags.get(prefix + "mode") or meta.get("mode") or tags.get("mergeline.mode"),
                "dataset_digest": dataset_digest,
                "base_digest": meta.get("base_digest", base_digest),
                "status": _agree(status, meta, dataset_digest, base_digest),
                "problem": problem,
            }
        )
        source = _json(tags, prefix + "dataset_source")
        datasets.append({"task": task, "digest": dataset_digest, "source": source})
    model_status, _, model_problem = manifests.check(
        tags["mergeline.model_uri"], tags.get("mergeline.model_sha256")
    )
    base_uri, base_sha = (
        tags.get("mergeline.base_model_uri"),
        tags.get("mergeline.base_model_sha256"),
    )
    base_status, base_meta, base_problem = manifests.check(base_uri, base_sha)
    if base_status in GOOD and base_meta.get("digest") != base_digest:
        base_status = "mismatch"
    return {
        "model_uri": model_uri,
        "check": QUICK_CHECK if quick else FULL_CHECK,
        "registered_version": _version_section(record),
        "merged_model": {
            "uri": tags["mergeline.model_uri"],
            "sha256": tags.get("mergeline.model_sha256"),
            "status": model_status,
            "problem": model_problem,
            "candidate": {
                "id": tags.get("mergeline.candidate"),
                "method": tags.get("mergeline.method"),
                "params": _json(tags, "mergeline.candidate.params"),
                "coefficient": _json(tags, "mergeline.candidate.coefficient"),
            },
        },
        "task_vectors": vectors,
        "datasets": datasets,
        "base_model": {
            "digest": base_digest,
            "uri": base_uri,
            "sha256": base_sha,
            "config": _json(tags, "mergeline.base_model"),
            "status": base_status,
            "problem": base_problem,
        },
        "store": {"uri": tags.get("mergeline.store"), "error": manifests.error},
    }


def _find_version(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    name, alias, number = parse_model_uri(model_uri)
    tracker = MlflowTracker(tracking_uri, "mergeline")
    tracker.check()
    if alias is not None:
        record = tracker.get_alias_version(name, alias)
    else:
        record = tracker.get_version(name, int(number or 0))
    if record is None:
        raise LineageError(
            f"{model_uri} does not exist in {redact_uri(tracking_uri)}: check the name, the "
            "alias or version, and --tracking-uri"
        )
    if "mergeline.model_uri" not in record["tags"]:
        raise LineageError(f"{model_uri} carries no mergeline lineage: publish it with mergeline")
    return record


def _version_section(record: dict[str, Any]) -> dict[str, Any]:
    tags = record["tags"]
    return {
        "name": record["registered_model"],
        "version": record["version"],
        "aliases": sorted(record["aliases"]),
        "uri": record["model_uri"],
        "source": record["source"],
        "mlflow_run_id": record["run_id"],
        "pipeline_run_id": tags.get("mergeline.run_id"),
        "code_version": tags.get("mergeline.code_version"),
        "spec_digest": tags.get("mergeline.spec_digest"),
        "objective": tags.get("mergeline.objective"),
        "test_objective": _float(tags.get("mergeline.test_objective")),
        "promotion": {
            "promoted": tags.get("mergeline.promotion.promoted") == "true",
            "reason": tags.get("mergeline.promotion.reason"),
            "score": _float(tags.get("mergeline.promotion.score")),
            "champion_score": _float(tags.get("mergeline.promotion.champion_score")),
        },
    }


class _Manifests:
    """The manifests in the version's store; ``error`` says why they could not be read."""

    def __init__(self, root: str | None, endpoint_url: str | None, quick: bool) -> None:
        self.quick = quick
        self.store: FsspecStore | None = None
        self.error: str | None = None
        if not root:
            self.error = "the version does not name its store"
            return
        try:
            self.store = open_store(root, endpoint_url or None, STORE_RETRY_SECONDS)
        except MergelineError as error:
            self.error = str(error)

    def check(self, uri: str | None, sha256: str | None) -> tuple[str, dict[str, Any], str | None]:
        """(status, manifest meta, problem) of the artifact at ``uri``: its manifest against
        the recorded ``sha256``, then its files against the manifest."""
        if not uri:
            return "not recorded", {}, None
        if self.store is None:
            return "unreadable", {}, None
        if not uri.startswith(self.store.uri + "/"):
            return "outside the store", {}, None
        prefix = uri.removeprefix(self.store.uri + "/")
        try:
            found = find_artifact(self.store, prefix)
            if found is None:
                return "missing", {}, f"{uri} has no manifest: the artifact is gone"
            if found.sha256 != sha256:
                return "mismatch", found.meta, f"{uri} changed since this version was published"
            problem = check_files(self.store, prefix, sizes_only=self.quick)
        except (MergelineError, SystemFailure) as error:  # credentials, network
            self.error = self.error or str(error)
            return "unreadable", {}, None
        if problem is None:
            return ("sizes match" if self.quick else "verified"), found.meta, None
        status = "file missing" if isinstance(problem, ArtifactMissing) else "corrupt"
        return status, found.meta, str(problem)


def _agree(status: str, meta: dict[str, Any], dataset: str | None, base: str | None) -> str:
    if status not in GOOD:
        return status
    same = meta.get("dataset_digest") == dataset and meta.get("base_digest") == base
    return status if same else "mismatch"


def _json(tags: dict[str, str], key: str) -> Any:
    try:
        return json.loads(tags[key])
    except (KeyError, ValueError):
        return tags.get(key)


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def raise_unless_verified(lineage: dict[str, Any]) -> None:
    """After the chain is shown: one line on the first artifact that is not as recorded."""
    entries = [lineage["merged_model"], *lineage["task_vectors"], lineage["base_model"]]
    bad = [entry for entry in entries if entry["status"] not in GOOD]
    if not bad:
        return
    if lineage["store"]["error"]:
        raise ServiceError(f"the store could not be read: {lineage['store']['error']}")
    first = bad[0]
    what = first.get("problem") or f"{first['uri']} is {first['status']}"
    raise ArtifactError(
        f"{lineage['model_uri']} is not verified ({len(bad)} of {len(entries)} artifacts): {what}"
    )


_STYLE = {
    "verified": "green",
    "sizes match": "green",
    "mismatch": "red",
    "missing": "red",
    "file missing": "red",
    "corrupt": "red",
}


def _status(status: str) -> str:
    return f"[{_STYLE.get(status, 'yellow')}]{status}[/]"


def print_lineage(lineage: dict[str, Any], console: Console) -> None:
    """The chain as an indented outline, every URI, sha256 and digest in full (never wrapped)."""
    version = lineage["registered_version"]
    model, base = lineage["merged_model"], lineage["base_model"]
    candidate = model["candidate"]
    aliases = ", ".join(version["aliases"]) or "none"
    lines = [
        f"[bold]{lineage['model_uri']}[/] → {version['uri']} (aliases: {aliases})",
        f"  pipeline run {version['pipeline_run_id']} · MLflow run {version['mlflow_run_id']} · "
        f"code {version['code_version']}",
    ]
    if version["promotion"]["reason"]:
        lines.append(f"  promotion: {version['promotion']['reason']}")
    lines += [
        f"  checked: {lineage['check']}",
        f"  merged model {model['uri']} {_status(model['status'])}",
        *_problem(model, "    "),
        f"    sha256 {model['sha256']}",
        f"    candidate {candidate['id']}: {candidate['method']} params {candidate['params']} "
        f"coefficient {candidate['coefficient']} · test {version['objective']} "
        f"{version['test_objective']}",
    ]
    datasets = {item["task"]: item for item in lineage["datasets"]}
    for vector in lineage["task_vectors"]:
        dataset = datasets[vector["task"]]
        lines += [
            f"    task vector [bold]{vector['task']}[/] ({vector['mode']}) {vector['uri']} "
            f"{_status(vector['status'])}",
            *_problem(vector, "      "),
            f"      sha256 {vector['sha256']}",
            f"      dataset digest {dataset['digest']}",
            f"        source {json.dumps(dataset['source'], sort_keys=True)}",
        ]
    lines += [
        f"    base model digest {base['digest']}",
        f"      {base['uri']} {_status(base['status'])}",
        *_problem(base, "      "),
        f"      sha256 {base['sha256']}",
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    if lineage["store"]["error"]:
        console.print(f"[yellow]store not read:[/] {lineage['store']['error']}", soft_wrap=True)


def _problem(entry: dict[str, Any], indent: str) -> list[str]:
    return [f"{indent}[red]problem:[/] {entry['problem']}"] if entry.get("problem") else []

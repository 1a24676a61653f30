"""MLflow lineage: one parent run per pipeline run, a child run per stage, registry versions.

Only the pipeline driver logs. Runs are addressed by explicit ids through ``MlflowClient``;
MLflow's global state is touched only where MLflow offers nothing else (see ``mlflow_model``).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from mlflow.entities import Metric, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import (
    MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.errors import ServiceError, SpecError
from storage.mlflow_model import (
    flatten,
    is_number,
    log_and_register,
    quiet_run_links,
    redact_uri,
    serving_example,
    serving_signature,
    to_csv,
    to_dataset_input,
    to_metrics,
    to_params,
    to_text,
)

__all__ = ["DatasetInfo", "MlflowTracker", "PublishedModel", "redact_uri"]

CHECK_TIMEOUT_S = 3.0

#: Logs and registers a model with MLflow's transformers flavor: (tracking URI, run id,
#: registered name, tags, generation settings) -> the registered version.
TransformersLogger = Callable[[str, str, str, dict[str, str], dict[str, Any] | None], ModelVersion]


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as lineage records it; ``digest`` is the content digest of its data."""

    name: str
    source: str
    digest: str
    num_rows: int


@dataclass(frozen=True)
class PublishedModel:
    """A registered model version; ``model_uri`` is ``models:/<name>/<version>``."""

    mlflow_run_id: str
    registered_model: str
    version: int
    aliases: list[str]
    model_uri: str


class MlflowTracker:
    """Records a pipeline run's lineage in MLflow: a ``sqlite:///`` file or an HTTP server."""

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self._artifact_location: str | None = None
        if uri.startswith("sqlite:///"):
            db_path = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self.uri = f"sqlite:///{db_path}"
            self._artifact_location = (db_path.parent / "mlartifacts").as_uri()
        self._has_password = redact_uri(uri) != uri
        self._lazy_client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._parent_open = False

    @property
    def _client(self) -> MlflowClient:
        # Built on first use: for SQL stores the constructor already opens and migrates the DB.
        if self._lazy_client is None:
            self._lazy_client = MlflowClient(tracking_uri=self.uri)
        return self._lazy_client

    def check(self) -> None:
        """Raise :class:`ServiceError` within seconds if the tracking store cannot be used."""
        shown, fix = redact_uri(self.uri), "start it or fix the tracking URI in the spec"
        if urlsplit(self.uri).scheme not in ("http", "https"):
            try:
                self._client.search_experiments(max_results=1)
            except Exception as error:
                kind = type(error).__name__
                raise ServiceError(f"MLflow store {shown} is unusable ({kind}): {fix}") from None
            return
        verify = not MLFLOW_TRACKING_INSECURE_TLS.get() and (
            MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True
        )
        try:
            response = requests.get(
                f"{self.uri.rstrip('/')}/health", timeout=CHECK_TIMEOUT_S, verify=verify
            )
        except requests.RequestException as error:
            kind = type(error).__name__
            raise ServiceError(f"MLflow server {shown} is unreachable ({kind}): {fix}") from None
        # 401/403 means reachable: MLflow's own calls then say precisely what the credentials lack.
        if response.status_code not in (200, 401, 403):
            code = response.status_code
            raise ServiceError(f"MLflow server {shown} answered {code} on /health: {fix}")

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self.experiment)
            if found is not None and found.lifecycle_stage == "deleted":
                raise SpecError(
                    f"MLflow experiment '{self.experiment}' is deleted: restore it "
                    "(`mlflow experiments restore`) or name another experiment in the spec"
                )
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                self._experiment_id = self._client.create_experiment(
                    self.experiment, artifact_location=self._artifact_location
                )
        return self._experiment_id

    @contextmanager
    def _run(self, name: str, tags: dict[str, str], parent: str | None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED when an exception leaves the block."""
        tags = {key: to_text(value) for key, value in tags.items()}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run_id = self._client.create_run(self._experiment(), run_name=name, tags=tags).info.run_id
        try:
            yield run_id
        except BaseException:
            with suppress(Exception):  # the error that ended the run is the one to report
                self._end(run_id, RunStatus.FAILED)
            raise
        self._end(run_id, RunStatus.FINISHED)

    def _end(self, run_id: str, status: int) -> None:
        with quiet_run_links(self._has_password):
            self._client.set_terminated(run_id, RunStatus.to_string(status))

    def _child(self, name: str, tags: dict[str, str]) -> AbstractContextManager[str]:
        if not self._parent_open:
            raise RuntimeError(f"MlflowTracker: child run '{name}' needs an open pipeline_run()")
        return self._run(name, {**tags, "mergeline.stage": name}, parent=self._parent_run_id)

    def _log(self, run_id: str, params: dict[str, Any], metrics: list[Metric]) -> None:
        self._client.log_batch(run_id, metrics=metrics, params=to_params(params))

    @contextmanager
    def pipeline_run(self, run_id: str, tags: dict[str, str]) -> Iterator[str]:
        """Parent run named ``run_id``; yields the MLflow run id the child runs nest under."""
        self.check()
        with self._run(run_id, {**tags, "mergeline.run_id": run_id}, parent=None) as mlflow_id:
            self._parent_run_id, self._parent_open = mlflow_id, True
            try:
                yield mlflow_id
            finally:
                self._parent_open = False

    def log_finetune(
        self,
        task: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        dataset: DatasetInfo,
        tags: dict[str, str],
        history: list[dict[str, float]] | None = None,
    ) -> str:
        """Child run ``finetune/<task>``: config, metrics, per-step history, dataset input."""
        with self._child(f"finetune/{task}", {**tags, "mergeline.task": task}) as run_id:
            rows = to_metrics(metrics)
            for index, point in enumerate(history or []):
                step = int(point.get("step", index))
                rows += to_metrics({k: v for k, v in point.items() if k != "step"}, step)
            self._log(run_id, params, rows)
            entry = to_dataset_input(dataset.name, dataset.source, dataset.digest, dataset.num_rows)
            self._client.log_inputs(run_id, [entry])
            return run_id

    def log_search(
        self,
        rows: list[dict[str, Any]],
        objective: str,
        best: dict[str, Any],
        plots: dict[str, str] | None = None,
    ) -> str:
        """Child run ``search``: numeric columns per candidate (step = its index), CSV, best.

        ``objective`` names a column of ``rows`` (dotted when nested); ``plots`` maps a name to
        an image file, logged as ``plots/<name><suffix>``.
        """
        flat_rows = [flatten(row) for row in rows]
        missing = [index for index, row in enumerate(flat_rows) if objective not in row]
        if missing:
            raise ValueError(f"search rows {missing} have no objective column '{objective}'")
        with self._child("search", {"mergeline.objective": objective}) as run_id:
            metrics = [metric for step, row in enumerate(rows) for metric in to_metrics(row, step)]
            chosen = {f"best.{k}": v for k, v in flatten(best).items() if not is_number(v)}
            self._log(
                run_id, {"objective": objective, **chosen}, metrics + to_metrics(best, 0, "best.")
            )
            self._client.log_text(run_id, to_csv(flat_rows), "candidates.csv")
            with tempfile.TemporaryDirectory() as staging:
                for name, path in (plots or {}).items():
                    stem = re.sub(r"[^\w.\-]", "_", name)
                    shutil.copyfile(path, Path(staging, stem + Path(path).suffix))
                self._client.log_artifacts(run_id, staging, artifact_path="plots")
            return run_id

    def publish(
        self,
        model_dir: str,
        code_path: str,
        registered_model: str,
        tags: dict[str, str],
        aliases: list[str],
        metrics: dict[str, float],
        pip_requirements: list[str] | None = None,
        serving: tuple[int, dict[str, str]] | None = None,
        log_transformers: TransformersLogger | None = None,
        generation: dict[str, Any] | None = None,
    ) -> PublishedModel:
        """Child run ``publish``: log a pyfunc model from code, register it, tag and alias it.

        Nothing is pickled: the model class is read from ``code_path`` when loaded, and the
        files of ``model_dir`` are its artifact ``model``. ``serving`` = (input width, inference
        params with their defaults) gives the model a signature. With ``log_transformers``
        the model is logged with MLflow's ``transformers`` flavor instead (task
        ``text-generation``), by that function: (tracking URI, run id, registered name, tags,
        generation settings) -> the registered version. Publish runs it on a worker
        (:func:`storage.mlflow_model.log_stored_transformers` in a Ray task), since the flavor
        loads the whole model.
        """
        signature = serving_signature(*serving) if serving else None
        example = serving_example(serving[0]) if serving else None
        tags = {key: to_text(value) for key, value in tags.items()}
        with self._child("publish", tags) as run_id:
            self._log(run_id, {}, to_metrics(metrics))
            with quiet_run_links(self._has_password):
                if log_transformers is not None:
                    version = log_transformers(self.uri, run_id, registered_model, tags, generation)
                else:
                    version = log_and_register(
                        self.uri,
                        run_id,
                        model_dir,
                        code_path,
                        registered_model,
                        tags,
                        pip_requirements,
                        signature,
                        example,
                    )
            for alias in aliases:
                self.set_alias(registered_model, alias, int(version.version))
        return PublishedModel(
            mlflow_run_id=run_id,
            registered_model=registered_model,
            version=int(version.version),
            aliases=list(aliases),
            model_uri=f"models:/{registered_model}/{version.version}",
        )

    def get_alias_version(self, registered_model: str, alias: str) -> dict[str, Any] | None:
        """The version ``alias`` points to, with its tags; None if there is none."""
        try:
            found = self._client.get_model_version_by_alias(registered_model, alias)
        except MlflowException as error:
            # No model: RESOURCE_DOES_NOT_EXIST; no such alias: INVALID_PARAMETER_VALUE "not found".
            if error.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in error.message:
                return None
            raise
        return _version_record(found)

    def get_version(self, registered_model: str, version: int) -> dict[str, Any] | None:
        """Version ``version`` of ``registered_model``, with its tags; None if there is none."""
        try:
            found = self._client.get_model_version(registered_model, str(version))
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return _version_record(found)

    def find_run_version(self, registered_model: str, run_id: str) -> dict[str, Any] | None:
        """The version pipeline run ``run_id`` registered (tag ``mergeline.run_id``), if any."""
        if "'" in run_id:
            return None  # run ids are generated without quotes; this one names no run
        found = self._client.search_model_versions(f"tags.`mergeline.run_id` = '{run_id}'")
        versions = [int(v.version) for v in found if v.name == registered_model]
        if not versions:
            return None
        # Search results leave out aliases: read the version itself.
        return _version_record(self._client.get_model_version(registered_model, str(min(versions))))

    def run_tags(self, run_id: str) -> dict[str, str]:
        """The tags of run ``run_id`` (``mlflow.parentRunId`` links a stage to its pipeline)."""
        return dict(self._client.get_run(run_id).data.tags)

    def set_alias(self, registered_model: str, alias: str, version: int) -> None:
        """Point ``alias`` (e.g. ``champion``) at ``version``, moving it if it exists."""
        self._client.set_registered_model_alias(registered_model, alias, str(version))

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Log ``summary`` as ``summary.json`` on the open (or last) pipeline run."""
        if self._parent_run_id is None:
            raise RuntimeError("MlflowTracker.log_summary needs a pipeline_run() first")
        self._client.log_dict(self._parent_run_id, summary, "summary.json")


def _version_record(found: ModelVersion) -> dict[str, Any]:
    return {
        "registered_model": found.name,
        "version": int(found.version),
        "model_uri": f"models:/{found.name}/{found.version}",
        "run_id": found.run_id,
        "source": found.source,
        "aliases": list(found.aliases),
        "tags": dict(found.tags),
    }

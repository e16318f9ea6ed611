"""A typed MLflow resource: tracking store, experiment, registered model name and UI links.

Why not dagster-mlflow's `mlflow_tracking`: it is a legacy function-style resource that ties one
MLflow run to the whole Dagster run through MLflow's global active-run state. We need one MLflow
run per `trained_model` materialization that evaluation and registration later write into by
run id, so MLflow is wrapped here and runs are still tagged `dagster_run_id` as dagster-mlflow does.
"""


import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import dagster as dg
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from mlops_assets.lib import tracking
from mlops_assets.lib.redaction import redact_uri
from mlops_assets.lib.settings import load_settings

UI_URL_ENV = "MLFLOW_UI_URL"


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and registry. Empty fields fall back to the settings at run time
    (`MLFLOW_TRACKING_URI`, `MLOPS_MLFLOW_ARTIFACT_ROOT`, `MLOPS_MLFLOW_EXPERIMENT`,
    `MLOPS_MODEL_NAME`, `MLFLOW_UI_URL`), then to `constants`."""

    tracking_uri: str | None = None
    artifact_root: str | None = None
    experiment: str | None = None
    model_name: str | None = None
    ui_url: str | None = None

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or load_settings().mlflow_tracking_uri

    def resolved_artifact_root(self) -> str:
        return self.artifact_root or load_settings().mlflow_artifact_root

    def resolved_experiment(self) -> str:
        return self.experiment or load_settings().mlflow_experiment

    def resolved_model_name(self) -> str:
        return self.model_name or load_settings().model_name

    def resolved_ui_url(self) -> str | None:
        return self.ui_url or os.environ.get(UI_URL_ENV) or None

    def shown_tracking_uri(self) -> str:
        """The store as metadata, logs and messages may show it: credentials redacted."""
        return redact_uri(self.resolved_tracking_uri())

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.resolved_tracking_uri())

    def experiment_id(self) -> str:
        # Artifacts of the experiment go under the artifact root, one folder per experiment name.
        location = tracking_location(self.resolved_artifact_root(), self.resolved_experiment())
        return tracking.ensure_experiment(self.client(), self.resolved_experiment(), location)

    @contextmanager
    def start_run(self, *, run_name: str, tags: Mapping[str, str]) -> Iterator[Run]:
        """A new MLflow run in the experiment, active for `mlflow.*` calls inside the block."""
        experiment_id = self.experiment_id()
        with tracking.use_tracking_uri(self.resolved_tracking_uri()):
            with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
                yield run

    def run_link(self, experiment_id: str, run_id: str) -> dg.MetadataValue:
        """A clickable link when `MLFLOW_UI_URL` is known, else the run id and store (redacted) as text."""
        url = tracking.run_url(self.resolved_ui_url(), experiment_id, run_id)
        if url:
            return dg.MetadataValue.url(redact_uri(url))
        return dg.MetadataValue.text(f"run {run_id} in {self.shown_tracking_uri()} (set {UI_URL_ENV} for a link)")

    def model_version_link(self, model_name: str, version: str) -> dg.MetadataValue:
        url = tracking.model_version_url(self.resolved_ui_url(), model_name, version)
        if url:
            return dg.MetadataValue.url(redact_uri(url))
        return dg.MetadataValue.text(f"models:/{model_name}/{version} in {self.shown_tracking_uri()}")


def tracking_location(artifact_root: str, experiment: str) -> str:
    return f"{artifact_root.rstrip('/')}/{experiment}"

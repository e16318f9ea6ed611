"""Typed resources shared by every asset: platform settings and the Parquet/JSON IO manager."""


import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
import fsspec
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run

from mlops_assets import constants as c
from mlops_assets.core import records
from mlops_assets.core.dataset_spec import DatasetSpec, load_spec
from mlops_assets.core.redaction import redact_uri
from mlops_assets.defs.metadata import path_value
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import live as mon
from mlops_assets.serving.config import APP_NAME, PREDICTION_LOG_ENV, PREDICTIONS_SUBDIR
from mlops_assets.settings import Settings, join_url, load_settings
from mlops_assets.training import tracking


class PlatformResource(dg.ConfigurableResource):
    """Where the platform reads and writes, and which data set it serves.

    Fields left empty fall back to the environment (`MLOPS_DATA_URL`, `MLOPS_LANDING_URL`,
    `MLOPS_DATASET_SPEC`, `MLFLOW_TRACKING_URI`, ...) at run time, then to `constants`.
    """

    data_url: str | None = None
    landing_url: str | None = None
    dataset_spec_path: str | None = None

    def settings(self) -> Settings:
        base = load_settings()
        overrides: dict[str, str] = {}
        if self.data_url:
            overrides["MLOPS_DATA_URL"] = self.data_url
        if self.landing_url:
            overrides["MLOPS_LANDING_URL"] = self.landing_url
        if not overrides:
            return _with_spec(base, self.dataset_spec_path)
        import os

        env = {**os.environ, **overrides}
        return _with_spec(load_settings(env), self.dataset_spec_path)

    def spec(self) -> DatasetSpec:
        return load_spec(self.settings().dataset_spec_path)


def _with_spec(settings: Settings, spec_path: str | None) -> Settings:
    if not spec_path:
        return settings
    from dataclasses import replace

    return replace(settings, dataset_spec_path=spec_path)


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each output once at a content-addressed path under the data root (any fsspec URL):
    records (mlops_assets.core.records) and dicts as JSON, DataFrames as Parquet, written to a
    temporary name and renamed. A downstream step loads the file its own run's upstream step wrote
    (a per-run pointer), so concurrent runs never read each other's values; an upstream outside
    the run is read from the path its current materialization recorded (`stored_at`)."""

    base_url: str | None = None

    def _base(self) -> str:
        return self.base_url or load_settings().assets_url

    def _folder(self, context: dg.OutputContext | dg.InputContext) -> str:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return join_url(self._base(), *key)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, pd.DataFrame):
            data, suffix = records.parquet_bytes(obj), ".parquet"
        else:
            payload = ({"record": obj.kind, "value": obj.as_dict()} if isinstance(obj, records.Record)
                       else {"value": obj})
            data, suffix = json.dumps(payload, indent=1, default=str).encode(), ".json"
        digest = hashlib.sha256(data).hexdigest()[:16]
        folder = self._folder(context)
        path = join_url(folder, f"{digest}{suffix}")
        records.write_atomic(path, data)
        # The run's pointer: which file this run produced (run ids are unique, so no race).
        pointer = join_url(folder, RUNS_DIR, f"{context.run_id}.json")
        fs, stripped = fsspec.core.url_to_fs(pointer)
        if fs.exists(stripped):
            fs.rm(stripped)
        records.write_atomic(pointer, json.dumps({"path": path, "sha256": digest}).encode())
        context.add_output_metadata({"stored_at": path_value(path), "content_sha256": digest})

    def _stored_path(self, context: dg.InputContext) -> str:
        upstream = context.upstream_output
        assert upstream is not None
        try:
            run_id: str | None = upstream.run_id
        except dg.DagsterInvariantViolationError:
            run_id = None  # the upstream is not part of this run
        if run_id:
            pointer = join_url(self._folder(upstream), RUNS_DIR, f"{run_id}.json")
            fs, stripped = fsspec.core.url_to_fs(pointer)
            if fs.exists(stripped):
                with fs.open(stripped, "r") as handle:
                    return str(json.load(handle)["path"])
        if context.has_asset_key:
            event = context.instance.get_latest_materialization_event(context.asset_key)
            stored = event.asset_materialization.metadata.get("stored_at") if event and event.asset_materialization else None
            if stored is not None and not str(getattr(stored, "value", stored)).startswith("***"):
                return str(getattr(stored, "value", stored))
        raise dg.Failure(f"no stored value of {context.asset_key.to_user_string() if context.has_asset_key else context.name}"
                         f" for run {run_id or '(none)'}: materialize it first")

    def load_input(self, context: dg.InputContext) -> Any:
        path = self._stored_path(context)
        wanted = getattr(context.dagster_type, "typing_type", Any)
        if path.endswith(".parquet"):
            return records.read_frame(path)
        with fsspec.open(path, "r") as handle:
            payload = json.load(handle)
        value = payload.get("value")
        kind = payload.get("record")
        record_type = records.RECORD_TYPES.get(kind) if kind else None
        if isinstance(wanted, type) and issubclass(wanted, records.Record):
            return wanted.from_dict(value)
        if record_type is not None:
            record = record_type.from_dict(value)
            # Consumers that take a frame get the frame the record points at (Split: with its split column).
            if wanted is pd.DataFrame:
                return record.frame() if isinstance(record, records.Split) else records.read_frame(value["path"])
            if wanted is dict:
                return record.as_dict()
            return record
        return value


RUNS_DIR = "by-run"


def _makedirs_for(path: str) -> None:
    fs, stripped = fsspec.core.url_to_fs(path)
    parent = stripped.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)


# --- MLflow ---
# A typed MLflow resource: tracking store, experiment, registered model name and UI links.
#
# Why not dagster-mlflow's `mlflow_tracking`: it is a legacy function-style resource that ties one
# MLflow run to the whole Dagster run through MLflow's global active-run state. We need one MLflow
# run per `trained_model` materialization that evaluation and registration later write into by
# run id, so MLflow is wrapped here and runs are still tagged `dagster_run_id` as dagster-mlflow does.



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


class RayServeResource(dg.ConfigurableResource):
    """The Ray cluster the model is deployed to. Empty fields fall back, at run time, to
    `MLOPS_RAY_DASHBOARD_URL` / `MLOPS_SERVE_URL` (else the local head's ports), `MLOPS_API_TOKEN`
    and `MLOPS_SERVE_CONFIG` (default `deploy/serve_config.yaml`)."""

    dashboard_url: str | None = None
    serve_url: str | None = None
    api_token: str | None = None
    serve_config_path: str | None = None
    app_name: str = APP_NAME
    http_host: str | None = None  # Serve proxy bind address; env MLOPS_SERVE_HTTP_HOST (0.0.0.0 in containers)
    timeout_s: float = 180.0

    def target(self) -> dep.ServeTarget:
        found = dep.target_from_env(dashboard_url=self.dashboard_url, serve_url=self.serve_url)
        return dep.ServeTarget(found.dashboard_url, found.serve_url, self.app_name, self.api_token or found.token)

    def resolved_http_host(self) -> str | None:
        return self.http_host or os.environ.get("MLOPS_SERVE_HTTP_HOST") or None

    def base_config(self) -> dict[str, Any]:
        return dep.load_serve_config(self.serve_config_path)


LABELS_ENV = "MLOPS_LABELS_URL"
METRICS_ENV = "MLOPS_METRICS_URL"
class MonitoringResource(dg.ConfigurableResource):
    """Where monitoring reads and alerts, and the limits of the post-deployment watch.

    Empty URLs fall back at run time to `MLOPS_PREDICTION_LOG_URL` (else `<data>/predictions`),
    `MLOPS_LABELS_URL` (else `<data>/labels`), `MLOPS_METRICS_URL` (else the local Ray head's
    metrics export) and `MLOPS_ALERT_WEBHOOK_URL` (else no webhook, alerts go to the log).
    """

    prediction_log_url: str | None = None
    labels_url: str | None = None
    metrics_url: str | None = None
    alert_webhook_url: str | None = None
    alert_timeout_s: float = c.ALERT_WEBHOOK_TIMEOUT_S
    watch_window: str = c.WATCH_WINDOW
    watch_max_error_rate: float = c.WATCH_MAX_ERROR_RATE
    watch_max_latency_p95_s: float = c.WATCH_MAX_LATENCY_P95_S
    watch_max_positive_share_delta: float = c.WATCH_MAX_POSITIVE_SHARE_DELTA
    watch_max_probability_ks: float = c.WATCH_MAX_PROBABILITY_KS
    watch_min_requests: int = c.WATCH_MIN_REQUESTS
    watch_max_flip_share: float = c.WATCH_MAX_FLIP_SHARE
    watch_max_mean_abs_delta: float = c.WATCH_MAX_MEAN_ABS_DELTA
    watch_min_compared_rows: int = c.WATCH_MIN_COMPARED_ROWS
    watch_max_compared_rows: int = c.WATCH_MAX_COMPARED_ROWS
    retrain_cooldown_s: float = c.RETRAIN_COOLDOWN_S
    prediction_log_retention_days: float | None = c.PREDICTION_LOG_RETENTION_DAYS
    prediction_log_retention_action: str = c.PREDICTION_LOG_RETENTION_ACTION

    def log_url(self, settings: Settings) -> str:
        return self.prediction_log_url or os.environ.get(PREDICTION_LOG_ENV) or join_url(
            settings.data_url, PREDICTIONS_SUBDIR)

    def resolved_labels_url(self, settings: Settings) -> str:
        return self.labels_url or os.environ.get(LABELS_ENV) or join_url(settings.data_url, c.LABELS_SUBDIR)

    def resolved_metrics_url(self) -> str:
        if self.metrics_url or os.environ.get(METRICS_ENV):
            return str(self.metrics_url or os.environ.get(METRICS_ENV))
        from mlops_assets.tools.ray_cluster import config_from_env

        return config_from_env().metrics_url

    def resolved_webhook_url(self) -> str | None:
        from mlops_assets.monitoring.alerts import WEBHOOK_ENV

        return self.alert_webhook_url or os.environ.get(WEBHOOK_ENV) or None

    def watch_limits(self) -> mon.WatchLimits:
        return mon.WatchLimits(
            window=self.watch_window, max_error_rate=self.watch_max_error_rate,
            max_latency_p95_s=self.watch_max_latency_p95_s,
            max_positive_share_delta=self.watch_max_positive_share_delta,
            max_probability_ks=self.watch_max_probability_ks, min_requests=self.watch_min_requests,
            max_flip_share=self.watch_max_flip_share, max_mean_abs_delta=self.watch_max_mean_abs_delta,
            min_compared_rows=self.watch_min_compared_rows)


defs = dg.Definitions(
    resources={
        "platform": PlatformResource(),
        "io_manager": ParquetIOManager(),
        "mlflow": MlflowResource(),
        "ray_serve": RayServeResource(),
        "monitoring": MonitoringResource(),
    },
)

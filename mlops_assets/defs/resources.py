"""Every resource class of the platform, and the one binding: each built once, at definition load,
from `load_settings()`, with concrete values (secrets as `dg.EnvVar`), so the UI shows them."""


import hashlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import records, storage
from mlops_assets.core.dataset_spec import DatasetSpec, load_spec
from mlops_assets.core.redaction import redact_uri
from mlops_assets.defs.metadata import path_value
from mlops_assets.serving.config import (
    APP_NAME,
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_EXPORT_PORT,
    PREDICTIONS_SUBDIR,
    ROUTE_PREFIX,
    TOKEN_ENV,
)
from mlops_assets.settings import (
    UI_URL_ENV,
    WEBHOOK_ENV,
    DataFolders,
    Settings,
    dataset_settings,
    join_url,
    load_settings,
    read_api_token,
)
from mlops_assets.training import tracking

if TYPE_CHECKING:  # MLflow, the deployment client and the live-monitoring maths load where they are used,
    # so loading the definitions (every CLI call, every step process) stays cheap
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from mlops_assets.deployment import rollout as dep
    from mlops_assets.monitoring import live as mon


class PerDataset:
    """A resource whose values differ per data set (MLOPS_DATASETS): its own fields are the primary's,
    `datasets` holds each other data set's differing values. A run gets its data set's values (the
    run's tag or selected keys, `defs/datasets.py`); a sensor or the CLI asks `for_dataset`."""

    datasets: dict[str, dict[str, str]] = {}

    def for_dataset(self, dataset: str | None) -> Any:
        if not dataset:
            return self
        if dataset not in self.datasets:
            raise dg.Failure(f"no data set named {dataset!r} is configured: {sorted(self.datasets)} besides the "
                             "primary (MLOPS_DATASETS)")
        fields = {name: getattr(self, name) for name in type(self).model_fields if name != "datasets"}  # type: ignore[attr-defined]  # a pydantic model
        return type(self)(**{**fields, **self.datasets[dataset]})

    def create_resource(self, context: dg.InitResourceContext) -> Any:
        run = context.dagster_run
        if run is None or not self.datasets:
            return self
        from mlops_assets.defs.datasets import names_for_run

        return self.for_dataset(names_for_run(run).dataset)


class PlatformResource(PerDataset, dg.ConfigurableResource, DataFolders):
    """Where the platform reads and writes, and which data set it serves (built from the settings)."""

    data_url: str
    landing_url: str
    dataset_spec_path: str | None = None  # None: the packaged phishing spec

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> "PlatformResource":
        # No None in the UI: "" is "the packaged phishing spec" (load_spec reads it so).
        return cls(**{"data_url": settings.data_url, "landing_url": settings.landing_url,
                      "dataset_spec_path": settings.dataset_spec_path or "", **fields})

    @classmethod
    def at(cls, data_url: str, **fields: Any) -> "PlatformResource":
        """The platform on a data root, its landing folder under it unless given (tests, tools)."""
        fields.setdefault("landing_url", join_url(data_url, c.LANDING_SUBDIR))
        return cls(data_url=data_url, **fields)

    def spec(self) -> DatasetSpec:
        return load_spec(self.dataset_spec_path)

    def settings(self) -> Settings:
        """This resource's folders as Settings, for helpers typed on Settings (derived from the
        fields alone, never from the environment)."""
        from mlops_assets.settings import DATA_URL_ENV, DATASET_SPEC_ENV, LANDING_URL_ENV

        return load_settings({DATA_URL_ENV: self.data_url, LANDING_URL_ENV: self.landing_url,
                              DATASET_SPEC_ENV: self.dataset_spec_path or ""})


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores each output once at a content-addressed path under the data root (any fsspec URL):
    records (mlops_assets.core.records) and dicts as JSON, DataFrames as Parquet, written to a
    temporary name and renamed. A downstream step loads the file its own run's upstream step wrote
    (a per-run pointer), so concurrent runs never read each other's values. The assets that take
    inputs (`run_scoped`: the training path, model_deployment and reference_profile) load only
    that: an upstream missing from their run is an error naming what to select, never another
    run's value. Only an asset check run on its own reads the asset it checks from the path the
    asset's current materialization recorded (`stored_at`)."""

    base_url: str  # the settings' assets folder (built once in build_resources)
    run_scoped: list[str] = [*c.TRAINING_PATH_ASSETS, *c.RUN_SCOPED_AFTER_TRAINING]

    def _folder(self, context: dg.OutputContext | dg.InputContext) -> str:
        key = context.asset_key.path if context.has_asset_key else [context.name]
        return join_url(self.base_url, *key)

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
        storage.write_json(pointer, {"path": path, "sha256": digest})  # a retried step replaces it whole
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
            if storage.exists(pointer):
                return str(storage.read_json(pointer)["path"])
        consumer = context.op_def.name.split("__")[-1]  # a key prefix (several data sets) joins with "__"
        name = context.asset_key.to_user_string() if context.has_asset_key else context.name
        if consumer in self.run_scoped:
            restore = (" To serve the registry's champion without a training run: mlops-assets serve restore."
                       if consumer == "model_deployment" else "")
            raise dg.Failure(f"{consumer} loads {name} only from its own run, and this run did not materialize "
                             f"it: select {name} too (the training path runs whole: {', '.join(c.TRAINING_PATH_ASSETS)}; "
                             f"unchanged inputs train nothing).{restore}")
        if context.has_asset_key:
            event = context.instance.get_latest_materialization_event(context.asset_key)
            stored = event.asset_materialization.metadata.get("stored_at") if event and event.asset_materialization else None
            if stored is not None and not str(getattr(stored, "value", stored)).startswith("***"):
                return str(getattr(stored, "value", stored))
        raise dg.Failure(f"no stored value of {name} for run {run_id or '(none)'}: materialize it first")

    def load_input(self, context: dg.InputContext) -> Any:
        path = self._stored_path(context)
        wanted = getattr(context.dagster_type, "typing_type", Any)
        if path.endswith(".parquet"):
            return records.read_frame(path)
        payload = storage.read_json(path)
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


# --- MLflow ---
# A typed MLflow resource: tracking store, experiment, registered model name and UI links.
#
# Why not dagster-mlflow's `mlflow_tracking`: it is a legacy function-style resource that ties one
# MLflow run to the whole Dagster run through MLflow's global active-run state. We need one MLflow
# run per `trained_model` materialization that evaluation and registration later write into by
# run id, so MLflow is wrapped here and runs are still tagged `dagster_run_id` as dagster-mlflow does.



class MlflowResource(PerDataset, dg.ConfigurableResource):
    """MLflow tracking and registry, built from the settings (`MLFLOW_TRACKING_URI`,
    `MLOPS_MLFLOW_ARTIFACT_ROOT`, `MLOPS_MLFLOW_EXPERIMENT`, `MLOPS_MODEL_NAME`, `MLFLOW_UI_URL`)."""

    tracking_uri: str
    artifact_root: str | None = None  # None (tests): an `artifacts` folder beside a local SQLite store
    experiment: str = c.MLFLOW_EXPERIMENT
    model_name: str = c.REGISTERED_MODEL_NAME
    ui_url: str | None = None  # None: no MLflow UI to link to, metadata shows run ids as text
    dagster_ui_url: str | None = None  # the Dagster UI, linked from each MLflow run; None: run ids only
    tracking_uri_file: str | None = None  # an operator's mounted file holding the URI, handed to replicas
    actor: str | None = None  # who acts in the registry's history; None: the OS user
    git_sha: str | None = None  # the code's commit; None: `git rev-parse` of the package

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> "MlflowResource":
        return cls(**{"tracking_uri": settings.mlflow_tracking_uri, "artifact_root": settings.mlflow_artifact_root,
                      "experiment": settings.mlflow_experiment, "model_name": settings.model_name,
                      "ui_url": settings.mlflow_ui_url or "", "tracking_uri_file": settings.mlflow_tracking_uri_file or "",
                      "dagster_ui_url": settings.dagster_ui_url or "",
                      # Resolved here, so the UI shows who acts and which commit runs, never "null".
                      "actor": model_store_actor(settings.actor), "git_sha": tracking.git_sha(explicit=settings.git_sha),
                      **fields})

    def artifact_location(self) -> str:
        """The artifact root, or the `artifacts` folder beside a local SQLite store when none is given."""
        if self.artifact_root:
            return self.artifact_root
        if self.tracking_uri.startswith("sqlite:///"):
            return (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
        raise dg.Failure(f"no artifact root for the store {self.shown_tracking_uri()}: set MLOPS_MLFLOW_ARTIFACT_ROOT")

    def shown_tracking_uri(self) -> str:
        """The store as metadata, logs and messages may show it: credentials redacted."""
        return redact_uri(self.tracking_uri)

    def client(self) -> "MlflowClient":
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self) -> str:
        # Artifacts of the experiment go under the artifact root, one folder per experiment name.
        location = tracking_location(self.artifact_location(), self.experiment)
        return tracking.ensure_experiment(self.client(), self.experiment, location)

    @contextmanager
    def start_run(self, *, run_name: str, tags: Mapping[str, str]) -> Iterator["Run"]:
        """A new MLflow run in the experiment, active for `mlflow.*` calls inside the block.

        A `dagster_run_id` tag also links the run back to that Dagster run (URL tag and a markdown
        link in its description), and the run's "Created by" is the registry actor."""
        experiment_id = self.experiment_id()
        from mlops_assets.registry.model_store import actor

        tags = {tracking.USER_TAG: actor(self.actor),
                **tracking.dagster_link_tags(self.dagster_ui_url, str(tags.get("dagster_run_id") or ""),
                                             tags.get("dagster_asset_key")), **tags}
        import mlflow

        with tracking.use_tracking_uri(self.tracking_uri):
            with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags)) as run:
                yield run

    def end_run(self, status: str | None = None) -> None:
        """End MLflow's active run in this process if one was left open: what dagster-mlflow's
        `end_mlflow_on_run_finished` hook calls when a step fails or the job's last step ends."""
        import mlflow

        with tracking.use_tracking_uri(self.tracking_uri):
            if mlflow.active_run() is not None:
                mlflow.end_run(status=status or "FINISHED")

    def run_link(self, experiment_id: str, run_id: str) -> dg.MetadataValue:
        """A clickable link when the MLflow UI's URL is known, else the run id and store (redacted) as text."""
        url = tracking.run_url(self.ui_url, experiment_id, run_id)
        if url:
            return dg.MetadataValue.url(redact_uri(url))
        return dg.MetadataValue.text(f"run {run_id} in {self.shown_tracking_uri()} (set {UI_URL_ENV} for a link)")

    def model_version_link(self, model_name: str, version: str) -> dg.MetadataValue:
        url = tracking.model_version_url(self.ui_url, model_name, version)
        if url:
            return dg.MetadataValue.url(redact_uri(url))
        return dg.MetadataValue.text(f"models:/{model_name}/{version} in {self.shown_tracking_uri()}")


def _end_mlflow_on_run_finished(context: Any, event_list: Any) -> Any:
    # dagster-mlflow imports MLflow at module level (about a second of every definitions load, and
    # so of every CLI call, sensor tick and skipped `make pipeline`): it is imported when the hook fires.
    from dagster_mlflow import end_mlflow_on_run_finished as hook

    return hook.hook_fn(context, event_list)


# dagster-mlflow's `end_mlflow_on_run_finished`, loaded on first use: a failed step ends the MLflow
# run it left open as FAILED, and the job's last step ends any still open.
end_mlflow_on_run_finished = dg.HookDefinition(
    name="end_mlflow_on_run_finished", hook_fn=_end_mlflow_on_run_finished, required_resource_keys={"mlflow"})


def model_store_actor(explicit: str | None) -> str:
    from mlops_assets.registry.model_store import actor

    return actor(explicit)


# The repository's Serve config (deployment.rollout's default), named here so the UI shows the file
# without loading the deployment client at definition load.
DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"


def tracking_location(artifact_root: str, experiment: str) -> str:
    return f"{artifact_root.rstrip('/')}/{experiment}"


class RayServeResource(PerDataset, dg.ConfigurableResource):
    """The Ray cluster the model is deployed to, built from the settings (`MLOPS_RAY_DASHBOARD_URL`,
    `MLOPS_SERVE_URL`, `MLOPS_API_TOKEN` / `MLOPS_API_TOKEN_FILE`, `MLOPS_SERVE_CONFIG`,
    `MLOPS_SERVE_HTTP_HOST`); the defaults are the local head's ports."""

    dashboard_url: str = f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_DASHBOARD_PORT}"
    serve_url: str = f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"
    api_token: str = ""  # a secret: bound as dg.EnvVar("MLOPS_API_TOKEN"), never as its value
    api_token_file: str | None = None  # or a mounted file holding it, read when a request needs it
    serve_config_path: str | None = None  # None: the repository's deploy/serve_config.yaml
    app_name: str = APP_NAME
    route_prefix: str = ROUTE_PREFIX  # the application's route under serve_url (another data set's: /<name>)
    http_host: str | None = None  # Serve proxy bind address (0.0.0.0 in containers); None: Ray's loopback
    prediction_log_url: str | None = None  # where replicas log predictions; None: <their data root>/predictions
    timeout_s: float = c.DEPLOY_TIMEOUT_S
    release_strategy: str = c.RELEASE_STRATEGY  # direct | shadow | canary (MLOPS_RELEASE_STRATEGY)
    release_canary_share: float = c.RELEASE_CANARY_SHARE  # MLOPS_RELEASE_CANARY_SHARE

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> "RayServeResource":
        token = dg.EnvVar(TOKEN_ENV) if TOKEN_ENV in settings.secrets_in_env else ""
        return cls(**{"dashboard_url": settings.ray_dashboard_url, "serve_url": settings.serve_url,
                      "api_token": token, "api_token_file": settings.api_token_file or "",
                      "serve_config_path": settings.serve_config_path or str(DEFAULT_SERVE_CONFIG),
                      "http_host": settings.serve_http_host or "",
                      "prediction_log_url": settings.prediction_log_url,
                      "release_strategy": settings.release_strategy,
                      "release_canary_share": settings.release_canary_share,
                      "app_name": settings.serve_app_name, "route_prefix": settings.serve_route_prefix, **fields})

    def target(self) -> "dep.ServeTarget":
        from mlops_assets.deployment import rollout as dep

        return dep.ServeTarget(self.dashboard_url, self.serve_url, self.app_name,
                               read_api_token(self.api_token, self.api_token_file), route_prefix=self.route_prefix)

    def base_config(self) -> dict[str, Any]:
        from mlops_assets.deployment import rollout as dep

        return dep.load_serve_config(self.serve_config_path)


class MonitoringResource(PerDataset, dg.ConfigurableResource):
    """Where monitoring reads and alerts, and the limits of the post-deployment watch, built from
    the settings (`MLOPS_PREDICTION_LOG_URL`, `MLOPS_LABELS_URL`, `MLOPS_METRICS_URL`,
    `MLOPS_ALERT_WEBHOOK_URL`)."""

    prediction_log_url: str
    labels_url: str
    metrics_url: str = f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_METRICS_EXPORT_PORT}/metrics"
    # The watch sums the serving counters of every node the Ray dashboard lists (each node's metrics
    # agent exports only its own replicas); metrics_url when this is off or the dashboard lists none.
    metrics_from_ray_nodes: bool = True
    alert_webhook_url: str | None = None  # a secret (bound as dg.EnvVar); None: alerts go to the log only
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

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> "MonitoringResource":
        webhook = dg.EnvVar(WEBHOOK_ENV) if WEBHOOK_ENV in settings.secrets_in_env else ""  # "": the log only
        return cls(**{"prediction_log_url": settings.prediction_log_url, "labels_url": settings.labels_url,
                      "metrics_url": settings.metrics_url, "alert_webhook_url": webhook, **fields})

    @classmethod
    def at(cls, data_url: str, **fields: Any) -> "MonitoringResource":
        """Monitoring of the platform on a data root: its prediction log and labels under it (tests, tools)."""
        fields.setdefault("prediction_log_url", join_url(data_url, PREDICTIONS_SUBDIR))
        fields.setdefault("labels_url", join_url(data_url, c.LABELS_SUBDIR))
        return cls(**fields)

    def watch_limits(self) -> "mon.WatchLimits":
        from mlops_assets.monitoring import live as mon

        return mon.WatchLimits(
            window=self.watch_window, max_error_rate=self.watch_max_error_rate,
            max_latency_p95_s=self.watch_max_latency_p95_s,
            max_positive_share_delta=self.watch_max_positive_share_delta,
            max_probability_ks=self.watch_max_probability_ks, min_requests=self.watch_min_requests,
            max_flip_share=self.watch_max_flip_share, max_mean_abs_delta=self.watch_max_mean_abs_delta,
            min_compared_rows=self.watch_min_compared_rows)


def build_resources(settings: Settings) -> dict[str, Any]:
    """Every resource of the platform, with the settings' concrete values (secrets as dg.EnvVar);
    with several data sets, each resource also holds the others' differing values."""
    resources: dict[str, Any] = {"io_manager": ParquetIOManager(base_url=settings.assets_url)}  # keys carry the data set
    if settings.other_datasets:  # the commit once (a git subprocess), not once per data set and resource build
        settings = replace(settings, git_sha=tracking.git_sha(explicit=settings.git_sha))
    for key, kind in (("platform", PlatformResource), ("mlflow", MlflowResource), ("ray_serve", RayServeResource),
                      ("monitoring", MonitoringResource)):
        primary = kind.from_settings(settings)
        others = {}
        for name, _ in settings.other_datasets:
            other = kind.from_settings(dataset_settings(settings, name))
            others[name] = {field: getattr(other, field) for field in kind.model_fields
                            if field != "datasets" and getattr(other, field) != getattr(primary, field)}
        resources[key] = kind.from_settings(settings, datasets=others) if others else primary
    return resources


# Read once, at definition load: the UI shows these values, and every run uses them.
defs = dg.Definitions(resources=build_resources(load_settings()))

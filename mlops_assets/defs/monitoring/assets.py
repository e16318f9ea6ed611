"""Monitoring: reference and production profiles, drift, live performance from delayed labels, and
the labelled production records that retraining learns from.

Thin layer over `monitoring/drift.py` (the one whylogs module) and `monitoring/live.py` (pure rules).
Drift and live performance are always judged for the version that is serving: the one the
endpoint's `/model` names, else the registry's champion.
"""

import math
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.core.schema import typed_frame
from mlops_assets.defs.datasets import names_for_asset
from mlops_assets.defs.metadata import drift_table, path_value, redact_text
from mlops_assets.defs.resources import MlflowResource, MonitoringResource, PlatformResource, RayServeResource
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.monitoring import drift
from mlops_assets.monitoring import estimation as est
from mlops_assets.monitoring import live as mon
from mlops_assets.monitoring.comparison import served_rows
from mlops_assets.registry import model_store
from mlops_assets.serving.prediction_log import hour_folder
from mlops_assets.serving.scoring import scorer_from_loaded
from mlops_assets.settings import Settings, join_url
from mlops_assets.tools.simulator import write_batch

REFERENCE_FILE = "profile.bin"
REFERENCE_META = "reference.json"
REFERENCE_ARTIFACT_DIR = "monitoring"  # on the version's MLflow run
REFERENCE_ARTIFACT = f"{REFERENCE_ARTIFACT_DIR}/reference_profile{drift.PROFILE_SUFFIX}"
NO_DRIFT_CHECK = "no_drift"
FRESH_DATA_CHECK = "prediction_log_is_fresh"
DEGRADATION_CHECK = "live_performance_not_degraded"


def profiles_url(settings: Settings) -> str:
    return join_url(settings.data_url, c.PROFILES_SUBDIR)


def reference_dir(settings: Settings, version: str) -> str:
    return join_url(profiles_url(settings), "reference", str(version))


def _window_width_name(window: str) -> str:
    return f"{int(mon.to_timedelta(window, 'window').total_seconds())}s"


def _path_key(start: pd.Timestamp) -> str:
    return pd.Timestamp(start).strftime("%Y%m%dT%H%M%SZ")


def _write_json(url: str, body: Any) -> None:
    storage.write_json(url, body)


def _read_json(url: str) -> Any | None:
    return storage.read_json(url) if storage.exists(url) else None


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _floats(values: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """Numeric metadata the UI plots over runs; NaN (not computable) is left out."""
    return {k: dg.MetadataValue.float(round(float(v), 6)) for k, v in values.items()
            if v is not None and not (isinstance(v, float) and math.isnan(v))}


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "none"
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join("n/a" if isinstance(v, float) and math.isnan(v) else
                              (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


METRICS_SUBDIR = "metrics"  # Prometheus textfile-collector files (node_exporter --collector.textfile.directory)
WINDOW_COMMENT = "# window "  # first line of a partitioned asset's file: the window its values are of


def write_prometheus_textfile(settings: Settings, name: str, series: list[tuple[str, dict[str, str], float]],
                              window: str | None = None) -> str:
    """Monitoring results as gauges for Prometheus (deploy/monitoring/ reads them): one file per asset,
    written then renamed so a scrape never sees half of it. NaN values are left out.

    With a `window` (a partition's start), the file keeps the newest window's values: a backfill of
    an older hour leaves them alone.
    """
    url = join_url(settings.data_url, METRICS_SUBDIR, f"{name}.prom")
    if window is not None and storage.exists(url):
        first = storage.read_text(url).partition("\n")[0]
        if first.startswith(WINDOW_COMMENT) and first.removeprefix(WINDOW_COMMENT).strip() > window:
            return url
    lines = [f"{WINDOW_COMMENT}{window}"] if window is not None else []
    for metric, labels, value in series:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        tags = ",".join(f'{k}="{str(v).replace(chr(34), "")}"' for k, v in sorted(labels.items()))
        lines.append(f"{metric}{{{tags}}} {float(value)}")
    storage.write_text(url, "\n".join(lines) + "\n")
    return url


# ---------------------------------------------------------------------------------------------
# Which version is serving


@dataclass(frozen=True)
class ServingModel:
    model_name: str
    version: str | None
    source: str  # "endpoint", "registry champion" or "none"
    run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def offline_metrics(self) -> dict[str, float]:
        """The version's hold-out metrics, from the registry tags `metric.test_<name>`."""
        out = {}
        for key, value in self.tags.items():
            if key.startswith("metric.test_"):
                try:
                    out[key.removeprefix("metric.test_")] = float(value)
                except ValueError:
                    continue
        return out


def serving_model(mlflow: MlflowResource, ray_serve: RayServeResource) -> ServingModel:
    """The version the endpoint serves (its `/model`), else the registry champion, else none."""
    name = mlflow.model_name
    client = mlflow.client()
    try:
        live = dep.live_version(ray_serve.target())
    except Exception:  # an unreachable or misconfigured endpoint is "not known", not an error
        live = None
    version, source = (live, "endpoint") if live else (
        model_store.alias_version(client, name, c.ALIAS_CHAMPION), "registry champion")
    if version is None:
        return ServingModel(name, None, "none")
    try:
        mv = client.get_model_version(name, str(version))
    except Exception:  # the endpoint serves a version this registry does not know
        return ServingModel(name, str(version), source)
    return ServingModel(name, str(version), source, mv.run_id, dict(mv.tags or {}))


# ---------------------------------------------------------------------------------------------
# reference_profile


def reference_frame(model: Any, spec: DatasetSpec, features: pd.DataFrame) -> pd.DataFrame:
    """Features plus the version's answers on them, scored exactly as the serving path scores."""
    scored = model.score(features[spec.feature_names])
    frame = features[spec.feature_names].reset_index(drop=True).copy()
    frame[mon.PREDICTED_LABEL] = scored.labels
    frame[mon.PROBABILITY] = scored.probabilities
    return frame


def load_reference(settings: Settings, mlflow: MlflowResource, model: ServingModel) -> tuple[bytes, str] | None:
    """The serving version's reference profile: the data root's copy when it belongs to this
    version's run, else the MLflow artifact on that run; None when neither exists."""
    if model.version is None:
        return None
    folder = reference_dir(settings, model.version)
    meta = _read_json(join_url(folder, REFERENCE_META)) or {}
    if meta.get("model_name") == model.model_name and meta.get("run_id") == model.run_id:
        try:
            return drift.load_profile(join_url(folder, REFERENCE_FILE)), join_url(folder, REFERENCE_FILE)
        except (OSError, ValueError, FileNotFoundError):
            pass
    if model.run_id:
        try:
            with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
                local = mlflow.client().download_artifacts(model.run_id, REFERENCE_ARTIFACT, tmp)
                return drift.load_profile(local), f"runs:/{model.run_id}/{REFERENCE_ARTIFACT}"
        except Exception:
            return None
    return None


@dg.asset(group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS, kinds={"whylogs"})
def reference_profile(
    context: dg.AssetExecutionContext,
    platform: PlatformResource,
    mlflow: MlflowResource,
    registered_model: dict,
    train_test_split: pd.DataFrame,
) -> dg.MaterializeResult:
    """whylogs profile of the version's training features and its predictions on them, stored with the version."""
    spec = platform.spec()
    settings = platform.settings()
    name, version, run_id = registered_model["model_name"], str(registered_model["version"]), registered_model["run_id"]
    loaded = model_store.load_verified_model(mlflow.tracking_uri, name, version=version)
    train = train_test_split[train_test_split["split"] == "train"] if "split" in train_test_split else train_test_split
    frame = reference_frame(scorer_from_loaded(loaded, spec), spec, train)
    columns = mon.monitored_columns(spec.feature_names)
    blob = drift.profile_frame(frame[columns])
    folder = reference_dir(settings, version)
    drift.save_profile(blob, join_url(folder, REFERENCE_FILE))
    summary = drift.profile_summary(blob)
    _write_json(join_url(folder, REFERENCE_META), {
        "model_name": name, "version": version, "run_id": run_id, "rows": len(frame), "columns": columns,
        "backend": drift.BACKEND, "created_at": datetime.now(UTC).isoformat(),
        "data_version": registered_model.get("data_version"), "feature_version": registered_model.get("feature_version"),
    })
    with tempfile.TemporaryDirectory(prefix="reference-") as tmp:
        local = Path(tmp) / f"reference_profile{drift.PROFILE_SUFFIX}"
        local.write_bytes(blob)
        mlflow.client().log_artifact(run_id, str(local), REFERENCE_ARTIFACT_DIR)
    positive_share = float((frame[mon.PREDICTED_LABEL] == spec.positive_class).mean()) if len(frame) else math.nan
    context.log.info(f"reference profile of {name} v{version}: {len(frame)} training rows")
    return dg.MaterializeResult(
        value={"model_name": name, "version": version, "run_id": run_id, "url": join_url(folder, REFERENCE_FILE),
               "artifact": f"runs:/{run_id}/{REFERENCE_ARTIFACT}", "rows": len(frame)},
        metadata={
            "model_version": version,
            "rows": len(frame),
            "columns": len(columns),
            "reference_profile": path_value(join_url(folder, REFERENCE_FILE)),
            "mlflow_artifact": f"runs:/{run_id}/{REFERENCE_ARTIFACT}",
            **_floats({"predicted_positive_share": positive_share,
                       "probability_mean": summary["columns"][mon.PROBABILITY].get("mean", math.nan)}),
            "dagster/row_count": len(frame),
        },
    )


# ---------------------------------------------------------------------------------------------
# production_profiles


# One partition per complete hour of the prediction log: a run reads that hour's folder only, the
# hour being written does not exist yet as a partition (end_offset=0), and a past day is a backfill.
monitoring_partitions = dg.HourlyPartitionsDefinition(start_date=c.MONITORING_PARTITIONS_START, end_offset=0,
                                                      timezone="UTC")
WINDOW_WIDTH = _window_width_name(c.MONITORING_WINDOW)  # the profiles' folder name ("3600s")
DAILY_SUBDIR = "daily"


def partition_window(context: dg.AssetExecutionContext) -> tuple[pd.Timestamp, pd.Timestamp]:
    window = context.partition_time_window
    return pd.Timestamp(window.start).tz_convert("UTC"), pd.Timestamp(window.end).tz_convert("UTC")


def partition_hours(context: dg.AssetExecutionContext) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The hours of this run, oldest first: one for a partition, each of a backfill's range (a
    range runs as one run, BackfillPolicy.single_run, so the CLI's --partition-range works too)."""
    start, end = partition_window(context)
    return [(h, h + pd.Timedelta(hours=1)) for h in pd.date_range(start, end - pd.Timedelta(hours=1), freq="h")]


def combined_check(name: str, checks: list[dg.AssetCheckResult]) -> dg.AssetCheckResult:
    """A run's check result over its hours: one hour's own result, or for a range, failed when
    any hour failed, with the newest failing hour's metadata (each hour's numbers are on its partition)."""
    if len(checks) == 1:
        return checks[0]
    failed = [c for c in checks if not c.passed]
    windows = [str((c.metadata or {}).get("window", "?")) for c in failed]
    shown = failed[-1] if failed else checks[-1]
    meta = {k: getattr(v, "value", v) for k, v in (shown.metadata or {}).items()}
    return dg.AssetCheckResult(
        check_name=name, passed=not failed, severity=shown.severity,
        description=(f"{len(failed)} of {len(checks)} windows failed ({', '.join(windows)}); newest: "
                     f"{shown.description}") if failed else f"all {len(checks)} windows passed",
        metadata={**meta, "windows": len(checks), "failed_windows": ", ".join(windows) or "none"})


def production_folder(settings: Settings, start: pd.Timestamp) -> str:
    return join_url(profiles_url(settings), "production", WINDOW_WIDTH, _path_key(start))


def window_profiles(folder: str) -> dict[str, str]:
    """model version -> profile URL of one window's folder."""
    names = [p.rsplit("/", 1)[-1] for p in storage.list_files(folder, (drift.PROFILE_SUFFIX,))]
    return {n.removesuffix(drift.PROFILE_SUFFIX): join_url(folder, n) for n in names if n.endswith(drift.PROFILE_SUFFIX)}


def merge_day(settings: Settings, day: pd.Timestamp) -> dict[str, str]:
    """The day's hourly profiles merged per version (whylogs profiles merge exactly): version -> URL."""
    hours: dict[str, list[str]] = {}
    for h in range(24):
        for version, url in window_profiles(production_folder(settings, day + pd.Timedelta(hours=h))).items():
            hours.setdefault(version, []).append(url)
    out = {}
    for version, urls in hours.items():
        url = join_url(profiles_url(settings), "production", DAILY_SUBDIR, f"{day:%Y-%m-%d}", f"{version}{drift.PROFILE_SUFFIX}")
        drift.save_profile(drift.merge_profiles(drift.load_profile(u) for u in urls), url)
        out[version] = url
    return out


class ProductionProfilesConfig(dg.Config):
    """How old the log's newest record may be (the window is the partition: one hour)."""

    max_age: str = c.MAX_PROFILE_AGE


# Two kinds of freshness: the FreshnessPolicy (Dagster's own, shown in the UI; it supersedes the
# freshness checks since 1.12) says the asset must be rebuilt at least every
# PROFILES_MAX_LAG_MINUTES; the check below says the prediction log itself must be recent.
@dg.asset(
    group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS,
    kinds={"whylogs"},
    partitions_def=monitoring_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["prediction_log"],  # the same hour of what serving logged (identical partitions)
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=pd.Timedelta(minutes=c.PROFILES_MAX_LAG_MINUTES).to_pytimedelta(),
        warn_window=pd.Timedelta(minutes=c.PROFILES_MAX_LAG_MINUTES // 2).to_pytimedelta()),
    check_specs=[dg.AssetCheckSpec(FRESH_DATA_CHECK, asset="production_profiles",
                                   description="The newest prediction in the log is younger than max_age.")],
)
def production_profiles(
    context: dg.AssetExecutionContext,
    config: ProductionProfilesConfig,
    platform: PlatformResource,
    monitoring: MonitoringResource,
):  # no return annotation: with checks, Dagster reads it as the outputs
    """Mergeable whylogs profiles of one hour of the prediction log's inputs and outputs (each hour
    of a backfill's range), per model version, merged into the day's profile; then the log's retention."""
    spec = platform.spec()
    settings = platform.settings()
    log_url = monitoring.prediction_log_url
    columns = mon.monitored_columns(spec.feature_names)
    hours = partition_hours(context)
    for key, (start, end) in zip(context.partition_keys, hours, strict=True):
        context.add_asset_metadata(_profile_hour(context, settings, log_url, columns, start, end, key),
                                   partition_key=key)
    daily = {day: merge_day(settings, day) for day in sorted({start.floor("D") for start, _ in hours})}
    retention = mon.apply_retention(log_url, monitoring.prediction_log_retention_days, datetime.now(UTC),
                                    monitoring.prediction_log_retention_action)
    fresh = mon.freshness(mon.newest_record(log_url), datetime.now(UTC), config.max_age)
    check = dg.AssetCheckResult(
        check_name=FRESH_DATA_CHECK, passed=fresh.fresh, severity=dg.AssetCheckSeverity.WARN,
        description=fresh.reason,
        metadata={"newest_record": fresh.newest.isoformat() if fresh.newest is not None else "none",
                  "max_age_seconds": fresh.max_age_seconds,
                  **_floats({"age_seconds": fresh.age_seconds})},
    )
    return dg.MaterializeResult(
        metadata={
            "daily_profiles": sum(len(v) for v in daily.values()),
            **retention.metadata(),
            **_floats({"newest_record_age_seconds": fresh.age_seconds}),
        },
        check_results=[check],
    )


def _profile_hour(context: dg.AssetExecutionContext, settings: Settings, log_url: str, columns: list[str],
                  start: pd.Timestamp, end: pd.Timestamp, partition_key: str | None = None) -> dict[str, Any]:
    """Profile one hour's rows per answering version (replacing an earlier run's); its partition's metadata."""
    from mlops_assets.defs.monitoring.sources import prediction_log_observation

    read = mon.read_window(log_url, start, end)
    if partition_key is not None:  # what this hour of the log held, on the prediction_log asset
        context.log_event(prediction_log_observation(partition_key, read.frame, len(read.files), len(read.skipped),
                                                     names_for_asset(context)))
    for path, why in read.skipped:
        context.log.warning(redact_text(f"skipped unreadable prediction log file {path}: {why}"))
    folder = production_folder(settings, start)
    stale = window_profiles(folder)  # an earlier run of this hour: its versions are replaced
    versions: dict[str, int] = {}
    for version, part in served_rows(read.frame).groupby(mon.MODEL_VERSION, sort=True):  # traffic, not shadows
        present = [col for col in columns if col in part]
        drift.save_profile(drift.profile_frame(part[present], start.to_pydatetime()),
                           join_url(folder, f"{version}{drift.PROFILE_SUFFIX}"))
        versions[str(version)] = len(part)
    for version, url in stale.items():
        if version not in versions:
            storage.remove(url)
    key = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    context.log.info(f"window {key}: {len(read.frame)} rows from {len(read.files)} parts, versions {versions or 'none'}")
    return {
        "window": key,
        "windows": 1 if versions else 0,
        "profiles_written": len(versions),
        "log_rows": len(read.frame),
        "log_files": len(read.files),
        "skipped_files": len(read.skipped),
        "latest_window": key,
        "latest_window_rows": len(read.frame),
        "rows_by_version": ", ".join(f"v{v}: {n}" for v, n in versions.items()) or "none",
        "profiles": path_value(folder),
        "dagster/row_count": len(read.frame),
    }


# ---------------------------------------------------------------------------------------------
# drift_report


class DriftConfig(dg.Config):
    """The drift rule (see README, "Drift statistics and thresholds")."""

    p_value: float = c.DRIFT_P_VALUE
    hellinger: float = c.DRIFT_HELLINGER
    ks_statistic: float = c.DRIFT_KS_STATISTIC
    min_rows: int = c.DRIFT_MIN_ROWS
    max_drifted_feature_share: float = c.DRIFT_MAX_FEATURE_SHARE
    fail_on_prediction_drift: bool = c.DRIFT_FAIL_ON_PREDICTION_DRIFT

    def thresholds(self) -> drift.DriftThresholds:
        return drift.DriftThresholds(self.p_value, self.hellinger, self.ks_statistic, self.min_rows)


def _scores_table(scores: dict[str, drift.DriftScore]) -> pd.DataFrame:
    rows = [{"column": s.column, "method": s.method, "statistic": s.statistic, "p_value": s.p_value,
             "rows": s.n_current, "drift": "yes" if s.drift else "", "reason": s.reason}
            for s in sorted(scores.values(), key=lambda s: (not s.drift, -_nan_low(s.statistic)))]
    return pd.DataFrame(rows)


def _nan_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


@dg.asset(
    group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS,
    kinds={"whylogs"},
    partitions_def=monitoring_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[production_profiles],  # the same hour (identical partitions map one to one)
    check_specs=[dg.AssetCheckSpec(NO_DRIFT_CHECK, asset="drift_report",
                                   description="Inputs and predictions of the serving version have not drifted "
                                               "from its reference beyond the configured thresholds.")],
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    ray_serve: RayServeResource,
):  # no return annotation: with checks, Dagster reads it as the outputs
    """Per-feature and prediction drift of one hour (the partition) against the serving version's reference.

    Every row served in the window counts, whichever version answered it: a rollback or a version
    switch inside the window must not hide drift in the traffic (the inputs are the traffic's,
    not a version's), and the minimum number of rows counts them all.
    """
    spec = platform.spec()
    settings = platform.settings()
    model = serving_model(mlflow, ray_serve)
    reference = load_reference(settings, mlflow, model)
    judged = [_drift_of_hour(context, config, settings, spec, model, reference, start, end)
              for start, end in partition_hours(context)]
    for key, (metadata, _) in zip(context.partition_keys, judged, strict=True):
        context.add_asset_metadata(metadata, partition_key=key)
    return dg.MaterializeResult(metadata={"windows": len(judged)},
                                check_results=[combined_check(NO_DRIFT_CHECK, [c for _, c in judged])])


def _drift_of_hour(
    context: dg.AssetExecutionContext, config: DriftConfig, settings: Settings, spec: DatasetSpec,
    model: ServingModel, reference: tuple[bytes, str] | None, start: pd.Timestamp, end: pd.Timestamp,
) -> tuple[dict[str, Any], dg.AssetCheckResult]:
    """One hour's drift: its partition's metadata and its check result."""
    thresholds = config.thresholds()
    profiles = window_profiles(production_folder(settings, start))
    blobs = {version: drift.load_profile(url) for version, url in profiles.items()}
    window = {"key": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "start": start.isoformat(), "end": end.isoformat(),
              "versions": {v: {"rows": drift.profile_rows(b), "url": profiles[v]} for v, b in blobs.items()}}

    judged_why = None
    if model.version is None:
        judged_why = "no serving version (no endpoint answering and no champion)"
    elif reference is None:
        judged_why = f"no reference profile for version {model.version}: materialize reference_profile"
    elif not blobs:
        judged_why = f"no production data in window {window['key']}"
    if judged_why is not None:
        context.log.info(f"drift not judged: {judged_why}")
        return ({"judged": False, "reason": judged_why, "serving_version": model.version or "none",
                 "window": window["key"], "drift_detected": False},
                dg.AssetCheckResult(check_name=NO_DRIFT_CHECK, passed=True, description=f"not judged: {judged_why}",
                                    metadata={"judged": False, "window": window["key"]}))

    assert reference is not None and model.version is not None
    ref_blob, ref_where = reference
    served = window["versions"]  # version -> {"rows", "url"}: the window's rows, per answering version
    current = drift.merge_profiles(blobs.values())
    features = drift.feature_drift(ref_blob, current, spec, thresholds=thresholds)
    outputs = drift.prediction_drift(ref_blob, current, probability_column=mon.PROBABILITY,
                                     label_column=mon.PREDICTED_LABEL, thresholds=thresholds)
    feature_summary = drift.drift_summary(features)
    prediction_drifted = any(s.drift for s in outputs.values())
    too_many = feature_summary["drift_share"] > config.max_drifted_feature_share
    detected = too_many or (prediction_drifted and config.fail_on_prediction_drift)
    event_key = mon.drift_event_key(model.version, _path_key(pd.Timestamp(window["start"]))) if detected else None
    rows = sum(int(part["rows"]) for part in served.values())
    answered_by = ", ".join(f"v{v}: {part['rows']}" for v, part in sorted(served.items()))
    probability, label = outputs[mon.PROBABILITY], outputs[mon.PREDICTED_LABEL]
    reasons = []
    if too_many:
        reasons.append(f"{feature_summary['n_drifted']} of {feature_summary['n_columns']} features drifted "
                       f"(share {feature_summary['drift_share']:.2f} > {config.max_drifted_feature_share}): "
                       f"{', '.join(feature_summary['drifted_columns'])}")
    if prediction_drifted:
        reasons.append("predictions drifted: " + "; ".join(s.reason for s in outputs.values() if s.drift))
    description = "; ".join(reasons) or (f"no drift in window {window['key']} ({rows} rows, "
                                         f"{feature_summary['n_drifted']} features flagged)")
    report = {
        "judged": True, "serving_version": model.version, "serving_source": model.source,
        "window": window["key"], "window_start": window["start"], "rows": rows, "reference": ref_where,
        "rows_by_version": {v: int(part["rows"]) for v, part in served.items()},
        "drift_detected": detected, "event_key": event_key, "reasons": reasons,
        "thresholds": config.model_dump(), "features": {k: s.to_dict() for k, s in features.items()},
        "predictions": {k: s.to_dict() for k, s in outputs.items()},
        "n_drifted_features": feature_summary["n_drifted"], "drifted_features": feature_summary["drifted_columns"],
    }
    report_url = join_url(settings.reports_url, "drift", f"{_path_key(pd.Timestamp(window['start']))}-v{model.version}.json")
    _write_json(report_url, report)
    per_feature = {f"drift/{k}": s.statistic for k, s in features.items()}
    numbers = {
        "drift_share": feature_summary["drift_share"],
        "max_feature_statistic": feature_summary["max_statistic"],
        "prediction_ks": probability.statistic,
        "prediction_ks_p_value": probability.p_value,
        "predicted_label_hellinger": label.statistic,
    }
    check = dg.AssetCheckResult(
        check_name=NO_DRIFT_CHECK, passed=not detected, severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata={"judged": True, "serving_version": model.version, "window": window["key"],
                  "n_drifted_features": feature_summary["n_drifted"],
                  "drifted_features": ", ".join(feature_summary["drifted_columns"]) or "none",
                  "prediction_drift": prediction_drifted, "event_key": event_key or "none",
                  **_floats({"drift_share": feature_summary["drift_share"], "prediction_ks": probability.statistic})},
    )
    version_label = {"model_version": model.version}
    write_prometheus_textfile(settings, "drift_report", window=window["key"], series=[
        ("mlops_drift_detected", version_label, float(detected)),
        ("mlops_drift_feature_share", version_label, feature_summary["drift_share"]),
        ("mlops_drift_prediction_ks", version_label, probability.statistic),
        ("mlops_drift_window_rows", version_label, float(rows)),
        *[("mlops_drift_feature_statistic", {**version_label, "feature": k}, s.statistic) for k, s in features.items()],
    ])
    context.log.info(f"drift of v{model.version} in window {window['key']}: {description}")
    return (
        {
            "judged": True,
            "serving_version": model.version,
            "serving_source": model.source,
            "window": window["key"],
            "rows": rows,
            "rows_by_version": answered_by,
            "drift_detected": detected,
            "event_key": event_key or "none",
            "n_drifted_features": feature_summary["n_drifted"],
            "drifted_features": ", ".join(feature_summary["drifted_columns"]) or "none",
            "prediction_drift": prediction_drifted,
            **_floats(numbers),
            **_floats(per_feature),
            "scores": dg.MetadataValue.md(_md_table(_scores_table({**features, **outputs}))),
            "drift_scores": drift_table([*features.values(), *outputs.values()], ks_statistic=config.ks_statistic,
                                        hellinger=config.hellinger, p_value=config.p_value),
            "reference": ref_where,
            "report": path_value(report_url),
        },
        check,
    )


# ---------------------------------------------------------------------------------------------
# Delayed labels: online_performance and the labelled records retraining learns from


class OnlinePerformanceConfig(dg.Config):
    """When live metrics count as degraded against the serving version's hold-out metrics."""

    tolerance: float = c.DEGRADATION_TOLERANCE
    metrics: list[str] = list(c.DEGRADATION_METRICS)
    min_labelled: int = c.MIN_LABELLED


@dg.asset(
    group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS,
    kinds={"pandas", "scikitlearn"},
    partitions_def=monitoring_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["prediction_log", "delayed_labels"],  # the hour's predictions joined with the labels that arrived
    check_specs=[dg.AssetCheckSpec(DEGRADATION_CHECK, asset="online_performance",
                                   description="Live metrics of the serving version are within tolerance of its "
                                               "hold-out metrics.")],
)
def online_performance(
    context: dg.AssetExecutionContext,
    config: OnlinePerformanceConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    ray_serve: RayServeResource,
    monitoring: MonitoringResource,
):  # no return annotation: with checks, Dagster reads it as the outputs
    """Live metrics of the serving version from delayed labels joined onto its predictions of one
    hour (the partition); a backfill judges an hour again once more of its labels arrived."""
    spec = platform.spec()
    settings = platform.settings()
    model = serving_model(mlflow, ray_serve)
    labels = mon.read_labels(monitoring.labels_url)
    for path, why in labels.skipped:
        context.log.warning(redact_text(f"skipped unreadable label file {path}: {why}"))
    from mlops_assets.defs.monitoring.sources import delayed_labels_observation

    context.log_event(delayed_labels_observation(labels.frame, len(labels.files), len(labels.skipped),
                                                 names=names_for_asset(context)))
    calibrator, calibration = load_calibrator(mlflow, model)
    judged = []
    for key, (start, end) in zip(context.partition_keys, partition_hours(context), strict=True):
        log = served_rows(mon.read_window(monitoring.prediction_log_url, start, end).frame)
        metadata, check = _performance_of_hour(config, settings, spec, model, log, labels.frame, start,
                                               calibrator, calibration)
        context.add_asset_metadata(metadata, partition_key=key)
        judged.append(check)
    return dg.MaterializeResult(metadata={"windows": len(judged)},
                                check_results=[combined_check(DEGRADATION_CHECK, judged)])


def _performance_of_hour(
    config: OnlinePerformanceConfig, settings: Settings, spec: DatasetSpec, model: ServingModel,
    log: pd.DataFrame, labels: pd.DataFrame, start: pd.Timestamp,
    calibrator: est.Calibrator = est.IDENTITY, calibration: str = "none",
) -> tuple[dict[str, Any], dg.AssetCheckResult]:
    """One hour's predictions joined with the labels: its partition's metadata and check result.
    Beside the realized metrics, the label-free estimate of the same metrics from the served scores."""
    window = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    served = log[log[mon.MODEL_VERSION] == model.version] if model.version and not log.empty else log.iloc[:0]
    join = mon.join_labels(served, labels, label_values=list(spec.label_values))
    live = mon.online_metrics(join.joined, spec.positive_class)
    offline = model.offline_metrics()
    rule = mon.DegradationRule(config.tolerance, tuple(config.metrics), config.min_labelled)
    verdict = mon.degradation(live, offline, rule)
    estimate = estimate_window(served, spec.positive_class, calibrator)
    guess = est.estimated_degradation(estimate, offline, tolerance=config.tolerance, metrics=tuple(config.metrics),
                                      min_rows=config.min_labelled)
    # Acted on only while labels are too few to judge: once they are, the realized verdict decides.
    estimated_degraded = guess.degraded and not verdict.judged
    check = dg.AssetCheckResult(
        check_name=DEGRADATION_CHECK, passed=not verdict.degraded, severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(verdict.reasons),
        metadata={"judged": verdict.judged, "serving_version": model.version or "none", "window": window,
                  "n_labelled": int(live["n_labelled"]),
                  **_floats({f"delta_{k}": v for k, v in verdict.deltas.items()})},
    )
    version_label = {"model_version": model.version or "none"}
    write_prometheus_textfile(settings, "online_performance", window=window, series=[
        ("mlops_live_degraded", version_label, float(verdict.degraded)),
        *[(f"mlops_estimated_{k}", version_label, estimate.get(k, math.nan)) for k in est.ESTIMATED_METRICS],
        *[(f"mlops_live_{k}", version_label, v) for k, v in live.items()],
        *[(f"mlops_offline_{k}", version_label, offline.get(k, math.nan)) for k in config.metrics],
    ])
    by_version = []
    if not log.empty:
        everything = mon.join_labels(log, labels, label_values=list(spec.label_values)).joined
        for version, part in everything.groupby(mon.MODEL_VERSION):
            metrics = mon.online_metrics(part, spec.positive_class)
            by_version.append({"version": version, **{k: metrics[k] for k in ("n_labelled", "accuracy", "f1", "roc_auc")}})
    output = {"serving_version": model.version, "live": {k: _finite(v) for k, v in live.items()},
              "offline": offline, "degraded": verdict.degraded, "judged": verdict.judged,
              "reasons": list(verdict.reasons), "join": join.metadata(),
              "event_key": f"degraded-{model.version}" if verdict.degraded else None}
    return (
        {
            "window": window,
            "serving_version": model.version or "none",
            "degraded": verdict.degraded,
            "judged": verdict.judged,
            "event_key": output["event_key"] or "none",
            "estimated_degraded": estimated_degraded,
            "estimated_event_key": f"estimated-degraded-{model.version}" if estimated_degraded else "none",
            "estimate_reasons": "; ".join(guess.reasons),
            "calibration": calibration,
            **_floats({f"estimated_{k}": v for k, v in estimate.items()}),
            **_floats({f"estimate_error_{k}": estimate.get(k, math.nan) - live[k]
                       for k in est.ESTIMATED_METRICS if int(live["n_labelled"]) > 0}),
            **{k: v for k, v in join.metadata().items()},
            **_floats({f"live_{k}": v for k, v in live.items() if k != "n_labelled"}),
            **_floats({f"offline_{k}": offline.get(k) for k in config.metrics}),
            "by_version": dg.MetadataValue.md(_md_table(pd.DataFrame(by_version))),
            "unknown_label_ids": ", ".join(join.unknown_ids) or "none",
        },
        check,
    )


def estimate_window(rows: pd.DataFrame, positive_class: int | str, calibrator: est.Calibrator) -> dict[str, float]:
    """The label-free estimate of one version's rows of a window (their logged scores and labels)."""
    if rows.empty or mon.PROBABILITY not in rows:
        return est.estimate_performance([], [], calibrator)
    return est.estimate_performance(rows[mon.PROBABILITY].to_numpy(dtype=float),
                                    rows[mon.PREDICTED_LABEL].to_numpy() == positive_class, calibrator)


def load_calibrator(mlflow: MlflowResource, model: ServingModel) -> tuple[est.Calibrator, str]:
    """The version's calibrator (the training run's artifact), else the raw scores; and a line saying which."""
    return calibrator_of_run(mlflow, model.run_id)


def calibrator_of_run(mlflow: MlflowResource, run_id: str | None) -> tuple[est.Calibrator, str]:
    if not run_id:
        return est.IDENTITY, "none: raw scores (no training run known)"
    try:
        with tempfile.TemporaryDirectory(prefix="calibrator-") as tmp:
            local = mlflow.client().download_artifacts(run_id, est.CALIBRATOR_ARTIFACT, tmp)
            calibrator = est.Calibrator.from_json(Path(local).read_text())
    except Exception:  # a version trained before calibration existed: its scores as they are
        return est.IDENTITY, f"none: raw scores (run {run_id} has no {est.CALIBRATOR_ARTIFACT})"
    return calibrator, f"{calibrator.method} on {calibrator.rows} held-out rows"


# What was exported, kept per log hour (the hour its prediction was logged in, the log's own
# layout): a run reads the key files of its window's hours only, not every key ever exported.
EXPORTED_KEYS_DIR = "exported_keys"
# The earlier layout: one file of every key, read whole on every run. Converted on first sight.
LEGACY_EXPORTED_KEYS_FILE = "exported_keys.csv"
LEGACY_BEFORE_PREFIX = "before-"  # keys of the legacy file logged before the hour in the name


class LabelledBatchConfig(dg.Config):
    """How far back the log's hours are read for predictions whose labels arrived."""

    lookback_hours: int = c.LABEL_LOOKBACK_HOURS


def label_window(now: datetime, lookback_hours: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[start, end): the last `lookback_hours` whole hours and the current one (its labelled rows are
    final records too; what is exported once is never exported again)."""
    end = pd.Timestamp(now).tz_convert("UTC").floor("h") + pd.Timedelta(hours=1)
    return end - pd.Timedelta(hours=lookback_hours + 1), end


@dataclass(frozen=True)
class PendingLabels:
    """The labelled production records of a window not exported yet, and what was read to find them."""

    fresh: pd.DataFrame  # joined log rows (keys, true label, features) not in `exported`
    exported: pd.DataFrame  # keys already exported from the window's hours
    join: mon.LabelJoin | None
    read: dict[str, Any]  # the window and how many log parts were read, for metadata
    skipped: list[tuple[str, str]]  # unreadable log parts
    missing_features: list[str]

    @property
    def why_none(self) -> str | None:
        """None when there are records to export, else why there are none."""
        if self.missing_features:
            return f"prediction log lacks features {self.missing_features}"
        return "no new labelled production records" if self.fresh.empty else None


KEY_COLUMNS = [mon.REQUEST_ID, mon.RECORD_INDEX]
HOUR_COLUMN = "_hour"


def _empty_keys() -> pd.DataFrame:
    return pd.DataFrame({mon.REQUEST_ID: pd.Series([], dtype=str), mon.RECORD_INDEX: pd.Series([], dtype="int64")})


def _read_keys(url: str) -> pd.DataFrame:
    with storage.open_url(url, "rb") as handle:
        return pd.read_csv(handle, dtype={mon.REQUEST_ID: str})[KEY_COLUMNS]


def hour_keys_url(staging_url: str, hour: pd.Timestamp) -> str:
    """The file of the keys exported from the predictions logged in `hour`."""
    return join_url(staging_url, EXPORTED_KEYS_DIR, f"{hour_folder(hour)}.csv")


def _window_hours(start: pd.Timestamp, end: pd.Timestamp) -> list[pd.Timestamp]:
    return list(pd.date_range(start.floor("h"), end - pd.Timedelta(1, "ns"), freq="h"))


def _legacy_before(staging_url: str) -> list[tuple[pd.Timestamp, str]]:
    """(hour, url) of each converted legacy key file: its keys were logged before that hour."""
    folder = join_url(staging_url, EXPORTED_KEYS_DIR)
    out = []
    for path in storage.list_files(folder, suffixes=(".csv",)):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(LEGACY_BEFORE_PREFIX):
            stamp = name.removeprefix(LEGACY_BEFORE_PREFIX).removesuffix(".csv")
            out.append((pd.to_datetime(stamp, format="%Y%m%dT%H%M%SZ", utc=True), storage.url_of(folder, path)))
    return out


def _convert_legacy_keys(staging_url: str, window: pd.DataFrame, start: pd.Timestamp) -> None:
    """Split the legacy file of every exported key into the hour files: keys of the window's rows
    (whose hours are known now) go to their hours' files, the rest, logged before the window, to one
    `before-<window start>` file that only a window reaching further back reads. Then remove it."""
    legacy_url = join_url(staging_url, LEGACY_EXPORTED_KEYS_FILE)
    if not storage.exists(legacy_url):
        return
    legacy = _read_keys(legacy_url)
    located = window[[*KEY_COLUMNS, HOUR_COLUMN]].merge(legacy, on=KEY_COLUMNS, how="inner")
    for hour, keys in located.groupby(HOUR_COLUMN):
        url = hour_keys_url(staging_url, pd.Timestamp(hour))
        before = _read_keys(url) if storage.exists(url) else _empty_keys()
        storage.write_text(url, pd.concat([before, keys[KEY_COLUMNS]]).drop_duplicates().to_csv(index=False))
    rest = legacy.merge(located[KEY_COLUMNS].assign(_in=True), on=KEY_COLUMNS, how="left")
    rest = rest[rest["_in"].isna()][KEY_COLUMNS]
    if not rest.empty:
        name = f"{LEGACY_BEFORE_PREFIX}{_path_key(start)}.csv"
        storage.write_text(join_url(staging_url, EXPORTED_KEYS_DIR, name), rest.to_csv(index=False))
    storage.remove(legacy_url)


def pending_labelled_records(platform: PlatformResource, monitoring: MonitoringResource, lookback_hours: int,
                             now: datetime, convert_legacy: bool = True) -> PendingLabels:
    """The window's predictions whose labels arrived and that no earlier batch exported: what
    labelled_production_batch would turn into a raw batch now (the retraining sensors ask too).
    Reads the log's and the exported keys' files of the window's hours only. A legacy file of every
    key is converted to hour files (`convert_legacy`, the asset) or, for a reader that writes
    nothing (a sensor), read whole until the asset converts it."""
    spec = platform.spec()
    start, end = label_window(now, lookback_hours)
    window = mon.read_window(monitoring.prediction_log_url, start, end)
    log = served_rows(window.frame)  # a shadow answer is no new record
    labels = mon.read_labels(monitoring.labels_url).frame
    join = mon.join_labels(log, labels, label_values=list(spec.label_values)) if not log.empty else None
    joined = join.joined if join is not None else pd.DataFrame(
        columns=[*KEY_COLUMNS, mon.TIMESTAMP, mon.TRUE_LABEL, *spec.feature_names])
    joined = joined.assign(**{HOUR_COLUMN: pd.to_datetime(joined[mon.TIMESTAMP], utc=True).dt.floor("h")})
    staging = join_url(platform.settings().data_url, c.PRODUCTION_BATCH_STAGING_SUBDIR)
    legacy_url = join_url(staging, LEGACY_EXPORTED_KEYS_FILE)
    if convert_legacy:
        _convert_legacy_keys(staging, joined, start)
    urls = [u for u in (hour_keys_url(staging, h) for h in _window_hours(start, end)) if storage.exists(u)]
    urls += [u for hour, u in _legacy_before(staging) if start < hour]
    if not convert_legacy and storage.exists(legacy_url):
        urls.append(legacy_url)
    exported = pd.concat([_empty_keys(), *(_read_keys(u) for u in urls)], ignore_index=True)
    fresh = joined.merge(exported.assign(_seen=True), on=KEY_COLUMNS, how="left")
    fresh = fresh[fresh["_seen"].isna()].drop(columns="_seen")
    missing = [f for f in spec.feature_names if f not in fresh]
    read = {"window_start": start.isoformat(), "window_end": end.isoformat(), "log_parts_read": len(window.files),
            "exported_key_files_read": len(urls)}
    return PendingLabels(fresh, exported, join, read, list(window.skipped), missing)


def record_exported(staging_url: str, records: pd.DataFrame) -> None:
    """Add the keys of exported `records` (with their log hour) to their hours' key files."""
    for hour, keys in records.groupby(HOUR_COLUMN):
        url = hour_keys_url(staging_url, pd.Timestamp(hour))
        before = _read_keys(url) if storage.exists(url) else _empty_keys()
        storage.write_text(url, pd.concat([before, keys[KEY_COLUMNS]], ignore_index=True).to_csv(index=False))


# It reads the prediction log and the delayed labels too, but declares no dependency on them: it
# feeds raw_dataset, which leads to model_deployment and so to the log (Dagster's graph has no cycles).
@dg.asset(group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS, kinds={"pandas", "parquet"})
def labelled_production_batch(
    context: dg.AssetExecutionContext, config: LabelledBatchConfig, platform: PlatformResource,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """Labelled production records not yet learned from, accepted as a raw batch through ingestion.

    Reads only the hour folders of its window (the last `lookback_hours`), as the hourly monitoring
    assets read theirs: its cost follows the window, not the log's whole history."""
    spec = platform.spec()
    settings = platform.settings()
    pending = pending_labelled_records(platform, monitoring, config.lookback_hours, datetime.now(UTC))
    for path, why in pending.skipped:
        context.log.warning(redact_text(f"skipped unreadable log part {path}: {why}"))
    read, fresh, exported, join = pending.read, pending.fresh, pending.exported, pending.join
    if pending.why_none is not None:
        context.log.info(pending.why_none)
        return dg.MaterializeResult(value={"rows": 0, "batch_id": None, "reason": pending.why_none},
                                    metadata={"rows": 0, "reason": pending.why_none,
                                              "already_exported": len(exported), **read})
    records = typed_frame(fresh[spec.feature_names].assign(**{spec.label: fresh[mon.TRUE_LABEL]}), spec)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    staging = join_url(settings.data_url, c.PRODUCTION_BATCH_STAGING_SUBDIR)
    landing = join_url(staging, "landing")
    write_batch(records[spec.columns], landing, fmt="csv", name=f"production-labelled-{stamp}.csv")
    # The same path as any landed file: contract check, quarantine, content-addressed batch.
    result = ingestion.ingest_landed_files(landing, settings.batches_url, settings.quarantine_url, spec)
    for landed in ingestion.list_landed_files(landing):
        storage.remove(landed.url)  # accepted (copied) or already known: done here
    if result.quarantined:
        raise dg.Failure(f"labelled production batch broke the data contract: {result.quarantined[0].reason}")
    record_exported(staging, fresh)
    batch = result.accepted[0].batch_id if result.accepted else None
    return dg.MaterializeResult(
        value={"rows": len(records), "batch_id": batch},
        metadata={"rows": len(records), "batch_id": batch or "identical batch already accepted",
                  "already_exported": len(exported), "label_join": dg.MetadataValue.json(join.metadata() if join else {}),
                  "positive_share": round(float((records[spec.label] == spec.positive_class).mean()), 4),
                  "dagster/row_count": len(records), **read},
    )


defs = dg.Definitions(
    assets=[reference_profile, production_profiles, drift_report, online_performance, labelled_production_batch],
)

"""Automation of the loop: monitoring and retraining jobs, the drift and degradation sensors, the
run-failure alert, the watch after each deployment, and the periodic schedules.

Sensors decide; runs act. Each sensor reads the latest materialization of the asset it watches
(for the hourly monitoring assets: of their newest partition; its metadata carries the verdict), asks a pure rule in `monitoring/live.py` what to do, and
returns run requests with run keys, so a drift event becomes exactly one retraining run even if
the same report is read on many ticks. A sensor starts a training run only when it would learn
something: the training path is stale (Dagster's stale status) or new labelled records wait.
"""

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import httpx
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.defs.datasets import DatasetNames, names_for_instigator
from mlops_assets.defs.deployment.assets import RayServeResource, replica_env, rollback_job
from mlops_assets.defs.ingestion.assets import TRAINING_JOB, TRAINING_ONWARD
from mlops_assets.defs.resources import (
    MlflowResource,
    MonitoringResource,
    PlatformResource,
    end_mlflow_on_run_finished,
)
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import live as mon
from mlops_assets.monitoring.alerts import send_alert
from mlops_assets.registry import model_store
from mlops_assets.serving.scoring import Scorer, scorer_from_loaded

RETRAINING_JOB = "retraining"
MONITORING_JOB = "monitoring"
# Runs that train a model: while one of them is queued or running, no retraining is requested.
TRAINING_JOBS = (RETRAINING_JOB, TRAINING_JOB)
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
TRIGGER_TAG = "mlops_assets/trigger"
EVENT_TAG = "mlops_assets/event"

monitoring_job = dg.define_asset_job(
    MONITORING_JOB,
    selection=dg.AssetSelection.assets("production_profiles", "drift_report", "online_performance",
                                       "release_comparison"),
    description="Profile one hour of the prediction log, measure drift and live performance of the serving version; "
                "compare a release's candidate with the champion (skipped in an hour without a release).",
)  # hourly partitioned, as its assets are: a run is one hour, a backfill a range of them

# Retraining is the normal path from the accepted raw batches to a deployed champion (gate and
# deployment included), preceded by the labelled production records becoming a raw batch. Landed
# files are ingested by their own partition runs of raw_batches (raw_files_sensor), not here.
retraining_job = dg.define_asset_job(
    RETRAINING_JOB,
    selection=dg.AssetSelection.assets("labelled_production_batch") | TRAINING_ONWARD,
    description="Retrain on the accepted raw data plus labelled production data; gate, register, deploy.",
    tags={"mlops_assets/purpose": "retraining"},
    # dagster-mlflow's hook: a failed step ends an MLflow run it left open as FAILED, and the job's
    # last step ends any still open, so no run of the retraining job stays RUNNING in MLflow.
    hooks={end_mlflow_on_run_finished},
)


def training_run_in_progress(instance: dg.DagsterInstance, names: DatasetNames) -> bool:
    """A run of one of this data set's training jobs is queued or running."""
    runs = instance.get_runs(dg.RunsFilter(job_name=None, statuses=IN_PROGRESS), limit=50)
    jobs = {names.name(job) for job in TRAINING_JOBS}
    return any(run.job_name in jobs for run in runs)


def latest_metadata(instance: dg.DagsterInstance, asset: str | dg.AssetKey) -> tuple[dict[str, Any], float | None]:
    """(metadata as plain values, timestamp) of the asset's latest materialization."""
    event = instance.get_latest_materialization_event(dg.AssetKey.from_coercible(asset))
    if event is None or event.asset_materialization is None:
        return {}, None
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    return meta, event.timestamp


def latest_partition_metadata(instance: dg.DagsterInstance, asset: str | dg.AssetKey) -> tuple[dict[str, Any], float | None]:
    """(metadata, timestamp) of the latest materialization of the asset's newest materialized
    partition: a backfill of an older hour, materialized later, does not hide the newest window.
    Hourly keys sort by time. An asset never materialized by partition: its latest materialization."""
    key = dg.AssetKey.from_coercible(asset)
    partitions = instance.get_materialized_partitions(key)
    if not partitions:
        return latest_metadata(instance, asset)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[max(partitions)]), limit=1).records
    if not records or records[0].asset_materialization is None:
        return {}, None
    meta = {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}
    return meta, records[0].timestamp


def training_has_work(context: dg.SensorEvaluationContext | dg.ScheduleEvaluationContext, platform: PlatformResource,
                      monitoring: MonitoringResource, names: DatasetNames) -> tuple[bool, str]:
    """(would a retraining run learn anything, why). It does when the training path is stale (a new
    accepted batch, changed code or parameters) or when labelled production records arrived that
    its labelled_production_batch step would turn into a new batch; otherwise it would train the
    same model from the same data and code again."""
    from mlops_assets.defs.monitoring.assets import pending_labelled_records
    from mlops_assets.defs.training.staleness import sensor_staleness

    found = sensor_staleness(context, platform.batches_url, names)
    if found.stale:
        return True, found.summary()
    pending = pending_labelled_records(platform, monitoring, c.LABEL_LOOKBACK_HOURS, datetime.now(UTC),
                                       convert_legacy=False)  # a sensor only asks, it writes nothing
    if pending.why_none is None:
        return True, f"{len(pending.fresh)} new labelled production records to learn from"
    return False, f"{found.summary()}, and {pending.why_none} in the last {c.LABEL_LOOKBACK_HOURS} hours"


def _retrain_tick(context: dg.SensorEvaluationContext, platform: PlatformResource, monitoring: MonitoringResource,
                  asset: str, flag: str, trigger: str, also: tuple[str, str] | None = None,
                  ) -> dg.SensorResult | dg.SkipReason:
    """`also`: a second (flag, event key field) that raises an event too (the label-free estimate).

    A drift or degradation event asks for a model trained on newer data: with none (nothing stale,
    no new labelled records) the run would give the same model again, so none is requested and the
    event is not remembered: it asks again on a later tick, once labels or a new batch arrived."""
    names = names_for_instigator(context)
    platform, monitoring = platform.for_dataset(names.dataset), monitoring.for_dataset(names.dataset)
    meta, _ = latest_partition_metadata(context.instance, names.key(asset))
    cursor = mon.RetrainCursor.from_json(context.cursor)
    event = str(meta.get("event_key")) if meta.get(flag) and meta.get("event_key") not in (None, "none") else None
    if event is None and also is not None and meta.get(also[0]) and meta.get(also[1]) not in (None, "none"):
        event = str(meta[also[1]])
    decision = mon.retrain_decision(event, cursor, datetime.now(UTC),
                                    run_in_progress=event is not None and training_run_in_progress(context.instance, names),
                                    cooldown_s=monitoring.retrain_cooldown_s)
    if not decision.request:
        return dg.SensorResult(skip_reason=dg.SkipReason(decision.reason), cursor=decision.cursor.to_json())
    work, why = training_has_work(context, platform, monitoring, names)
    if not work:
        return dg.SensorResult(
            skip_reason=dg.SkipReason(f"{trigger} event {decision.run_key}: no retraining, nothing new to learn "
                                      f"from: {why}; asked again when new data arrives"),
            cursor=cursor.to_json())
    context.log.info(f"{trigger}: requesting retraining for event {decision.run_key} ({why})")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=decision.run_key, tags={TRIGGER_TAG: trigger, EVENT_TAG: str(decision.run_key)})],
        cursor=decision.cursor.to_json(),
    )


@dg.sensor(job=retraining_job, minimum_interval_seconds=c.MONITORING_SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.RUNNING)
def drift_retraining_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource,
                            monitoring: MonitoringResource):
    """One retraining run per drift event (serving version x window), with a cooldown, never during
    one, and only with new data to learn from."""
    return _retrain_tick(context, platform, monitoring, "drift_report", "drift_detected", "drift")


@dg.sensor(job=retraining_job, minimum_interval_seconds=c.MONITORING_SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.RUNNING)
def degradation_retraining_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource,
                                  monitoring: MonitoringResource):
    """One retraining run per serving version whose live metrics degraded (or, before labels come,
    whose label-free estimate did), with a cooldown, and only with new data to learn from."""
    return _retrain_tick(context, platform, monitoring, "online_performance", "degraded", "degradation",
                         also=("estimated_degraded", "estimated_event_key"))


@dg.run_failure_sensor(name="run_failure_alert", default_status=dg.DefaultSensorStatus.RUNNING,
                       minimum_interval_seconds=30)
def run_failure_alert(context: dg.RunFailureSensorContext, monitoring: MonitoringResource) -> None:
    """Alert on every failed run: a log line, and a webhook POST when one is configured."""
    run = context.dagster_run
    error = context.failure_event.message or "no message"
    result = send_alert(
        "run_failed", f"run {run.run_id[:8]} of job {run.job_name} failed: {error[:300]}",
        {"run_id": run.run_id, "job_name": run.job_name, "error": error[:2000],
         "tags": {k: v for k, v in run.tags.items() if not k.startswith(".dagster")}},
        webhook_url=monitoring.alert_webhook_url, timeout_s=monitoring.alert_timeout_s, log=context.log,
    )
    if result.attempted and not result.posted:
        context.log.warning(f"alert for run {run.run_id} not delivered: {result.error}")


# ---------------------------------------------------------------------------------------------
# The watch after each deployment


def scrape_counters(url: str, application: str | None, timeout_s: float = 5.0) -> mon.ServingCounters | None:
    """The serving counters of `application` (the data set's Serve app) at one metrics endpoint."""
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            response = client.get(url)
        response.raise_for_status()
        return mon.parse_serving_metrics(response.text, application=application)
    except Exception:
        return None


def metrics_endpoints(monitoring: MonitoringResource, target: dep.ServeTarget) -> list[str]:
    """Where the serving counters are: the metrics endpoint of every node of the Ray cluster (each
    exports only its own replicas), from the dashboard's node list; `metrics_url` when discovery is
    off or the dashboard lists none."""
    if monitoring.metrics_from_ray_nodes:
        try:
            found = dep.node_metrics_urls(target)
        except Exception:  # dashboard down or an old one: the configured endpoint still counts
            found = []
        if found:
            return found
    return [monitoring.metrics_url]


def scrape_nodes(urls: Sequence[str], application: str | None) -> dict[str, mon.ServingCounters]:
    """Counters of `application` at each endpoint that answered, by URL."""
    scraped = {url: scrape_counters(url, application) for url in urls}
    return {url: counters for url, counters in scraped.items() if counters is not None}


def _baseline_now(urls: Sequence[str], application: str | None) -> dict[str, Any] | None:
    return {url: counters.to_dict() for url, counters in scrape_nodes(urls, application).items()} or None


def _node_baseline(raw: Any) -> dict[str, mon.ServingCounters] | None:
    """The baseline of the cursor, by endpoint; None when there is none or it is in the one-endpoint
    format of an earlier release (then the next scrape becomes the baseline)."""
    if not isinstance(raw, dict) or not raw or "requests" in raw:
        return None
    return {url: mon.ServingCounters.from_dict(counters) for url, counters in raw.items()}


# The replaced version, loaded once per deployment (registry download and sha256 check) and kept
# in the process that evaluates the sensor, which lives across ticks: (registry, model, version).
_REPLACED_MODELS: OrderedDict[tuple[str, str, str], Scorer] = OrderedDict()
_REPLACED_KEPT = 2


def replaced_scorer(tracking_uri: str, model_name: str, version: str, spec: DatasetSpec) -> Scorer:
    key = (tracking_uri, model_name, str(version))
    if key in _REPLACED_MODELS:
        _REPLACED_MODELS.move_to_end(key)
        return _REPLACED_MODELS[key]
    scorer = scorer_from_loaded(model_store.load_verified_model(tracking_uri, model_name, version=str(version)), spec)
    _REPLACED_MODELS[key] = scorer
    while len(_REPLACED_MODELS) > _REPLACED_KEPT:
        _REPLACED_MODELS.popitem(last=False)
    return scorer


def _scores(scorer: Scorer) -> Callable[[pd.DataFrame], tuple[Sequence[int], Sequence[float]]]:
    def score(features: pd.DataFrame) -> tuple[Sequence[int], Sequence[float]]:
        scored = scorer.score(features)
        return scored.labels, scored.probabilities
    return score


def _watch_observation(
    log: pd.DataFrame, live: str, deployed_at: pd.Timestamp,
    counters: Mapping[str, mon.ServingCounters] | None, baseline: Mapping[str, mon.ServingCounters] | None, *,
    feature_names: Sequence[str], positive_class: int | str,
    score_old: Callable[[pd.DataFrame], tuple[Sequence[int], Sequence[float]]] | None,
    max_rows: int = c.WATCH_MAX_COMPARED_ROWS, answered: int | None = None,
) -> tuple[mon.WatchObservation, dict[str, Any]]:
    """Requests from the log; 5xx and latency from the metrics (the log holds answered requests
    only); the prediction comparison from the replaced version scored on the new one's logged
    inputs, so both sides saw exactly the same rows (input drift is the drift path's business)."""
    after = log[(log[mon.MODEL_VERSION] == live) & (log[mon.TIMESTAMP] >= deployed_at)] if not log.empty else log
    if answered is None:  # else counted over every part read since the deployment (`log` may be its tail)
        answered = int(after[mon.REQUEST_ID].nunique()) if not after.empty else 0
    errors, p95 = 0, None
    if counters and baseline is not None:
        _, errors, p95 = mon.counters_since_by_node(counters, baseline)
    same = mon.compare_on_same_rows(after, feature_names, score_old, positive_class, max_rows) \
        if score_old is not None else mon.VersionComparison(0)
    obs = mon.WatchObservation(requests=answered + errors, errors=errors, latency_p95_s=p95,
                               positive_share_delta=same.positive_share_delta, probability_ks=same.probability_ks,
                               compared_rows=same.rows, flip_share=same.flip_share,
                               mean_abs_delta=same.mean_abs_delta)
    seen = {"answered_requests": answered, "server_errors": errors, "latency_p95_s": p95, **same.to_dict(),
            "rows_after": len(after), "metrics": bool(counters), "metrics_endpoints": sorted(counters or {})}
    return obs, seen


# The newest rows of each watched deployment's version, kept across ticks in the process that
# evaluates the sensor: each tick reads only the parts that arrived since the last one.
_WATCH_ROWS: OrderedDict[str, pd.DataFrame] = OrderedDict()
_WATCH_KEPT = 2


def watch_rows(log_url: str, deployment: str, live: str, deployed_at: pd.Timestamp, state: dict[str, Any],
               max_rows: int, now: datetime | None = None) -> tuple[pd.DataFrame, int, int]:
    """(the newest `max_rows` rows of `live` since `deployed_at`, requests answered by it, parts read
    this tick). Lists only the hour folders since the deployment and reads the parts not in
    `state["parts"]` (the cursor); `state` is updated. A process that did not see the earlier
    ticks reads the deployment's parts again."""
    seen = list(state.get("parts") or [])
    cached = _WATCH_ROWS.get(deployment)
    if cached is None:
        seen, state["answered"] = [], 0
    _, root = storage.filesystem(log_url)
    until = pd.Timestamp(now or datetime.now(UTC)) + pd.Timedelta(hours=1)
    hourly, legacy = mon.list_log_parts(log_url, deployed_at, until)
    known = set(seen)
    new = [p for p in [*hourly, *legacy] if p.removeprefix(f"{root}/") not in known]
    read = mon.read_log_parts(log_url, new, start=deployed_at)
    frame = read.frame
    after = frame[frame[mon.MODEL_VERSION] == live] if not frame.empty else frame
    answered = int(state.get("answered") or 0) + (int(after[mon.REQUEST_ID].nunique()) if not after.empty else 0)
    rows = after if cached is None else pd.concat([cached, after], ignore_index=True)
    _WATCH_ROWS[deployment] = rows = rows.tail(max_rows).reset_index(drop=True)
    _WATCH_ROWS.move_to_end(deployment)
    while len(_WATCH_ROWS) > _WATCH_KEPT:
        _WATCH_ROWS.popitem(last=False)
    names = [p.removeprefix(f"{root}/") for p in read.files]
    state.update(parts=[*seen, *names], answered=answered, last_part=names[-1] if names else state.get("last_part"))
    return rows, answered, len(new)


def _deployed_by_rollback(instance: dg.DagsterInstance, names: DatasetNames) -> bool:
    """The latest model_deployment was recorded by the rollback job: the version it restored is
    the known good one, and the version it replaced the one that failed."""
    event = instance.get_latest_materialization_event(names.key("model_deployment"))
    run = instance.get_run_by_id(event.run_id) if event is not None and event.run_id else None
    return run is not None and run.job_name == names.name(rollback_job.name)


# A restore inside a sensor tick must end well within the daemon's evaluation timeout (60 s by
# default); a restore that takes longer goes on in the cluster and the next tick checks it.
OUTAGE_RESTORE_TIMEOUT_S = 45.0


def _serving_outage_tick(
    context: dg.SensorEvaluationContext, platform: PlatformResource, monitoring: MonitoringResource,
    mlflow: MlflowResource, ray_serve: RayServeResource, state: dict[str, Any],
) -> dg.SensorResult | None:
    """None while serving works. On an outage (head lost, app missing, no running replica,
    /healthz down): deploy the registry's champion again, aliases untouched, and alert once per
    outage. `state["outage"]` (in the cursor) holds an outage until serving is back."""
    from mlops_assets.core.redaction import redact_text

    target = ray_serve.target()
    outage = dep.serving_outage(target)
    pending = state.get("outage")
    if outage is None and pending is None:
        return None
    if pending is None:
        pending = {"since": datetime.now(UTC).isoformat(), "reason": outage, "alerted": []}
    tracking_uri = mlflow.tracking_uri
    webhook, alerted = monitoring.alert_webhook_url, list(pending.get("alerted") or [])
    try:
        restored = dep.restore_champion(
            target=target, tracking_uri=tracking_uri, spec=platform.spec(), model_name=mlflow.model_name,
            base_config=ray_serve.base_config(), env_vars=replica_env(platform, mlflow, ray_serve),
            http_host=ray_serve.http_host, timeout_s=min(ray_serve.timeout_s, OUTAGE_RESTORE_TIMEOUT_S))
    except Exception as exc:  # not restored this tick: alert once, try again on the next
        error = redact_text(f"{type(exc).__name__}: {exc}")[:500]
        if "serving_outage" not in alerted:
            send_alert("serving_outage", f"serving is down ({pending['reason']}) and was not restored: {error}",
                       {"outage": pending["reason"], "since": pending["since"], "error": error},
                       webhook_url=webhook, timeout_s=monitoring.alert_timeout_s, log=context.log)
            alerted.append("serving_outage")
        state["outage"] = {**pending, "alerted": alerted, "last_error": error}
        return dg.SensorResult(skip_reason=dg.SkipReason(f"serving outage, restore failed: {error[:200]}"),
                               cursor=json.dumps(state, default=str))
    state.pop("outage", None)
    if "serving_restored" not in alerted:
        done = f"champion version {restored.champion} " + ("deployed again" if restored.action == "deployed" else "serving")
        send_alert("serving_restored", f"serving was down ({pending['reason']}); {done}, no rollback",
                   {"outage": pending["reason"], "since": pending["since"], "champion": restored.champion,
                    "action": restored.action, "endpoint": target.endpoint},
                   webhook_url=webhook, timeout_s=monitoring.alert_timeout_s, log=context.log)
    return dg.SensorResult(skip_reason=dg.SkipReason(f"serving outage: {restored.describe()}; no rollback"),
                           cursor=json.dumps(state, default=str))


@dg.sensor(job=rollback_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def post_deploy_watch(
    context: dg.SensorEvaluationContext, platform: PlatformResource, monitoring: MonitoringResource,
    ray_serve: RayServeResource,
    mlflow: MlflowResource,
) -> dg.SensorResult | dg.SkipReason:
    """After each deployment, watch error rate, latency and the new version's answers against the
    replaced version's on the same inputs; roll back and alert if they break a limit."""
    names = names_for_instigator(context)
    platform, monitoring = platform.for_dataset(names.dataset), monitoring.for_dataset(names.dataset)
    ray_serve, mlflow = ray_serve.for_dataset(names.dataset), mlflow.for_dataset(names.dataset)
    meta, at = latest_metadata(context.instance, names.key("model_deployment"))
    if not meta or at is None:
        return dg.SkipReason("no deployment yet")
    live = str(meta.get("live_version"))
    replaced = meta.get("replaced_version")
    replaced = None if replaced in (None, "none") else str(replaced)
    deployment = f"{live}@{at:.3f}"
    state = json.loads(context.cursor) if context.cursor else {}
    limits = monitoring.watch_limits()
    outage = _serving_outage_tick(context, platform, monitoring, mlflow, ray_serve, state)
    if outage is not None:  # infrastructure, not the model: restored, never rolled back
        return outage
    if state.get("deployment") != deployment:
        # First tick of a new deployment: the counters' baseline, per node (the replica outlives versions).
        state = {"deployment": deployment, "baseline": _baseline_now(metrics_endpoints(monitoring, ray_serve.target()), ray_serve.app_name),
                 "verdict": "watching", "restored": _deployed_by_rollback(context.instance, names)}
    elif state.get("baseline") and _node_baseline(state["baseline"]) is None:
        # A cursor of an earlier release (one endpoint's counters): count from now.
        state["baseline"] = _baseline_now(metrics_endpoints(monitoring, ray_serve.target()), ray_serve.app_name)
    if state.get("verdict") in ("rollback", "passed"):
        return dg.SensorResult(skip_reason=dg.SkipReason(f"deployment {deployment}: {state['verdict']}"),
                               cursor=json.dumps(state))
    deployed_at = pd.Timestamp(at, unit="s", tz="UTC")
    log, answered, _ = watch_rows(monitoring.prediction_log_url, names.name(deployment), live, deployed_at, state,
                                  monitoring.watch_max_compared_rows)
    baseline = _node_baseline(state.get("baseline"))
    counters = scrape_nodes(metrics_endpoints(monitoring, ray_serve.target()), ray_serve.app_name) if baseline else None
    spec = platform.spec()
    score_old, load_error = None, None
    if replaced is not None and not state.get("restored"):
        try:
            score_old = _scores(replaced_scorer(mlflow.tracking_uri, mlflow.model_name,
                                                replaced, spec))
        except Exception as exc:  # not comparable this tick (registry down, bad hash): keep watching
            load_error = f"version {replaced} not loaded for comparison: {type(exc).__name__}"
            context.log.warning(load_error)
    obs, seen = _watch_observation(log, live, deployed_at, counters, baseline, feature_names=spec.feature_names,
                                   positive_class=spec.positive_class, score_old=score_old,
                                   max_rows=monitoring.watch_max_compared_rows, answered=answered)
    decision = mon.watch_decision(obs, deployed_at, datetime.now(UTC), limits)
    estimated = _estimated_accuracy_signal(mlflow, live, log, spec.positive_class, limits.min_compared_rows)
    if estimated["reason"]:  # one more signal: the label-free estimate of the new version fell
        decision = mon.WatchDecision("rollback", (*(decision.reasons if decision.rollback else ()), estimated["reason"]))
    seen = {**seen, **{k: v for k, v in estimated.items() if k != "reason"}}
    state["verdict"] = decision.verdict
    state["seen"] = {**seen, "compared_with": replaced if score_old is not None else None,
                     **({"load_error": load_error} if load_error else {})}
    if not decision.rollback:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"v{live}: {decision.verdict}: {'; '.join(decision.reasons)}"),
                               cursor=json.dumps(state, default=str))
    summary = f"version {live} broke its post-deployment limits: {'; '.join(decision.reasons)}"
    if replaced is None or state.get("restored"):
        # A restored version is the known good one: rolling it back would go further back blindly.
        why = "it was restored by a rollback" if state.get("restored") else "no previous version to roll back to"
        send_alert("watch_failed", f"{summary}; not rolling back: {why}",
                   {"version": live, **seen}, webhook_url=monitoring.alert_webhook_url,
                   timeout_s=monitoring.alert_timeout_s, log=context.log)
        return dg.SensorResult(skip_reason=dg.SkipReason(f"limits broken, not rolling back: {why}"),
                               cursor=json.dumps(state, default=str))
    send_alert("rollback", summary + f"; rolling back to version {replaced}",
               {"version": live, "rollback_to": replaced, "reasons": list(decision.reasons), **seen},
               webhook_url=monitoring.alert_webhook_url, timeout_s=monitoring.alert_timeout_s, log=context.log)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"watch-rollback-{deployment}",
                                    tags={TRIGGER_TAG: "post_deploy_watch", EVENT_TAG: deployment,
                                          "mlops_assets/rollback_from": live})],
        cursor=json.dumps(state, default=str),
    )


_CALIBRATORS: OrderedDict[tuple[str, str, str], tuple[Any, dict[str, float]]] = OrderedDict()


def _estimated_accuracy_signal(mlflow: MlflowResource, version: str, rows: pd.DataFrame, positive_class: int | str,
                               min_rows: int) -> dict[str, Any]:
    """The new version's estimated accuracy on its rows since the deploy against its hold-out accuracy;
    `reason` is set when it fell more than WATCH_MAX_ESTIMATED_ACCURACY_DROP (with `min_rows` behind it)."""
    from mlops_assets.defs.monitoring.assets import ServingModel, calibrator_of_run, estimate_window
    from mlops_assets.monitoring.comparison import served_rows

    out: dict[str, Any] = {"estimated_accuracy": None, "offline_accuracy": None, "reason": None}
    rows = served_rows(rows)
    if rows.empty or len(rows) < min_rows:
        return out
    key = (mlflow.tracking_uri, mlflow.model_name, str(version))
    if key not in _CALIBRATORS:
        try:
            mv = mlflow.client().get_model_version(mlflow.model_name, str(version))
        except Exception:  # registry unreachable this tick: this signal waits
            return out
        offline = ServingModel(mlflow.model_name, str(version), "endpoint", mv.run_id, dict(mv.tags or {}))
        _CALIBRATORS[key] = (calibrator_of_run(mlflow, mv.run_id)[0], offline.offline_metrics())
        while len(_CALIBRATORS) > _REPLACED_KEPT:
            _CALIBRATORS.popitem(last=False)
    calibrator, offline_metrics = _CALIBRATORS[key]
    estimate = estimate_window(rows, positive_class, calibrator)
    now, before = estimate.get("accuracy"), offline_metrics.get("accuracy")
    out.update(estimated_accuracy=now, offline_accuracy=before)
    if now is not None and before is not None and before - now > c.WATCH_MAX_ESTIMATED_ACCURACY_DROP:
        out["reason"] = (f"estimated accuracy {now:.3f} on {len(rows)} rows is {before - now:.3f} below its hold-out "
                         f"{before:.3f} (limit {c.WATCH_MAX_ESTIMATED_ACCURACY_DROP}, no labels needed)")
    return out


# Periodic monitoring keeps drift and live metrics current: on by default, it only reads. Each
# run is the last complete hour's partition, a few minutes after it ends.
monitoring_schedule = dg.build_schedule_from_partitioned_job(
    monitoring_job, name="periodic_monitoring", minute_of_hour=c.MONITORING_SCHEDULE_MINUTE,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
# Periodic retraining is off by default: the drift and degradation sensors retrain when there is
# a reason, and a blind weekly retrain costs compute. Turn it on when labels arrive steadily and
# fresh data alone is worth a new model.
@dg.schedule(name="periodic_retraining", job=retraining_job, cron_schedule=c.RETRAINING_SCHEDULE_CRON,
             default_status=dg.DefaultScheduleStatus.STOPPED, execution_timezone="UTC")
def retraining_schedule(context: dg.ScheduleEvaluationContext, platform: PlatformResource,
                        monitoring: MonitoringResource) -> dg.RunRequest | dg.SkipReason:
    """A retraining run on the schedule, as the sensors decide: only with something new to learn
    from (a stale training path or labelled production records), never beside a training run."""
    names = names_for_instigator(context)
    platform, monitoring = platform.for_dataset(names.dataset), monitoring.for_dataset(names.dataset)
    if training_run_in_progress(context.instance, names):
        return dg.SkipReason("a training run is queued or running; this tick adds none")
    work, why = training_has_work(context, platform, monitoring, names)
    if not work:
        return dg.SkipReason(f"no retraining, nothing new to learn from: {why}")
    context.log.info(f"periodic retraining: {why}")
    return dg.RunRequest(tags={TRIGGER_TAG: "schedule"})

defs = dg.Definitions(
    jobs=[monitoring_job, retraining_job],
    sensors=[drift_retraining_sensor, degradation_retraining_sensor, run_failure_alert, post_deploy_watch],
    schedules=[monitoring_schedule, retraining_schedule],
)

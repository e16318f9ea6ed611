"""Automation of the loop: monitoring and retraining jobs, the drift and degradation sensors, the
run-failure alert, the watch after each deployment, and the periodic schedules.

Sensors decide; runs act. Each sensor reads the latest materialization of the asset it watches
(its metadata carries the verdict), asks a pure rule in `lib/monitoring.py` what to do, and
returns run requests with run keys, so a drift event becomes exactly one retraining run even if
the same report is read on many ticks.
"""

import json
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import httpx
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.defs.deployment import rollback_job
from mlops_assets.defs.monitoring import MonitoringResource
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.lib import monitoring as mon
from mlops_assets.lib.alerts import send_alert

RETRAINING_JOB = "retraining"
MONITORING_JOB = "monitoring"
# Runs that train a model: while one of them is queued or running, no retraining is requested.
TRAINING_JOBS = (RETRAINING_JOB, "ingestion_onward")
IN_PROGRESS = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
TRIGGER_TAG = "mlops_assets/trigger"
EVENT_TAG = "mlops_assets/event"

monitoring_job = dg.define_asset_job(
    MONITORING_JOB,
    selection=dg.AssetSelection.assets("production_profiles", "drift_report", "online_performance"),
    description="Profile the prediction log, measure drift and live performance of the serving version.",
)

# Retraining is the normal path from raw data to a deployed champion (gate and deployment
# included), preceded by the labelled production records becoming a raw batch.
retraining_job = dg.define_asset_job(
    RETRAINING_JOB,
    selection=dg.AssetSelection.assets("labelled_production_batch") | dg.AssetSelection.assets("raw_batches").downstream(),
    description="Retrain on the accepted raw data plus labelled production data; gate, register, deploy.",
    tags={"mlops_assets/purpose": "retraining"},
)


def training_run_in_progress(instance: dg.DagsterInstance) -> bool:
    runs = instance.get_runs(dg.RunsFilter(job_name=None, statuses=IN_PROGRESS), limit=50)
    return any(run.job_name in TRAINING_JOBS for run in runs)


def latest_metadata(instance: dg.DagsterInstance, asset: str) -> tuple[dict[str, Any], float | None]:
    """(metadata as plain values, timestamp) of the asset's latest materialization."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}, None
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    return meta, event.timestamp


def _retrain_tick(context: dg.SensorEvaluationContext, monitoring: MonitoringResource, asset: str,
                  flag: str, trigger: str) -> dg.SensorResult | dg.SkipReason:
    meta, _ = latest_metadata(context.instance, asset)
    cursor = mon.RetrainCursor.from_json(context.cursor)
    event = str(meta.get("event_key")) if meta.get(flag) and meta.get("event_key") not in (None, "none") else None
    decision = mon.retrain_decision(event, cursor, datetime.now(UTC),
                                    run_in_progress=event is not None and training_run_in_progress(context.instance),
                                    cooldown_s=monitoring.retrain_cooldown_s)
    if not decision.request:
        return dg.SensorResult(skip_reason=dg.SkipReason(decision.reason), cursor=decision.cursor.to_json())
    context.log.info(f"{trigger}: requesting retraining for event {decision.run_key}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=decision.run_key, tags={TRIGGER_TAG: trigger, EVENT_TAG: str(decision.run_key)})],
        cursor=decision.cursor.to_json(),
    )


@dg.sensor(job=retraining_job, minimum_interval_seconds=c.MONITORING_SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.RUNNING)
def drift_retraining_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringResource):
    """One retraining run per drift event (serving version x window), with a cooldown, never during one."""
    return _retrain_tick(context, monitoring, "drift_report", "drift_detected", "drift")


@dg.sensor(job=retraining_job, minimum_interval_seconds=c.MONITORING_SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.RUNNING)
def degradation_retraining_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringResource):
    """One retraining run per serving version whose live metrics degraded, with a cooldown."""
    return _retrain_tick(context, monitoring, "online_performance", "degraded", "degradation")


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
        webhook_url=monitoring.resolved_webhook_url(), timeout_s=monitoring.alert_timeout_s, log=context.log,
    )
    if result.attempted and not result.posted:
        context.log.warning(f"alert for run {run.run_id} not delivered: {result.error}")


# ---------------------------------------------------------------------------------------------
# The watch after each deployment


def scrape_counters(url: str, timeout_s: float = 5.0) -> mon.ServingCounters | None:
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            response = client.get(url)
        response.raise_for_status()
        return mon.parse_serving_metrics(response.text)
    except Exception:
        return None


def _watch_observation(
    log: pd.DataFrame, live: str, replaced: str | None, deployed_at: pd.Timestamp, window: pd.Timedelta,
    counters: mon.ServingCounters | None, baseline: mon.ServingCounters | None, positive_class: int,
) -> tuple[mon.WatchObservation, dict[str, Any]]:
    """Requests and the prediction shift from the log (exact, by version and time); 5xx and latency
    from the metrics (the log holds answered requests only)."""
    after = log[(log[mon.MODEL_VERSION] == live) & (log[mon.TIMESTAMP] >= deployed_at)] if not log.empty else log
    before = log[(log[mon.MODEL_VERSION] == replaced) & (log[mon.TIMESTAMP] < deployed_at)
                 & (log[mon.TIMESTAMP] >= deployed_at - window)] if replaced and not log.empty else log.iloc[:0]
    answered = int(after[mon.REQUEST_ID].nunique()) if not after.empty else 0
    errors, p95 = 0, None
    if counters is not None and baseline is not None:
        _, errors, p95 = mon.counters_since(counters, baseline)
    share_delta, ks = mon.prediction_shift(before, after, positive_class) if replaced else (None, None)
    obs = mon.WatchObservation(requests=answered + errors, errors=errors, latency_p95_s=p95,
                               positive_share_delta=share_delta, probability_ks=ks)
    seen = {"answered_requests": answered, "server_errors": errors, "latency_p95_s": p95,
            "positive_share_delta": share_delta, "probability_ks": ks, "rows_before": len(before),
            "rows_after": len(after), "metrics": counters is not None}
    return obs, seen


@dg.sensor(job=rollback_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING)
def post_deploy_watch(
    context: dg.SensorEvaluationContext, platform: PlatformResource, monitoring: MonitoringResource,
) -> dg.SensorResult | dg.SkipReason:
    """After each deployment, watch error rate, latency and predictions; roll back and alert if they move."""
    meta, at = latest_metadata(context.instance, "model_deployment")
    if not meta or at is None:
        return dg.SkipReason("no deployment yet")
    live = str(meta.get("live_version"))
    replaced = meta.get("replaced_version")
    replaced = None if replaced in (None, "none") else str(replaced)
    deployment = f"{live}@{at:.3f}"
    state = json.loads(context.cursor) if context.cursor else {}
    limits = monitoring.watch_limits()
    metrics_url = monitoring.resolved_metrics_url()
    if state.get("deployment") != deployment:
        # First tick of a new deployment: the counters' baseline (the replica outlives versions).
        baseline = scrape_counters(metrics_url)
        state = {"deployment": deployment, "baseline": baseline.to_dict() if baseline else None, "verdict": "watching"}
    if state.get("verdict") in ("rollback", "passed"):
        return dg.SensorResult(skip_reason=dg.SkipReason(f"deployment {deployment}: {state['verdict']}"),
                               cursor=json.dumps(state))
    deployed_at = pd.Timestamp(at, unit="s", tz="UTC")
    log = mon.read_prediction_log(monitoring.log_url(platform.settings()))
    counters = scrape_counters(metrics_url) if state.get("baseline") else None
    baseline = mon.ServingCounters.from_dict(state["baseline"]) if state.get("baseline") else None
    obs, seen = _watch_observation(log, live, replaced, deployed_at, pd.Timedelta(mon.to_timedelta(limits.window)),
                                   counters, baseline, platform.spec().positive_class)
    decision = mon.watch_decision(obs, deployed_at, datetime.now(UTC), limits)
    state["verdict"] = decision.verdict
    state["seen"] = {k: v for k, v in seen.items()}
    if not decision.rollback:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"v{live}: {decision.verdict}: {'; '.join(decision.reasons)}"),
                               cursor=json.dumps(state, default=str))
    summary = f"version {live} broke its post-deployment limits: {'; '.join(decision.reasons)}"
    if replaced is None:
        send_alert("watch_failed", summary + "; no previous version to roll back to",
                   {"version": live, **seen}, webhook_url=monitoring.resolved_webhook_url(),
                   timeout_s=monitoring.alert_timeout_s, log=context.log)
        return dg.SensorResult(skip_reason=dg.SkipReason("limits broken, nothing to roll back to"),
                               cursor=json.dumps(state, default=str))
    send_alert("rollback", summary + f"; rolling back to version {replaced}",
               {"version": live, "rollback_to": replaced, "reasons": list(decision.reasons), **seen},
               webhook_url=monitoring.resolved_webhook_url(), timeout_s=monitoring.alert_timeout_s, log=context.log)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"watch-rollback-{deployment}",
                                    tags={TRIGGER_TAG: "post_deploy_watch", EVENT_TAG: deployment,
                                          "mlops_assets/rollback_from": live})],
        cursor=json.dumps(state, default=str),
    )


# Periodic monitoring keeps drift and live metrics current: on by default, it only reads.
monitoring_schedule = dg.ScheduleDefinition(
    name="periodic_monitoring", job=monitoring_job, cron_schedule=c.MONITORING_SCHEDULE_CRON,
    default_status=dg.DefaultScheduleStatus.RUNNING, execution_timezone="UTC",
)
# Periodic retraining is off by default: the drift and degradation sensors retrain when there is
# a reason, and a blind weekly retrain churns the champion and costs compute. Turn it on when
# labels arrive steadily and fresh data alone is worth a new model.
retraining_schedule = dg.ScheduleDefinition(
    name="periodic_retraining", job=retraining_job, cron_schedule=c.RETRAINING_SCHEDULE_CRON,
    default_status=dg.DefaultScheduleStatus.STOPPED, execution_timezone="UTC",
    tags={TRIGGER_TAG: "schedule"},
)

defs = dg.Definitions(
    jobs=[monitoring_job, retraining_job],
    sensors=[drift_retraining_sensor, degradation_retraining_sensor, run_failure_alert, post_deploy_watch],
    schedules=[monitoring_schedule, retraining_schedule],
)

"""Releases in Dagster: the hourly `release_comparison` of candidate and champion, the sensor that
promotes or ends a live release on that evidence, and the two jobs that carry out a decision.

Thin layer over `monitoring/comparison.py` (the comparison and the decision rule) and
`deployment/rollout.py` (`finish_release`: Serve and the registry). Each decision is one run with
the run key `release-<release id>-<promote|abort>`, so a decision read on many ticks acts once.
"""

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.defs.datasets import names_for_asset, names_for_instigator
from mlops_assets.defs.metadata import redact_text
from mlops_assets.defs.monitoring.assets import (
    _floats,
    _md_table,
    calibrator_of_run,
    monitoring_partitions,
    partition_hours,
    write_prometheus_textfile,
)
from mlops_assets.defs.resources import MlflowResource, MonitoringResource, PlatformResource, RayServeResource
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import comparison as cmp
from mlops_assets.monitoring import estimation as est
from mlops_assets.monitoring import live as mon
from mlops_assets.monitoring.alerts import send_alert
from mlops_assets.serving.release import ReleaseConfig

RELEASE_TAG = "mlops_assets/release_id"
DECISION_TAG = "mlops_assets/release_decision"
PROMOTE_JOB = "release_promote"
ABORT_JOB = "release_abort"


def calibrators_for(mlflow: MlflowResource, versions: list[str]) -> dict[str, est.Calibrator]:
    """Each version's calibrator from its training run (raw scores when it has none)."""
    out = {}
    client = mlflow.client()
    for version in versions:
        try:
            run_id = client.get_model_version(mlflow.model_name, str(version)).run_id
        except Exception:  # unknown to this registry: its scores as they are
            run_id = None
        out[str(version)] = calibrator_of_run(mlflow, run_id)[0]
    return out


def _release_of(target: dep.ServeTarget) -> ReleaseConfig:
    try:
        return dep.current_release(target)
    except Exception:  # no cluster answering: no release known
        return ReleaseConfig()


def versions_in(log: pd.DataFrame, release: ReleaseConfig) -> tuple[str, str, str] | None:
    """(strategy, champion, candidate) of a window: the live release when its candidate is in the
    window, else what the window shows (shadow rows name a shadow's candidate; two served versions a
    canary, the one that answered most being the champion); None without a second version."""
    if log.empty:
        return None
    present = set(log[mon.MODEL_VERSION].astype(str))
    if release.active and str(release.candidate_version) in present and release.champion_version:
        return release.strategy, str(release.champion_version), str(release.candidate_version)
    shadows = cmp.shadow_rows(log)
    served = cmp.served_rows(log)[mon.MODEL_VERSION].astype(str).value_counts()
    if not shadows.empty and len(served):
        return "shadow", str(served.index[0]), str(shadows[mon.MODEL_VERSION].astype(str).mode().iloc[0])
    if len(served) >= 2:
        return "canary", str(served.index[0]), str(served.index[1])
    return None


@dg.asset(
    group_name=c.GROUP_MONITORING, owners=c.ASSET_OWNERS,
    kinds={"pandas", "ray"},
    partitions_def=monitoring_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=["prediction_log"],
    # In the hourly monitoring job: an hour without a release (no second version answered) is
    # skipped, not materialized, and the run log says why.
    output_required=False,
)
def release_comparison(
    context: dg.AssetExecutionContext, platform: PlatformResource, mlflow: MlflowResource,
    ray_serve: RayServeResource, monitoring: MonitoringResource,
) -> Iterator[dg.MaterializeResult]:
    """Candidate against champion on one hour of live traffic: agreement, scores, realized and estimated metrics."""
    spec = platform.spec()
    release = _release_of(ray_serve.target())
    labels = mon.read_labels(monitoring.labels_url).frame
    windows = []
    for key, (start, end) in zip(context.partition_keys, partition_hours(context), strict=True):
        log = mon.read_window(monitoring.prediction_log_url, start, end).frame
        windows.append((key, _compare_hour(context, platform, mlflow, spec, log, labels, release, start)))
    if not any(meta["compared"] for _, meta in windows):
        context.log.info(f"release_comparison skipped: {no_release_reason(release, [k for k, _ in windows])}")
        return
    for key, meta in windows:
        context.add_asset_metadata(meta, partition_key=key)
    yield dg.MaterializeResult(metadata={"windows": len(context.partition_keys)})


def no_release_reason(release: ReleaseConfig, keys: list[str]) -> str:
    """Why nothing was compared in the windows `keys` (for the run log)."""
    where = keys[0] if len(keys) == 1 else f"{keys[0]} to {keys[-1]}"
    if release.active:
        return (f"release {release.release_id} ({release.strategy} of version {release.candidate_version}) is live, "
                f"but its candidate answered nothing in {where}")
    return f"no release in progress and no second version answered in {where}"


def _compare_hour(context: dg.AssetExecutionContext, platform: PlatformResource, mlflow: MlflowResource, spec: Any,
                  log: pd.DataFrame, labels: pd.DataFrame, release: ReleaseConfig, start: pd.Timestamp) -> dict[str, Any]:
    window = start.strftime("%Y-%m-%dT%H:%M:%SZ")
    found = versions_in(log, release)
    if found is None:
        return {"window": window, "compared": False, "reason": "no second version answered in this window"}
    strategy, champion, candidate = found
    result = cmp.compare_release(log, labels, strategy=strategy, champion_version=champion,
                                 candidate_version=candidate, positive_class=spec.positive_class,
                                 label_values=list(spec.label_values),
                                 calibrators=calibrators_for(mlflow, [champion, candidate]))
    numbers = result.numbers()
    labels_ = {"champion": champion, "candidate": candidate, "strategy": strategy}
    write_prometheus_textfile(platform.settings(), "release_comparison", window=window, series=[
        (f"mlops_release_{k}", labels_, v) for k, v in numbers.items() if v is not None])
    rows = [{"side": side, "version": s.version, "requests": s.requests, "labelled": s.labelled,
             "accuracy": s.realized.get("accuracy"), "estimated_accuracy": s.estimated.get("accuracy"),
             "roc_auc": s.realized.get("roc_auc"), "estimated_roc_auc": s.estimated.get("roc_auc"),
             "positive_share": s.positive_share}
            for side, s in (("champion", result.champion), ("candidate", result.candidate))]
    context.log.info(f"window {window}: {strategy} of v{candidate} beside v{champion}, "
                     f"agreement {result.agreement}, {result.candidate.requests} candidate requests")
    return {
        "window": window, "compared": True, "strategy": strategy, "champion_version": champion,
        "candidate_version": candidate, "release_id": release.release_id or "none",
        **_floats(numbers),
        "sides": dg.MetadataValue.md(_md_table(pd.DataFrame(rows))),
    }


# --- decisions -------------------------------------------------------------------------------


@dg.op(description="Promote the live release: champion := candidate everywhere, old champion kept as previous-champion.",
       pool=c.SERVE_DEPLOY_POOL)
def promote_release_op(context: dg.OpExecutionContext, mlflow: MlflowResource, ray_serve: RayServeResource,
                       monitoring: MonitoringResource) -> dict:
    return _finish(context, mlflow, ray_serve, monitoring, promote=True)


@dg.op(description="End the live release: the candidate is removed, every request answered by the champion, alert sent.",
       pool=c.SERVE_DEPLOY_POOL)
def abort_release_op(context: dg.OpExecutionContext, mlflow: MlflowResource, ray_serve: RayServeResource,
                     monitoring: MonitoringResource) -> dict:
    return _finish(context, mlflow, ray_serve, monitoring, promote=False)


def _finish(context: dg.OpExecutionContext, mlflow: MlflowResource, ray_serve: RayServeResource,
            monitoring: MonitoringResource, *, promote: bool) -> dict:
    release_id = context.run.tags.get(RELEASE_TAG)
    reasons = json.loads(context.run.tags.get(DECISION_TAG, "[]"))
    target = ray_serve.target()
    try:
        result = dep.finish_release(target=target, tracking_uri=mlflow.tracking_uri, model_name=mlflow.model_name,
                                    promote=promote, actor=mlflow.actor, expected_release_id=release_id,
                                    reasons=reasons, timeout_s=ray_serve.timeout_s)
    except Exception as exc:
        raise dg.Failure(description=redact_text(str(exc))) from exc
    release = result.release
    action = "promoted" if promote else "aborted"
    summary = (f"release {release.release_id}: {release.strategy} of version {release.candidate_version} {action}; "
               f"version {result.champion_version} answers every request")
    send_alert(f"release_{action}", summary + (f" ({'; '.join(reasons)})" if reasons else ""),
               {"release_id": release.release_id, "candidate": release.candidate_version,
                "champion": result.champion_version, "reasons": reasons},
               webhook_url=monitoring.alert_webhook_url, timeout_s=monitoring.alert_timeout_s, log=context.log)
    metadata: dict[str, Any] = {"release_id": str(release.release_id), "strategy": release.strategy,
                "candidate_version": str(release.candidate_version), "champion_version": result.champion_version,
                "steps": dg.MetadataValue.md("\n".join(f"- {s}" for s in result.steps)),
                "seconds": dg.MetadataValue.float(round(result.seconds, 2))}
    if promote:  # a promotion is a deployment: the catalog (and the post-deploy watch) see the new version
        context.log_event(dg.AssetMaterialization(
            asset_key=names_for_asset(context).key("model_deployment"), description=summary,
            metadata={"live_version": result.champion_version, "replaced_version": str(release.champion_version),
                      "endpoint": target.endpoint, "deployed_by": "release", **metadata}))
    context.add_output_metadata(metadata)
    return {"release_id": release.release_id, "action": action, "champion_version": result.champion_version}


@dg.job(name=PROMOTE_JOB, description="Promote the live shadow or canary release (a release decision).")
def release_promote_job() -> None:
    promote_release_op()


@dg.job(name=ABORT_JOB, description="End the live shadow or canary release; the champion keeps serving (a release decision).")
def release_abort_job() -> None:
    abort_release_op()


def _since_start(log_url: str, started_at: pd.Timestamp, now: datetime) -> pd.DataFrame:
    return mon.read_window(log_url, started_at, pd.Timestamp(now) + pd.Timedelta(seconds=1)).frame


@dg.sensor(jobs=[release_promote_job, release_abort_job], minimum_interval_seconds=c.RELEASE_SENSOR_INTERVAL_SECONDS,
           default_status=dg.DefaultSensorStatus.RUNNING)
def release_decision_sensor(context: dg.SensorEvaluationContext, platform: PlatformResource, mlflow: MlflowResource,
                            ray_serve: RayServeResource, monitoring: MonitoringResource):
    """Promote a live release once its candidate matched or beat the champion over the release's
    requests and time; end it as soon as the candidate trails (errors, labels, else estimates)."""
    from mlops_assets.defs.monitoring.sensors import metrics_endpoints

    names = names_for_instigator(context)
    platform, mlflow = platform.for_dataset(names.dataset), mlflow.for_dataset(names.dataset)
    ray_serve, monitoring = ray_serve.for_dataset(names.dataset), monitoring.for_dataset(names.dataset)
    target = ray_serve.target()
    release = _release_of(target)
    state = json.loads(context.cursor) if context.cursor else {}
    if not release.active or not release.candidate_version or not release.champion_version:
        return dg.SensorResult(skip_reason=dg.SkipReason("no release in progress"), cursor=json.dumps(state))
    if state.get("release_id") != release.release_id:
        state = {"release_id": release.release_id, "baseline": _to_json(_parse(_scrape(metrics_endpoints(monitoring, target)), target.app_name))}
    if state.get("decided"):
        return dg.SensorResult(skip_reason=dg.SkipReason(f"release {release.release_id}: {state['decided']} requested"),
                               cursor=json.dumps(state))
    now = datetime.now(UTC)
    started = pd.Timestamp(release.started_at or now)
    spec = platform.spec()
    log = _since_start(monitoring.prediction_log_url, started, now)
    labels = mon.read_labels(monitoring.labels_url).frame
    counts = cmp.counts_since(_parse(_scrape(metrics_endpoints(monitoring, target)), target.app_name), _from_json(state.get("baseline")))
    champion, candidate = str(release.champion_version), str(release.candidate_version)
    result = cmp.compare_release(log, labels, strategy=release.strategy, champion_version=champion,
                                 candidate_version=candidate, positive_class=spec.positive_class,
                                 label_values=list(spec.label_values),
                                 calibrators=calibrators_for(mlflow, [champion, candidate]), counts=counts)
    decision = cmp.release_decision(result, release.terms(), started, now)
    state["last"] = {"action": decision.action, "reasons": list(decision.reasons), "evidence": decision.evidence,
                     **{k: v for k, v in result.numbers().items() if v is not None}}
    if decision.action == "wait":
        return dg.SensorResult(skip_reason=dg.SkipReason(f"release {release.release_id}: {'; '.join(decision.reasons)}"),
                               cursor=json.dumps(state, default=str))
    state["decided"] = decision.action
    context.log.info(f"release {release.release_id}: {decision.action}: {'; '.join(decision.reasons)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"release-{release.release_id}-{decision.action}",
                                    job_name=names.name(PROMOTE_JOB if decision.action == "promote" else ABORT_JOB),
                                    tags={RELEASE_TAG: str(release.release_id),
                                          DECISION_TAG: json.dumps(list(decision.reasons))[:4000],
                                          "mlops_assets/trigger": "release_decision_sensor"})],
        cursor=json.dumps(state, default=str))


def _scrape(urls: list[str]) -> dict[str, str]:
    """url -> Prometheus text of each node's metrics endpoint that answers."""
    import httpx

    out = {}
    for url in urls:
        try:
            with httpx.Client(timeout=5.0, trust_env=False) as client:
                response = client.get(url)
            if response.status_code == 200:
                out[url] = response.text
        except httpx.HTTPError:
            continue
    return out


def _parse(texts: dict[str, str] | None, application: str | None) -> "Counters":
    """The release counters of `application` (the data set's Serve app) on every node, summed."""
    total: dict[str, tuple[int, int, dict[float, float]]] = {}
    for text in (texts or {}).values():
        for role, (answered, failed, buckets) in cmp.parse_release_counters(text, application=application).items():
            a, f, b = total.get(role, (0, 0, {}))
            merged = dict(b)
            for le, count in buckets.items():
                merged[le] = merged.get(le, 0.0) + count
            total[role] = (a + answered, f + failed, merged)
    return total


Counters = dict[str, tuple[int, int, dict[float, float]]]


def _to_json(counters: Counters) -> dict[str, Any]:
    return {role: [a, f, sorted(b.items())] for role, (a, f, b) in counters.items()}


def _from_json(raw: Any) -> Counters:
    if not isinstance(raw, dict):
        return {}
    return {role: (int(a), int(f), {float(le): float(n) for le, n in b}) for role, (a, f, b) in raw.items()}


defs = dg.Definitions(assets=[release_comparison], jobs=[release_promote_job, release_abort_job],
                      sensors=[release_decision_sensor])

"""Deployment: the champion served by Ray Serve, its health check, and the one-step rollback job."""


from typing import Any

import dagster as dg
import pandas as pd

from mlops_assets import constants as c
from mlops_assets.core.records import Deployment, Registration
from mlops_assets.defs.datasets import names_for_asset
from mlops_assets.defs.metadata import redact_text, url_value
from mlops_assets.defs.resources import MlflowResource, PlatformResource, RayServeResource
from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.release import DEFAULT_SHADOW_MAX_IN_FLIGHT, ReleaseConfig

SAMPLE_RECORDS = 64  # test-set rows the candidate must answer exactly as the offline model does
DEPLOYMENT_CODE_VERSION = "2"
SPLIT_COLUMN = "split"  # the train_test_split frame's split column ("train" / "test")


def replica_env(platform: PlatformResource, mlflow: MlflowResource, ray_serve: RayServeResource) -> dict[str, str]:
    """What replicas must agree on with Dagster: the same registry, data root, prediction log and
    spec (never the token).

    A tracking URI with a password reaches them as a 0600 file under <data root>/secrets (or the
    operator's mounted file), named by MLOPS_MLFLOW_TRACKING_URI_FILE: never in the Serve config."""
    try:
        return dep.replica_env_vars(
            tracking_uri=mlflow.tracking_uri, data_url=platform.data_url,
            prediction_log_url=ray_serve.prediction_log_url, dataset_spec_path=platform.dataset_spec_path,
            tracking_uri_file=mlflow.tracking_uri_file)
    except ValueError as exc:  # a credential and no file to hand it over in: the message says what to mount
        raise dg.Failure(description=str(exc)) from None


def _result_metadata(result: dep.DeployResult, target: dep.ServeTarget) -> dict[str, Any]:
    return {
        "endpoint": url_value(result.endpoint),
        "live_version": result.live_version,
        "replaced_version": result.replaced_version or "none",
        "checked_records": result.checked_records,
        "deploy_seconds": dg.MetadataValue.float(round(result.seconds, 2)),
        "steps": dg.MetadataValue.md("\n".join(f"- {s}" for s in result.steps)),
        "ray_dashboard": url_value(f"{target.dashboard_url}/#/serve"),
    }


class DeploymentConfig(dg.Config):
    """How a new champion goes out (the launchpad): `direct` replaces the serving version at once;
    `shadow` and `canary` run it beside the serving one until the release sensor promotes or ends it.
    Empty fields take the ray_serve resource's values (MLOPS_RELEASE_STRATEGY, MLOPS_RELEASE_CANARY_SHARE)
    and the constants' release terms."""

    strategy: str = ""
    canary_share: float | None = None
    min_requests: int = c.RELEASE_MIN_REQUESTS
    min_duration_s: float = c.RELEASE_MIN_DURATION_S
    max_metric_drop: float = c.RELEASE_MAX_METRIC_DROP
    min_labelled: int = c.RELEASE_MIN_LABELLED
    candidate_replicas: int = 1
    shadow_sample_share: float = 1.0  # a shadow mirrors this share of the answered requests (1.0: all)
    # mirrors queued or being scored at once per ingress replica; beyond it a mirror is dropped, counted
    shadow_max_in_flight: int = DEFAULT_SHADOW_MAX_IN_FLIGHT


@dg.asset(group_name=c.GROUP_DEPLOYMENT, owners=c.ASSET_OWNERS, kinds={"ray", "mlflow"}, code_version=DEPLOYMENT_CODE_VERSION,
          pool=c.SERVE_DEPLOY_POOL)
def model_deployment(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    platform: PlatformResource,
    mlflow: MlflowResource,
    ray_serve: RayServeResource,
    registered_model: Registration,
    train_test_split: pd.DataFrame,
) -> dg.Output[Deployment]:
    """The Ray Serve application serving the champion, live only after a load-and-query check."""
    spec = platform.spec()
    name = registered_model.model_name
    version = registered_model.champion_version
    if not version:
        raise dg.Failure(f"model {name!r} has no champion yet (the gate has not passed): nothing to deploy")
    target = ray_serve.target()
    live = _live_or_none(target)
    if live == str(version):  # the champion already serves: redeploying would only restart replicas
        context.log.info(f"skipped deployment: version {version} already serves at {target.endpoint}")
        return dg.Output(
            Deployment(model_name=name, live_version=str(version), replaced_version=None,
                       endpoint=target.endpoint, app_name=target.app_name, skipped=True),
            data_version=dg.DataVersion(f"{name}-{version}"),
            metadata={"endpoint": url_value(target.endpoint), "live_version": str(version), "skipped": True,
                      "skip_reason": f"version {version} already serves",
                      "model_version": mlflow.model_version_link(name, str(version))})
    test = train_test_split[train_test_split[SPLIT_COLUMN] == "test"] if SPLIT_COLUMN in train_test_split else train_test_split
    records = dep.sample_records(test, spec, SAMPLE_RECORDS)
    tracking_uri = mlflow.tracking_uri
    strategy = config.strategy or ray_serve.release_strategy
    ongoing = _release_or_direct(target)
    if ongoing.active:
        raise dg.Failure(f"release {ongoing.release_id} ({ongoing.strategy} of version {ongoing.candidate_version}) "
                         f"is in progress: promote or abort it first (mlops-assets release promote|abort)")
    if strategy != "direct" and live is not None:
        return _release(context, config, platform, mlflow, ray_serve, registered_model, strategy, live, records)
    expected = dep.offline_probabilities(dep.offline_model(tracking_uri, name, str(version)), records, spec)
    try:
        result = dep.deploy_version(
            target=target, tracking_uri=tracking_uri, spec=spec, version=str(version), records=records,
            expected=expected, model_name=name, base_config=ray_serve.base_config(),
            env_vars=replica_env(platform, mlflow, ray_serve), http_host=ray_serve.http_host,
            timeout_s=ray_serve.timeout_s,
        )
    except dep.DeploymentError as exc:
        live = dep.live_version(target)
        raise dg.Failure(description=redact_text(str(exc)), metadata={"candidate_version": str(version),
                                                         "still_live_version": live or "none"}) from exc
    context.log.info(redact_text(f"version {result.live_version} live at {result.endpoint} (replaced {result.replaced_version})"))
    return dg.Output(
        Deployment(model_name=name, live_version=result.live_version, replaced_version=result.replaced_version,
                   endpoint=result.endpoint, app_name=target.app_name),
        data_version=dg.DataVersion(f"{name}-{result.live_version}"),
        metadata={**_result_metadata(result, target), "skipped": False,
                  "model_version": mlflow.model_version_link(name, result.live_version)},
    )


def _release_or_direct(target: dep.ServeTarget) -> ReleaseConfig:
    try:
        return dep.current_release(target)
    except Exception:  # nothing deployed or no cluster: no release
        return ReleaseConfig()


def _release(context: dg.AssetExecutionContext, config: DeploymentConfig, platform: PlatformResource,
             mlflow: MlflowResource, ray_serve: RayServeResource, registered: Registration, strategy: str,
             live: str, records: list[dict[str, int]]) -> dg.Output[Deployment]:
    """Start a shadow or canary of the new champion beside the serving version (serving/release.py)."""
    name, version = registered.model_name, str(registered.champion_version)
    target = ray_serve.target()
    try:
        release = ReleaseConfig(
            strategy=strategy, candidate_version=version,
            canary_share=ray_serve.release_canary_share if config.canary_share is None else config.canary_share,
            min_requests=config.min_requests, min_duration_s=config.min_duration_s,
            max_metric_drop=config.max_metric_drop, min_labelled=config.min_labelled,
            shadow_sample_share=config.shadow_sample_share, shadow_max_in_flight=config.shadow_max_in_flight)
        result = dep.launch_release(
            target=target, tracking_uri=mlflow.tracking_uri, spec=platform.spec(), model_name=name, release=release,
            records=records, actor=mlflow.actor, base_config=ray_serve.base_config(),
            env_vars=replica_env(platform, mlflow, ray_serve), http_host=ray_serve.http_host,
            candidate_replicas=config.candidate_replicas, timeout_s=ray_serve.timeout_s)
    except (dep.DeploymentError, ValueError) as exc:
        raise dg.Failure(description=redact_text(str(exc)), metadata={"candidate_version": version,
                                                                      "still_live_version": live}) from exc
    started = result.release
    context.log.info(f"{strategy} release {started.release_id}: version {version} beside champion {live}")
    return dg.Output(
        Deployment(model_name=name, live_version=live, replaced_version=None, endpoint=target.endpoint,
                   app_name=target.app_name),
        data_version=dg.DataVersion(f"{name}-{live}-{strategy}-{version}"),
        metadata={"endpoint": url_value(target.endpoint), "live_version": live, "skipped": False,
                  "release_strategy": strategy, "release_id": str(started.release_id),
                  "candidate_version": version,
                  **({"canary_share": dg.MetadataValue.float(started.canary_share)} if strategy == "canary" else {}),
                  **({"shadow_sample_share": dg.MetadataValue.float(started.shadow_sample_share)}
                     if strategy == "shadow" else {}),
                  "release_terms": dg.MetadataValue.json({"min_requests": started.min_requests,
                                                          "min_duration_s": started.min_duration_s,
                                                          "max_metric_drop": started.max_metric_drop,
                                                          "min_labelled": started.min_labelled}),
                  "steps": dg.MetadataValue.md("\n".join(f"- {s}" for s in result.steps)),
                  "model_version": mlflow.model_version_link(name, version)})


def _live_or_none(target: dep.ServeTarget) -> str | None:
    """The version the endpoint serves now; None when nothing answers (then deploy as usual)."""
    try:
        return dep.live_version(target)
    except Exception:  # an unreachable cluster is the deploy step's to report, with its own message
        return None


@dg.asset_check(asset=model_deployment, description="The endpoint is healthy and serves the deployed version.")
def serving_health(ray_serve: RayServeResource, model_deployment: Deployment) -> dg.AssetCheckResult:
    target = ray_serve.target()
    try:
        health_code, health = dep.get_json(target, "/healthz")
        model_code, model = dep.get_json(target, "/model")
    except Exception as exc:  # unreachable endpoint: a failed check, with the reason
        return dg.AssetCheckResult(passed=False, metadata={"error": redact_text(f"{type(exc).__name__}: {exc}")})
    live = str(model.get("version")) if model_code == 200 else None
    return dg.AssetCheckResult(
        passed=health_code == 200 and live == model_deployment.live_version,
        metadata={"healthz": health_code, "live_version": live or "none",
                  "deployed_version": model_deployment.live_version, "status": str(health.get("status"))},
    )


@dg.op(description="Point champion at previous-champion and deploy it; undone if the deploy fails.",
       pool=c.SERVE_DEPLOY_POOL)
def rollback_champion_op(
    context: dg.OpExecutionContext, platform: PlatformResource, mlflow: MlflowResource, ray_serve: RayServeResource
) -> dict:
    spec = platform.spec()
    tracking_uri = mlflow.tracking_uri
    target = ray_serve.target()
    records = dep.simulated_sample(spec)
    try:
        result = dep.rollback(target=target, tracking_uri=tracking_uri, spec=spec,
                              model_name=mlflow.model_name, records=records,
                              base_config=ray_serve.base_config(),
                              env_vars=replica_env(platform, mlflow, ray_serve),
                              http_host=ray_serve.http_host, actor=mlflow.actor)
    except Exception as exc:
        raise dg.Failure(description=redact_text(str(exc))) from exc
    metadata = {**_result_metadata(result, target),
                "model_version": mlflow.model_version_link(mlflow.model_name, result.live_version)}
    context.add_output_metadata(metadata)
    # The catalog's model_deployment names what serves: a rollback is a deployment too.
    context.log_event(dg.AssetMaterialization(
        asset_key=names_for_asset(context).key(model_deployment.key.path[-1]),  # the run's data set's
        description=f"rollback: version {result.live_version} live again, replacing {result.replaced_version}",
        metadata={**metadata, "deployed_by": "rollback"},
    ))
    return {"live_version": result.live_version, "replaced_version": result.replaced_version}


@dg.job(name="rollback", description="One step back: champion := previous-champion, redeployed to Ray Serve.")
def rollback_job() -> None:
    rollback_champion_op()


defs = dg.Definitions(assets=[model_deployment], asset_checks=[serving_health], jobs=[rollback_job])

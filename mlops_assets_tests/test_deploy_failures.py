"""Failure paths on a real Ray Serve application, under a steady stream of concurrent requests.

One Ray head for the module, a real MLflow SQLite registry with three CatBoost versions. The
live version keeps answering while (a) a candidate whose artifact fails its hash check and (b)
a candidate whose replicas cannot start are refused; (c) a rollback whose redeploy fails leaves
the aliases as they were; a rollback records itself on `model_deployment`. Last, the head is
SIGKILLed and restarted on the same ports, and the post-deployment watch restores the champion
instead of rolling it back, with one alert.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import dagster as dg
import httpx
import pytest
import yaml
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.registry import model_store
from mlops_assets.tools.ray_cluster import kill_session, session_processes, start_head
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster
from mlops_assets_tests.registry_support import register_simulated_versions
from mlops_assets_tests.test_automation import Webhook
from mlops_assets_tests.test_serving_integration import ARGS, MODEL_NAME, TOKEN, Platform

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TAMPERED = "3"  # registered, then its model file changed in the artifact store
# A replica constructor that fails: the spec file it must load does not exist. The option itself
# is valid (render_serve_config accepts it), so only the replicas can find out.
BROKEN_ARGS = {**ARGS, "dataset_spec_path": "/nonexistent/mlops-assets/spec.json"}
FAIL_TIMEOUT_S = 150.0


@dataclass
class Outcome:
    status: int  # 0: no HTTP answer at all
    version: str | None
    error: str = ""


@dataclass
class Load:
    """Outcomes of the steady clients, and the live version each answer must name."""

    outcomes: list[Outcome] = field(default_factory=list)

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def versions(self) -> set[str | None]:
        return {o.version for o in self.outcomes}


@contextmanager
def steady_load(platform: Platform, threads: int = 4, pause_s: float = 0.02) -> Iterator[Load]:
    """`threads` loopback clients posting small batches until the block ends (bounded: one in flight each)."""
    load = Load()
    stop = threading.Event()
    records = platform.records(5, offset=300)

    def client_loop() -> None:
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not stop.is_set():
                try:
                    response = platform.post(client, {"records": records})
                except httpx.HTTPError as exc:
                    load.outcomes.append(Outcome(0, None, type(exc).__name__))
                    continue
                body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
                load.outcomes.append(Outcome(response.status_code, body.get("model_version"),
                                             "" if response.status_code == 200 else response.text[:200]))
                time.sleep(pause_s)

    workers = [threading.Thread(target=client_loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # the stream is flowing before the failure starts
    try:
        yield load
    finally:
        time.sleep(1.0)  # and keeps flowing after it
        stop.set()
        for worker in workers:
            worker.join(60)


def _tamper(client: MlflowClient, version: str) -> Path:
    """Change one byte of the version's native model file where the artifact store keeps it."""
    uri = client.get_model_version_download_uri(MODEL_NAME, version)
    path = Path(unquote(urlparse(uri).path)) / model_store.MODEL_ARTIFACT_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("deploy-failures")
    data = root / "data"
    spec = default_spec()
    tracking_uri, client, models = register_simulated_versions(
        data, spec, model_name=MODEL_NAME, experiment="deploy-failures",
        seeds_and_iterations=((1, 30), (2, 60), (3, 20)), n_rows=1200)
    _tamper(client, TAMPERED)
    model_store.promote_to_champion(client, MODEL_NAME, "1")
    model_store.promote_to_champion(client, MODEL_NAME, "2")  # champion 2, previous-champion 1

    cluster = isolated_cluster(root)
    target = dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, token=TOKEN)
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_DATA_URL": str(data)}
    # Serve gives up on a deployment after 3 failed replica starts per replica (6 here, about 100 s
    # on 2 cores); the refusal these tests check is the same after one each.
    head_env = {"MLOPS_API_TOKEN": TOKEN, "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1", **env_vars}
    start_head(cluster, env=head_env)
    try:
        sample = simulate_records(spec, SimulationConfig(n_rows=400, seed=99))
        p = Platform(spec, tracking_uri, target, cluster, str(data / "predictions"), env_vars, models, sample)
        p.deploy("2")
        yield p
    finally:
        end_test_head(cluster)


def _live_app_config(platform: Platform) -> dict[str, Any]:
    config = dep.live_config(platform.target)
    assert config is not None
    [app] = config["applications"]
    return app


def _aliases(platform: Platform) -> tuple[str | None, str | None]:
    client = MlflowClient(tracking_uri=platform.tracking_uri)
    return (model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION),
            model_store.alias_version(client, MODEL_NAME, c.ALIAS_PREVIOUS_CHAMPION))


def _deploy(platform: Platform, version: str, args: dict[str, Any] = ARGS, **kw: Any) -> dep.DeployResult:
    records = platform.records(16, offset=100)
    return dep.deploy_version(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                              version=version, records=records, expected=platform.expected(version, records),
                              model_name=MODEL_NAME, env_vars=platform.env_vars, args=args, **kw)


def test_a_candidate_whose_artifact_fails_its_hash_check_is_refused_and_every_request_is_answered(
    platform: Platform,
) -> None:
    before = _live_app_config(platform)
    with steady_load(platform) as load, pytest.raises(dep.DeploymentError, match="sha256") as refused:
        _deploy(platform, TAMPERED)
    assert "load check" in str(refused.value)
    assert len(load.outcomes) > 20, f"too few requests to show anything: {len(load.outcomes)}"
    assert load.failed() == [], f"{len(load.failed())} of {len(load.outcomes)} failed: {load.failed()[:3]}"
    assert load.versions() == {"2"}
    assert _live_app_config(platform) == before
    assert dep.live_version(platform.target) == "2"


def test_a_candidate_whose_replicas_cannot_start_is_refused_and_every_request_is_answered(
    platform: Platform,
) -> None:
    before = _live_app_config(platform)
    started = time.monotonic()
    with steady_load(platform) as load, pytest.raises(dep.DeploymentError) as refused:
        _deploy(platform, "1", args=BROKEN_ARGS, timeout_s=FAIL_TIMEOUT_S)
    message = str(refused.value)
    print(f"replicas that cannot start: refused after {time.monotonic() - started:.1f}s, "
          f"{len(load.outcomes)} requests meanwhile: {message[:300]}")
    assert "deploying version 1 failed" in message and "version 2 serves" in message
    assert len(load.outcomes) > 20
    assert load.failed() == [], f"{len(load.failed())} of {len(load.outcomes)} failed: {load.failed()[:3]}"
    assert load.versions() == {"2"}
    after = _live_app_config(platform)
    assert after["args"] == before["args"] and after["deployments"] == before["deployments"]
    assert (dep.app_details(platform.target) or {}).get("status") == "RUNNING"
    assert dep.serving_outage(platform.target) is None


def test_a_rollback_whose_redeploy_fails_leaves_the_aliases_as_they_were(platform: Platform) -> None:
    assert _aliases(platform) == ("2", "1")
    with steady_load(platform) as load, pytest.raises(dep.DeploymentError, match="failed and was undone"):
        dep.rollback(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                     model_name=MODEL_NAME, records=platform.records(16), env_vars=platform.env_vars,
                     args=BROKEN_ARGS, timeout_s=FAIL_TIMEOUT_S)
    assert _aliases(platform) == ("2", "1")
    assert load.failed() == [] and load.versions() == {"2"}
    assert dep.live_version(platform.target) == "2"

    # A previous-champion whose artifact fails its hash check: refused before the cluster is touched.
    client = MlflowClient(tracking_uri=platform.tracking_uri)
    client.set_registered_model_alias(MODEL_NAME, c.ALIAS_PREVIOUS_CHAMPION, TAMPERED)
    try:
        with pytest.raises(dep.DeploymentError, match="failed and was undone"):
            dep.rollback(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                         model_name=MODEL_NAME, records=platform.records(16), env_vars=platform.env_vars, args=ARGS)
        assert _aliases(platform) == ("2", TAMPERED)
    finally:
        client.set_registered_model_alias(MODEL_NAME, c.ALIAS_PREVIOUS_CHAMPION, "1")
    assert dep.live_version(platform.target) == "2"


@pytest.fixture(scope="module")
def dagster(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Dagster instance, the platform's resources pointed at this module's cluster, a webhook."""
    from mlops_assets.defs.resources import (
        MlflowResource,
        MonitoringResource,
        PlatformResource,
        RayServeResource,
    )

    folder = tmp_path_factory.mktemp("dagster")
    config = dep.load_serve_config()
    config["applications"][0]["args"] = dict(ARGS)
    serve_config = folder / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    hook = Webhook()
    resources = {
        "platform": PlatformResource.at(platform.env_vars["MLOPS_DATA_URL"]),
        "mlflow": MlflowResource(tracking_uri=platform.tracking_uri, model_name=MODEL_NAME),
        "ray_serve": RayServeResource(dashboard_url=platform.target.dashboard_url,
                                      serve_url=platform.target.serve_url, api_token=TOKEN,
                                      serve_config_path=str(serve_config), timeout_s=FAIL_TIMEOUT_S),
        "monitoring": MonitoringResource.at(platform.env_vars["MLOPS_DATA_URL"], prediction_log_url=platform.log_url, metrics_url=platform.cluster.metrics_url,
                                         alert_webhook_url=hook.url),
    }
    # The watch reads the registry through the platform's settings, as under `make up`.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLOPS_MODEL_NAME", "MLOPS_SERVE_CONFIG")}
    os.environ.update({"MLFLOW_TRACKING_URI": platform.tracking_uri, "MLOPS_MODEL_NAME": MODEL_NAME,
                       "MLOPS_SERVE_CONFIG": str(serve_config)})
    try:
        with dg.instance_for_test() as instance:
            yield {"instance": instance, "resources": resources, "webhook": hook}
    finally:
        hook.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_a_rollback_records_itself_on_model_deployment(platform: Platform, dagster: dict[str, Any]) -> None:
    from mlops_assets.defs.deployment.assets import rollback_job

    instance = dagster["instance"]
    assert _aliases(platform) == ("2", "1") and dep.live_version(platform.target) == "2"
    resources = {k: v for k, v in dagster["resources"].items() if k in ("platform", "mlflow", "ray_serve")}
    result = rollback_job.execute_in_process(resources=resources, instance=instance)
    assert result.success
    assert _aliases(platform) == ("1", "2") and dep.live_version(platform.target) == "1"

    event = instance.get_latest_materialization_event(dg.AssetKey("model_deployment"))
    assert event is not None and event.run_id == result.run_id
    meta = {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}
    assert meta["live_version"] == "1" and meta["replaced_version"] == "2"
    assert meta["endpoint"] == platform.target.endpoint and meta["deployed_by"] == "rollback"
    # The same keys the asset records, so the catalog and the watch read a rollback like a deploy.
    assert {"endpoint", "live_version", "replaced_version", "checked_records", "deploy_seconds", "steps",
            "ray_dashboard", "model_version"} <= set(meta)


def _kill_head_group(platform: Platform) -> None:
    """What losing the machine does to the head: SIGKILL to every process of its session, no shutdown.

    The session, not the process group: HAProxy runs in a group of its own, and one left alive
    would keep the Serve port from the next head.
    """
    pid = int(platform.cluster.pid_file.read_text().strip())
    kill_session(pid)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)  # our child: reap it
        except ChildProcessError:
            pass
        if not session_processes(pid):
            break
        time.sleep(0.2)
    platform.cluster.pid_file.unlink(missing_ok=True)


def test_after_the_head_is_lost_the_watch_restores_the_champion_without_a_rollback(
    platform: Platform, dagster: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlops_assets.defs.monitoring import sensors as automation
    from mlops_assets.defs.monitoring.sensors import post_deploy_watch

    # Evaluated here, not by the daemon: no 60 s evaluation timeout, so one tick may take the
    # whole restore on this shared machine (a cold head starts Serve, its proxy and two replicas).
    monkeypatch.setattr(automation, "OUTAGE_RESTORE_TIMEOUT_S", FAIL_TIMEOUT_S)

    instance, resources, hook = dagster["instance"], dagster["resources"], dagster["webhook"]
    champion, previous = _aliases(platform)
    assert dep.live_version(platform.target) == champion
    assert instance.get_latest_materialization_event(dg.AssetKey("model_deployment")) is not None

    def tick(cursor: str | None) -> tuple[dg.SensorResult, str | None]:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        result = post_deploy_watch(context)
        assert isinstance(result, dg.SensorResult)
        return result, result.cursor

    _, cursor = tick(None)  # serving: the watch only takes its baseline
    hook.received.clear()

    _kill_head_group(platform)
    assert dep.serving_outage(platform.target) is not None
    start_head(platform.cluster, env={"MLOPS_API_TOKEN": TOKEN, **platform.env_vars})  # the same ports
    assert dep.serving_outage(platform.target) is not None  # a head again, but nothing serves

    # The daemon ticks every 30 s; a restore longer than one tick's bound finishes on a later one.
    for _ in range(4):
        result, cursor = tick(cursor)
        assert not result.run_requests, "an outage must never request a rollback"
        if json.loads(cursor or "{}").get("outage") is None:
            break
    assert dep.live_version(platform.target) == champion
    assert _aliases(platform) == (champion, previous)
    records = platform.records(8)
    with httpx.Client(timeout=30, trust_env=False) as client:
        response = platform.post(client, {"records": records})
    assert response.status_code == 200 and response.json()["model_version"] == champion
    assert [p["phishing_probability"] for p in response.json()["predictions"]] == platform.expected(champion, records)

    result, cursor = tick(cursor)  # serving again: nothing more to do, no second alert
    assert not result.run_requests
    [alert] = hook.received
    assert alert["kind"] == "serving_restored" and alert["details"]["champion"] == champion
    assert alert["details"]["outage"] and alert["details"]["action"] == "deployed"
    assert json.loads(cursor or "{}").get("outage") is None


def test_serve_restore_redeploys_a_missing_app_and_leaves_a_serving_one_alone(
    platform: Platform, dagster: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """What `make up` runs after starting the head: the champion again if nothing serves it."""
    from mlops_assets.tools.cli import main

    for key, value in {**platform.env_vars, "MLOPS_API_TOKEN": TOKEN, "MLOPS_MODEL_NAME": MODEL_NAME}.items():
        monkeypatch.setenv(key, value)
    champion, previous = _aliases(platform)
    argv = ["serve", "restore", "--dashboard-url", platform.target.dashboard_url, "--endpoint", platform.target.serve_url]
    dep.delete_app(platform.target)
    deadline = time.monotonic() + 60
    while dep.app_details(platform.target) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "not deployed" in (dep.serving_outage(platform.target) or "")

    assert main(argv) == 0
    assert f"restored serving of champion version {champion}" in capsys.readouterr().out
    assert dep.live_version(platform.target) == champion and _aliases(platform) == (champion, previous)
    assert main(argv) == 0
    assert "already serving: nothing to restore" in capsys.readouterr().out

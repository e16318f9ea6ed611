"""Serving beyond one node: a Ray cluster of a head and a worker that joined it with
`ray start --address`, both on loopback with the cluster's token, the replicas on the worker.

One cluster for the module (tools/ray_cluster.py: the head on 127.0.0.2 with no CPUs, so the
Serve controller and proxy stay there and every replica goes to the worker on 127.0.0.3), a real
MLflow SQLite registry with two versions. The serving token reaches the replicas through the
worker's environment only (the head has none). Checked there: the replicas' node, answers over
HTTP through the head's proxy, the prediction log the worker's replicas write, the metrics of every
node found from the dashboard (the head's endpoint alone has no serving counters), and the
post-deployment watch on those metrics requesting the rollback job, which serves the previous
version again, still on the worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.core.records import Registration
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import live as mon
from mlops_assets.registry import model_store
from mlops_assets.serving.prediction_log import read_prediction_log
from mlops_assets.tools.ray_cluster import (
    ClusterConfig,
    WorkerConfig,
    start_head,
    start_worker,
    stop_worker,
    worker_command,
)
from mlops_assets.tools.ray_cluster import main as ray_cluster_main
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets_tests.ray_support import (
    MULTI_NODE_HEAD,
    MULTI_NODE_WORKER,
    end_test_head,
    isolated_two_nodes,
)
from mlops_assets_tests.registry_support import register_simulated_versions
from mlops_assets_tests.test_automation import Webhook
from mlops_assets_tests.test_serving_integration import ARGS, MODEL_NAME, TOKEN, Platform

LATENCY_LIMIT_S = 0.0005  # below the histogram's first bucket (1 ms): any counted request breaks it


@dataclass
class Cluster:
    platform: Platform
    head: ClusterConfig
    worker: WorkerConfig
    data: Path

    def worker_node_id(self) -> str:
        [node] = [n for n in dep.cluster_nodes(self.platform.target) if n.get("nodeManagerAddress") == self.worker.host]
        return str(node["nodeId"])

    def replica_nodes(self) -> dict[str, set[str]]:
        """Deployment -> the node ids its RUNNING replicas are on."""
        app = dep.serve_applications(self.platform.target)["applications"][self.platform.target.app_name]
        return {name: {r["node_id"] for r in d.get("replicas") or [] if r.get("state") == "RUNNING"}
                for name, d in app["deployments"].items()}

    def send(self, n_requests: int, offset: int = 0) -> list[str]:
        """`n_requests` requests of 5 records through the head's proxy; the request ids."""
        ids = []
        with httpx.Client(timeout=30, trust_env=False) as client:
            for i in range(n_requests):
                response = self.platform.post(client, {"records": self.platform.records(5, offset=offset + 5 * i)})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])
        return ids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("multinode")
    data = root / "data"
    spec = default_spec()
    tracking_uri, client, models = register_simulated_versions(
        data, spec, model_name=MODEL_NAME, experiment="multinode", seeds_and_iterations=((1, 30), (2, 60)),
        n_rows=1000)
    model_store.promote_to_champion(client, MODEL_NAME, "1")

    head, worker = isolated_two_nodes(root)
    target = dep.ServeTarget(head.dashboard_url, head.serve_url, token=TOKEN)
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_DATA_URL": str(data)}
    started = time.monotonic()
    start_head(head)  # no serving token here: only the worker's replicas need it
    try:
        start_worker(worker, env={"MLOPS_API_TOKEN": TOKEN})
        print(f"two-node cluster up in {time.monotonic() - started:.1f}s")
        sample = simulate_records(spec, SimulationConfig(n_rows=1200, seed=99))
        platform = Platform(spec, tracking_uri, target, head, str(data / "predictions"), env_vars, models, sample)
        records = platform.records(16, offset=1000)
        dep.deploy_version(target=target, tracking_uri=tracking_uri, spec=spec, version="1", records=records,
                           expected=platform.expected("1", records), model_name=MODEL_NAME, env_vars=env_vars,
                           args=ARGS, http_host=MULTI_NODE_HEAD)
        yield Cluster(platform, head, worker, data)
    finally:
        stop_worker(worker)
        end_test_head(head)



@pytest.mark.integration
@pytest.mark.slow
def test_every_replica_runs_on_the_worker_node(cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    nodes = dep.cluster_nodes(cluster.platform.target)
    assert sorted((n["nodeManagerAddress"], n["isHeadNode"], n["state"]) for n in nodes) == [
        (MULTI_NODE_HEAD, True, "ALIVE"), (MULTI_NODE_WORKER, False, "ALIVE")]
    worker_id = cluster.worker_node_id()
    placed = cluster.replica_nodes()
    assert placed["PredictionService"] and placed["PredictionIngress"], placed  # scorers and the HTTP ingress
    assert set().union(*placed.values()) == {worker_id}, placed
    [head_id] = [n["nodeId"] for n in nodes if n["isHeadNode"]]

    # The CLI's status lists the nodes of the head it is configured for.
    for key, value in {"MLOPS_RAY_HOST": cluster.head.host, "MLOPS_RAY_DASHBOARD_PORT": str(cluster.head.dashboard_port),
                       "MLOPS_RAY_TOKEN_FILE": str(cluster.head.token_path)}.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert ray_cluster_main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"head {MULTI_NODE_HEAD}: ALIVE, 0 CPUs" in out and f"worker {MULTI_NODE_WORKER}: ALIVE, 2 CPUs" in out, out
    with capsys.disabled():
        print(f"replicas {sorted(placed)} on worker node {worker_id} ({MULTI_NODE_WORKER}), none on head {head_id}")


@pytest.mark.integration
@pytest.mark.slow
def test_answers_through_the_head_equal_the_offline_model_and_reach_the_prediction_log(cluster: Cluster) -> None:
    platform = cluster.platform
    records = platform.records(20, offset=200)
    with httpx.Client(timeout=30, trust_env=False) as client:
        response = platform.post(client, {"records": records})
        refused = platform.post(client, {"records": records}, token="not-the-token")
    assert response.status_code == 200, response.text
    assert refused.status_code == 401  # the token the worker's environment gave the replicas
    body = response.json()
    assert body["model_version"] == "1"
    assert [p["phishing_probability"] for p in body["predictions"]] == platform.expected("1", records)
    deadline = time.monotonic() + 60
    while True:
        log = read_prediction_log(platform.log_url)
        mine = log[log[mon.REQUEST_ID] == body["request_id"]] if not log.empty else log
        if len(mine) == len(records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(mine) == len(records), "the worker's replicas did not log the answered request"
    assert set(mine[mon.MODEL_VERSION].astype(str)) == {"1"}


def _requests_at(url: str) -> int:
    counters = mon.parse_serving_metrics(httpx.get(url, timeout=10, trust_env=False).text)
    return counters.requests


def _wait_for_requests(url: str, at_least: int, timeout_s: float = 60.0) -> int:
    """Ray's metrics agent exports a replica's counters every few seconds: wait for them."""
    deadline = time.monotonic() + timeout_s
    seen = _requests_at(url)
    while seen < at_least and time.monotonic() < deadline:
        time.sleep(1.0)
        seen = _requests_at(url)
    return seen


@pytest.mark.integration
@pytest.mark.slow
def test_the_metrics_of_every_node_are_found_and_the_serving_counters_are_on_the_worker(cluster: Cluster) -> None:
    urls = dep.node_metrics_urls(cluster.platform.target)
    assert urls == [cluster.head.metrics_url, cluster.worker.metrics_url]
    cluster.send(5, offset=300)
    assert _wait_for_requests(cluster.worker.metrics_url, 5) >= 5
    assert _requests_at(cluster.head.metrics_url) == 0  # one URL (the head's) would see no traffic at all


@pytest.fixture(scope="module")
def dagster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real Dagster instance with the platform's resources on this cluster. The monitoring
    resource names only the head's metrics endpoint, as a single-node configuration does."""
    from mlops_assets.defs.resources import (
        MlflowResource,
        MonitoringResource,
        PlatformResource,
        RayServeResource,
    )

    folder = tmp_path_factory.mktemp("dagster-multinode")
    config = dep.load_serve_config()
    config["applications"][0]["args"] = dict(ARGS)
    serve_config = folder / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    hook = Webhook()
    platform = cluster.platform
    resources = {
        "platform": PlatformResource.at(str(cluster.data)),
        "mlflow": MlflowResource(tracking_uri=platform.tracking_uri, model_name=MODEL_NAME),
        "ray_serve": RayServeResource(dashboard_url=platform.target.dashboard_url, serve_url=platform.target.serve_url,
                                      api_token=TOKEN, serve_config_path=str(serve_config), http_host=MULTI_NODE_HEAD),
        "monitoring": MonitoringResource.at(
            str(cluster.data), prediction_log_url=platform.log_url, metrics_url=cluster.head.metrics_url,
            alert_webhook_url=hook.url, watch_min_requests=20, watch_max_latency_p95_s=LATENCY_LIMIT_S,
            watch_min_compared_rows=10**6),  # the versions' answers never judged: only the metrics can decide
    }
    try:
        with dg.instance_for_test() as instance:
            yield {"instance": instance, "resources": resources, "webhook": hook, "folder": folder}
    finally:
        hook.close()


@pytest.mark.integration
@pytest.mark.slow
def test_the_watch_reads_the_worker_metrics_and_its_rollback_serves_the_previous_version_on_the_worker(
    cluster: Cluster, dagster: dict[str, Any],
) -> None:
    from mlops_assets.defs.deployment.assets import model_deployment, rollback_job
    from mlops_assets.defs.monitoring.sensors import post_deploy_watch
    from mlops_assets.defs.resources import ParquetIOManager

    platform, instance, resources = cluster.platform, dagster["instance"], dagster["resources"]
    client = MlflowClient(tracking_uri=platform.tracking_uri)
    model_store.promote_to_champion(client, MODEL_NAME, "2")  # champion 2, previous-champion 1
    test_rows = platform.sample.iloc[1000:1100].assign(split="test")

    @dg.asset(name="registered_model")
    def registered() -> Registration:
        return Registration(model_name=MODEL_NAME, version="2", champion_version="2")

    @dg.asset(name="train_test_split")
    def split() -> pd.DataFrame:
        return test_rows

    deploy_resources = {k: v for k, v in resources.items() if k in ("platform", "mlflow", "ray_serve")}
    deployed = dg.materialize([registered, split, model_deployment], instance=instance, resources={
        **deploy_resources, "io_manager": ParquetIOManager(base_url=str(dagster["folder"] / "stand-in"))})
    assert deployed.success and dep.live_version(platform.target) == "2"
    worker_id = cluster.worker_node_id()
    assert set().union(*cluster.replica_nodes().values()) == {worker_id}

    def tick(cursor: str | None) -> tuple[dg.SensorResult, dict[str, Any]]:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        result = post_deploy_watch(context)
        assert isinstance(result, dg.SensorResult)
        return result, json.loads(result.cursor or "{}")

    first, state = tick(None)  # the baseline of every node
    assert not first.run_requests
    assert set(state["baseline"]) == {cluster.head.metrics_url, cluster.worker.metrics_url}
    before = state["baseline"][cluster.worker.metrics_url]["requests"]
    cluster.send(25, offset=400)
    _wait_for_requests(cluster.worker.metrics_url, before + 25)
    result, state = tick(first.cursor)
    seen = state["seen"]
    assert state["verdict"] == "rollback", (state, result.skip_reason)
    assert seen["metrics"] and seen["metrics_endpoints"] == sorted([cluster.head.metrics_url, cluster.worker.metrics_url])
    assert seen["answered_requests"] >= 25 and seen["server_errors"] == 0
    assert seen["latency_p95_s"] is not None and seen["latency_p95_s"] > LATENCY_LIMIT_S
    [request] = result.run_requests
    [alert] = [a for a in dagster["webhook"].received if a["kind"] == "rollback"]
    assert any("latency p95" in reason for reason in alert["details"]["reasons"]), alert
    assert alert["details"]["rollback_to"] == "1"

    rolled = rollback_job.execute_in_process(resources=deploy_resources, instance=instance, tags=request.tags)
    assert rolled.success
    assert dep.live_version(platform.target) == "1"
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION) == "1"
    assert set().union(*cluster.replica_nodes().values()) == {worker_id}
    records = platform.records(8, offset=900)
    with httpx.Client(timeout=30, trust_env=False) as http:
        response = platform.post(http, {"records": records})
    assert response.status_code == 200 and response.json()["model_version"] == "1"
    assert [p["phishing_probability"] for p in response.json()["predictions"]] == platform.expected("1", records)


# --- without a cluster ----------------------------------------------------------------------------


def test_a_worker_refuses_addresses_ray_would_replace_with_the_machines(tmp_path: Path) -> None:
    head = ClusterConfig(state_dir=str(tmp_path))  # 127.0.0.1: Ray swaps it for the machine's address
    with pytest.raises(ValueError, match="MLOPS_RAY_HOST"):
        worker_command(WorkerConfig(head=head), "ray")
    remote_head = ClusterConfig(host="127.0.0.2", port=7000, state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="worker address is localhost"):
        worker_command(WorkerConfig(head=remote_head, host="localhost"), "ray")
    cmd = worker_command(WorkerConfig(head=remote_head, num_cpus=1, metrics_export_port=7100,
                                      resources={"replicas": 4}), "ray")
    for flag in ("--address=127.0.0.2:7000", "--node-ip-address=127.0.0.3", "--num-cpus=1",
                 "--metrics-export-port=7100", "--block", '--resources={"replicas": 4}'):
        assert flag in cmd, cmd
    assert not any(arg.startswith("--head") for arg in cmd)


def test_serving_counters_are_summed_over_nodes_each_against_its_own_baseline() -> None:
    def counters(requests: int, errors: int, fast: int) -> mon.ServingCounters:
        return mon.ServingCounters(requests, errors, ((10.0, float(fast)), (200.0, float(requests)),
                                                      (float("inf"), float(requests))))

    base = {"a": counters(100, 1, 100), "b": counters(50, 0, 50)}
    now = {"a": counters(120, 3, 120),  # 20 more, all fast, 2 errors
           "b": counters(10, 0, 0),  # restarted: its 10 count from zero, all slow
           "c": counters(5, 0, 5)}  # joined after the baseline
    requests, errors, p95 = mon.counters_since_by_node(now, base)
    assert (requests, errors) == (35, 2)
    assert p95 == 0.2  # 25 of 35 under 10 ms: the 95th percentile is in the 200 ms bucket
    assert mon.counters_since_by_node({"a": counters(120, 3, 120)}, base) == (20, 2, 0.01)
    assert mon.merge_counters([counters(1, 0, 1), counters(2, 1, 0)]) == mon.ServingCounters(
        3, 1, ((10.0, 1.0), (200.0, 3.0), (float("inf"), 3.0)))

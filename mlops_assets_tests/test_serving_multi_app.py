"""Two data sets side by side on one real Ray Serve head, each its own application: the phishing
champion at / and a network-flows model at /network_flows, with models in one real MLflow SQLite
registry. Deploying a version of one, or deleting one, leaves the other serving untouched.

One head for the module (2 cores: starting Ray is the expensive part). Each deployment runs one
replica so both applications fit the head's 2 CPUs (the shipped config's 2 + 2 per application
would need 3).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pandas as pd
import pytest
from catboost import CatBoostClassifier

from mlops_assets.core.dataset_spec import DatasetSpec, default_spec, load_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import live as mon
from mlops_assets.serving.prediction_log import read_prediction_log
from mlops_assets.tools.ray_cluster import ClusterConfig, start_head
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster
from mlops_assets_tests.registry_support import register_simulated_versions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-token-multi-0123456789"
PHISHING_MODEL = "phishing-classifier-multi"
FLOWS_MODEL = "network_flows-classifier-multi"
FLOWS = "network_flows"
ARGS = {"max_records": 50, "log_flush_interval_s": 0.5}


@dataclass
class App:
    """One data set's application: where it is, what it serves, and its offline models by version."""

    target: dep.ServeTarget
    spec: DatasetSpec
    model_name: str
    env_vars: dict[str, str]
    models: dict[str, CatBoostClassifier]
    sample: pd.DataFrame

    def records(self, n: int = 20) -> list[dict[str, Any]]:
        return dep.sample_records(self.sample, self.spec, n)

    def expected(self, version: str, records: list[dict[str, Any]]) -> list[float]:
        return dep.offline_probabilities(self.models[version], records, self.spec)

    def predict(self, client: httpx.Client, records: list[dict[str, Any]]) -> httpx.Response:
        return client.post(self.target.endpoint, json={"records": records},
                           headers={"Authorization": f"Bearer {TOKEN}"})


@dataclass
class Cluster:
    cluster: ClusterConfig
    tracking_uri: str
    base: dict[str, Any]
    phishing: App
    flows: App
    phishing_log: str  # the primary's default: <data root>/predictions

    def deploy(self, app: App, version: str) -> dep.DeployResult:
        records = app.records(32)
        return dep.deploy_version(target=app.target, tracking_uri=self.tracking_uri, spec=app.spec, version=version,
                                  records=records, expected=app.expected(version, records), model_name=app.model_name,
                                  base_config=self.base, env_vars=app.env_vars, args=ARGS)


def _one_replica_each(base: dict[str, Any]) -> dict[str, Any]:
    for deployment in base["applications"][0]["deployments"]:
        deployment["num_replicas"] = 1
    return base


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("multi_app")
    data = root / "data"
    phishing_spec, flows_spec = default_spec(), load_spec(FLOWS)
    tracking_uri, client, phishing_models = register_simulated_versions(
        data, phishing_spec, model_name=PHISHING_MODEL, experiment="multi-app-phishing",
        seeds_and_iterations=((1, 20),), n_rows=800)
    _, _, flows_models = register_simulated_versions(  # the same store, its own model and experiment
        data, flows_spec, model_name=FLOWS_MODEL, experiment="multi-app-flows", seeds_and_iterations=((1, 20), (2, 50)),
        n_rows=1000, artifacts="artifacts-flows")

    cluster = isolated_cluster(root)
    flows_root = data / "datasets" / FLOWS  # a second data set's data root (settings.dataset_settings)
    phishing = App(dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, token=TOKEN), phishing_spec,
                   PHISHING_MODEL, dep.replica_env_vars(tracking_uri=tracking_uri, data_url=str(data)),
                   phishing_models, simulate_records(phishing_spec, SimulationConfig(n_rows=100, seed=99)))
    flows = App(dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, FLOWS, TOKEN, route_prefix=f"/{FLOWS}"),
                flows_spec, FLOWS_MODEL,
                dep.replica_env_vars(tracking_uri=tracking_uri, data_url=str(flows_root),
                                     prediction_log_url=str(flows_root / "predictions"), dataset_spec_path=FLOWS),
                flows_models, simulate_records(flows_spec, SimulationConfig(n_rows=100, seed=99)))
    # A removed application's ingress replicas drain 30 s by default so HAProxy can deregister them;
    # a few seconds do on one loopback node, and the delete test waits that much less.
    start_head(cluster, env={"MLOPS_API_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": tracking_uri,
                             "MLOPS_DATA_URL": str(data), "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3"})
    try:
        platform = Cluster(cluster, tracking_uri, _one_replica_each(dep.load_serve_config()), phishing, flows,
                           str(data / "predictions"))
        platform.deploy(phishing, "1")
        platform.deploy(flows, "1")
        yield platform
    finally:
        end_test_head(cluster)


def _replicas(target: dep.ServeTarget) -> set[str]:
    details = dep.app_details(target) or {}
    return {r["replica_id"] for d in (details.get("deployments") or {}).values() for r in d.get("replicas") or []}


def test_each_data_set_answers_below_its_own_route_with_its_own_model(served: Cluster) -> None:
    apps = dep.serve_applications(served.phishing.target)["applications"]
    assert {name: app["route_prefix"] for name, app in apps.items()} == {"phishing": "/", FLOWS: f"/{FLOWS}"}
    assert all(app["status"] == "RUNNING" for app in apps.values())
    request_ids = {}
    with httpx.Client(timeout=30, trust_env=False) as client:
        for app, key in ((served.phishing, "phishing_probability"), (served.flows, "attack_probability")):
            records = app.records(20)
            response = app.predict(client, records)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model_version"] == "1"
            assert [p[key] for p in body["predictions"]] == app.expected("1", records)
            request_ids[app.target.app_name] = body["request_id"]
        # /model and /healthz of each: the flows app names its own features and version.
        status, model = dep.get_json(served.flows.target, "/model")
        assert status == 200 and model["version"] == "1" and set(model["features"]) == set(served.flows.spec.feature_names)
        assert dep.get_json(served.phishing.target, "/model")[1]["features"]["having_IP_Address"] == [-1, 1]
        assert dep.get_json(served.flows.target, "/healthz")[0] == 200
        # The other data set's records are refused by each application's own request model.
        refused = served.flows.predict(client, served.phishing.records(1))
        assert refused.status_code == 422, refused.text
    # Each application's answers go to its own data set's prediction log (and node-local spool).
    for app in (served.phishing, served.flows):
        log_url = app.env_vars.get("MLOPS_PREDICTION_LOG_URL") or served.phishing_log
        mine = request_ids[app.target.app_name]
        deadline, logged = time.monotonic() + 30, pd.DataFrame()
        while time.monotonic() < deadline and mine not in set(logged.get("request_id", [])):
            time.sleep(0.5)
            logged = read_prediction_log(log_url)
        assert mine in set(logged["request_id"]), app.target.app_name
        assert set(request_ids.values()) & set(logged["request_id"]) == {mine}
        assert set(app.spec.feature_names) <= set(logged.columns)


def test_a_new_version_of_one_data_set_leaves_the_other_serving_untouched(served: Cluster) -> None:
    phishing = served.phishing
    replicas, config = _replicas(phishing.target), (dep.app_details(phishing.target) or {})["deployed_app_config"]
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:  # phishing keeps answering while the flows application switches versions
        records = phishing.records(5)
        with httpx.Client(timeout=30, trust_env=False) as client:
            while not stop.is_set():
                response = phishing.predict(client, records)
                answers.append((response.status_code, response.json().get("model_version")))
                time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        result = served.deploy(served.flows, "2")
    finally:
        stop.set()
        worker.join(timeout=30)
    assert (result.live_version, result.replaced_version) == ("2", "1")
    assert result.endpoint == f"{served.cluster.serve_url}/{FLOWS}/predict"
    assert answers and set(answers) == {(200, "1")}
    assert dep.live_version(phishing.target) == "1" and dep.live_version(served.flows.target) == "2"
    assert _replicas(phishing.target) == replicas  # not one replica restarted
    assert (dep.app_details(phishing.target) or {})["deployed_app_config"] == config


def test_each_application_counts_its_own_requests_in_the_metrics(served: Cluster) -> None:
    with httpx.Client(timeout=30, trust_env=False) as client:
        for _ in range(3):
            assert served.flows.predict(client, served.flows.records(2)).status_code == 200
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray's metrics agent exports every few seconds
        text = httpx.get(served.cluster.metrics_url, timeout=10, trust_env=False).text
        if mon.parse_serving_metrics(text, application=FLOWS).requests >= 3:
            break
        time.sleep(2)
    every = mon.parse_serving_metrics(text, application=None).requests
    phishing = mon.parse_serving_metrics(text).requests  # the default: the phishing application's
    flows = mon.parse_serving_metrics(text, application=FLOWS).requests
    assert phishing > 0 and flows >= 3 and phishing + flows == every, [
        line for line in text.splitlines() if "mlops_serving_requests_total" in line]


def test_deleting_one_application_leaves_the_other_answering(served: Cluster) -> None:
    phishing = served.phishing
    replicas = _replicas(phishing.target)
    dep.delete_application(served.flows.target)
    assert set(dep.serve_applications(phishing.target)["applications"]) == {"phishing"}
    assert dep.app_details(served.flows.target) is None and dep.live_config(served.flows.target) is None
    with httpx.Client(timeout=30, trust_env=False) as client:
        records = phishing.records(10)
        response = phishing.predict(client, records)
        assert response.status_code == 200 and response.json()["model_version"] == "1"
        deadline = time.monotonic() + 30
        while True:  # the ingress drops the removed route a moment after the dashboard stops listing it
            gone = served.flows.predict(client, served.flows.records(1))
            if gone.status_code == 404 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert gone.status_code == 404, gone.text  # the path now falls to the app at /, which has no such route
    assert _replicas(phishing.target) == replicas

"""Against a real Ray Serve application on loopback, with models in a real MLflow SQLite registry.

One Ray head per module (2 cores: starting Ray is the expensive part). Two model versions are
trained on simulated data and registered; version 1 is deployed declaratively through the
dashboard REST API, version 2 is switched in under load, then rolled back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.registry import model_store
from mlops_assets.serving.config import ModelRef
from mlops_assets.serving.prediction_log import read_prediction_log
from mlops_assets.tools.ray_cluster import ClusterConfig, start_head
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster
from mlops_assets_tests.registry_support import register_simulated_versions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-token-0123456789"
MODEL_NAME = "phishing-classifier-test"
MAX_RECORDS = 50
MAX_BODY_BYTES = 60_000  # 50 records of 30 features are ~40 kB of JSON
ARGS = {"max_records": MAX_RECORDS, "max_body_bytes": MAX_BODY_BYTES, "log_flush_interval_s": 0.5,
        "predict_timeout_s": 10}


@dataclass
class Platform:
    spec: DatasetSpec
    tracking_uri: str
    target: dep.ServeTarget
    cluster: ClusterConfig
    log_url: str
    env_vars: dict[str, str]
    models: dict[str, CatBoostClassifier]  # version -> in-memory (offline) model
    sample: pd.DataFrame
    answered: dict[str, str] = field(default_factory=dict)  # request_id -> model_version
    lock: threading.Lock = field(default_factory=threading.Lock)

    def records(self, n: int = 20, offset: int = 0) -> list[dict[str, int]]:
        return dep.sample_records(self.sample.iloc[offset:], self.spec, n)

    def expected(self, version: str, records: list[dict[str, int]]) -> list[float]:
        return dep.offline_probabilities(self.models[version], records, self.spec)

    def post(self, client: httpx.Client, body: Any = None, *, token: str | None = TOKEN,
             content: bytes | None = None, content_type: str = "application/json") -> httpx.Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = content if content is not None else json.dumps(body).encode()
        response = client.post(self.target.endpoint, content=data, headers=headers)
        if response.status_code == 200:
            payload = response.json()
            with self.lock:
                self.answered[payload["request_id"]] = payload["model_version"]
        return response

    def deploy(self, version: str) -> dep.DeployResult:
        records = self.records(32, offset=100)
        return dep.deploy_version(
            target=self.target, tracking_uri=self.tracking_uri, spec=self.spec, version=version,
            records=records, expected=self.expected(version, records), model_name=MODEL_NAME,
            env_vars=self.env_vars, args=ARGS,
        )


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("serving")
    data = root / "data"
    spec = default_spec()
    # Two versions from different data and seeds, so their answers differ.
    tracking_uri, client, models = register_simulated_versions(
        data, spec, model_name=MODEL_NAME, experiment="serving-test", seeds_and_iterations=((1, 30), (2, 60)),
        n_rows=1500)
    model_store.promote_to_champion(client, MODEL_NAME, "1")

    cluster = isolated_cluster(root)
    target = dep.ServeTarget(cluster.dashboard_url, cluster.serve_url, token=TOKEN)
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_DATA_URL": str(data)}
    start_head(cluster, env={"MLOPS_API_TOKEN": TOKEN, **env_vars})
    try:
        sample = simulate_records(spec, SimulationConfig(n_rows=400, seed=99))
        p = Platform(spec, tracking_uri, target, cluster, str(data / "predictions"), env_vars, models, sample)
        p.deploy("1")
        yield p
    finally:
        end_test_head(cluster)


def test_first_deploy_serves_the_champion_and_reports_it(platform: Platform) -> None:
    status, body = dep.get_json(platform.target, "/model")
    assert status == 200
    assert body["version"] == "1"
    assert body["feature_version"] == "fv-1" and body["trained_at"].startswith("2026-01-01")
    assert body["run_id"] and body["sha256"]
    assert body["features"]["having_IP_Address"] == [-1, 1]
    assert dep.get_json(platform.target, "/healthz") == (200, {"status": "ok", "model_version": "1"})


def test_predictions_over_http_equal_the_offline_model(platform: Platform) -> None:
    records = platform.records(MAX_RECORDS)
    with httpx.Client(timeout=30) as client:
        response = platform.post(client, {"records": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1"
    got = [p["phishing_probability"] for p in body["predictions"]]
    expected = platform.expected("1", records)
    assert got == expected  # JSON floats round-trip exactly: same file, same answers
    labels = [p["label"] for p in body["predictions"]]
    assert labels == [-1 if p >= 0.5 else 1 for p in expected]
    assert {p["label_name"] for p in body["predictions"]} <= {"phishing", "legitimate"}


def _record(platform: Platform, **changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = dict(platform.records(1)[0])
    for key, value in changes.items():
        if value is ...:
            record.pop(key)
        else:
            record[key] = value
    return record


BAD_REQUESTS = [
    # (name, how to build the request, status, words the message must contain)
    ("non_json", lambda p: {"content": b"{records: nope"}, 400, ["not valid JSON"]),
    ("wrong_content_type", lambda p: {"body": {"records": p.records(1)}, "content_type": "text/plain"}, 415,
     ["Content-Type", "application/json"]),
    ("missing_field", lambda p: {"body": {"records": [_record(p, URL_Length=...)]}}, 422,
     ["records[0].URL_Length", "missing", "[-1, 0, 1]"]),
    ("extra_field", lambda p: {"body": {"records": [_record(p, favicon_colour=1)]}}, 422,
     ["records[0].favicon_colour", "unknown field"]),
    ("wrong_type", lambda p: {"body": {"records": [_record(p, SSLfinal_State="1")]}}, 422,
     ["records[0].SSLfinal_State", "integer", "[-1, 0, 1]"]),
    ("bool_is_not_int", lambda p: {"body": {"records": [_record(p, having_IP_Address=True)]}}, 422,
     ["records[0].having_IP_Address", "integer"]),
    ("out_of_domain", lambda p: {"body": {"records": [_record(p, having_IP_Address=0)]}}, 422,
     ["records[0].having_IP_Address", "value 0 is not allowed", "[-1, 1]"]),
    ("empty_batch", lambda p: {"body": {"records": []}}, 422, ["records", "empty"]),
    ("not_an_object", lambda p: {"body": [1, 2]}, 422, ["JSON object"]),
    ("too_many_records", lambda p: {"body": {"records": [_record(p)] * (MAX_RECORDS + 1)}}, 422,
     ["too many records", str(MAX_RECORDS)]),
    ("oversized_body", lambda p: {"content": b'{"records": [' + b" " * (MAX_BODY_BYTES + 10) + b"]}"}, 413,
     ["larger than the limit", str(MAX_BODY_BYTES)]),
    ("no_token", lambda p: {"body": {"records": p.records(1)}, "token": None}, 401, ["missing bearer token"]),
    ("wrong_token", lambda p: {"body": {"records": p.records(1)}, "token": "not-the-token"}, 401,
     ["invalid bearer token"]),
]


@pytest.mark.parametrize(("name", "build", "status", "words"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_each_bad_request_gets_its_4xx_naming_the_problem(
    platform: Platform, name: str, build: Any, status: int, words: list[str]
) -> None:
    with httpx.Client(timeout=30) as client:
        response = platform.post(client, **build(platform))
        assert response.status_code == status, response.text
        body = response.json()
        text = json.dumps(body)
        for word in words:
            assert word in text, f"{word!r} not in {text}"
        # Nothing internal leaks: no traceback, no file path of the server.
        assert "Traceback" not in text and "/site-packages/" not in text and ".py" not in text
        if status == 401:
            assert response.headers.get("www-authenticate") == "Bearer"
        assert client.get(f"{platform.target.serve_url}/healthz").status_code == 200


def test_unknown_route_and_method_are_json_without_internals(platform: Platform) -> None:
    with httpx.Client(timeout=30) as client:
        missing = client.get(f"{platform.target.serve_url}/nope")
        wrong_method = client.get(platform.target.endpoint)
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert wrong_method.status_code == 405


def test_version_switch_under_concurrent_load_drops_nothing(platform: Platform) -> None:
    records = platform.records(10, offset=200)
    expected = {v: platform.expected(v, records) for v in ("1", "2")}
    assert expected["1"] != expected["2"]  # otherwise the test could not tell the versions apart
    results: list[tuple[float, int, str | None, bool]] = []
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    response = platform.post(client, {"records": records})
                except httpx.HTTPError as exc:
                    results.append((time.monotonic(), 0, type(exc).__name__, False))
                    continue
                version = response.json().get("model_version") if response.status_code == 200 else None
                probs = [p["phishing_probability"] for p in response.json().get("predictions", [])] \
                    if response.status_code == 200 else []
                # Each answer must come wholly from the version it names.
                consistent = version in expected and probs == expected[version]
                results.append((time.monotonic(), response.status_code, version, consistent))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    result = platform.deploy("2")
    switched_at = time.monotonic()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(60)

    assert result.live_version == "2" and result.replaced_version == "1"
    statuses = [r[1] for r in results]
    failed = [r for r in results if r[1] != 200]
    assert len(results) > 50, f"too few requests to show anything: {len(results)}"
    assert failed == [], f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    assert all(r[3] for r in results), "an answer did not match the offline model of the version it named"
    versions = [r[2] for r in results]
    assert "1" in versions and "2" in versions
    after = [r[2] for r in results if r[0] > switched_at]
    assert after and set(after) == {"2"}
    print(f"switch under load: {len(statuses)} requests, 0 failed, {versions.count('1')} by v1, "
          f"{versions.count('2')} by v2, switch took {result.seconds:.1f}s")


def test_the_ingress_answers_the_champion_itself(platform: Platform) -> None:
    """`ingress_scores`, the shipped default every test above ran on (the switch under load
    included): the ingress loads the champion its user_config names and answers POST /predict
    itself, so its own request counter (it counts only the /predict it answers) holds most answers."""

    def ingress_predict_answers(text: str) -> float:
        total = 0.0
        for line in text.splitlines():  # Ray may prefix the name; Serve sets the deployment tag
            if "mlops_serving_requests_total{" in line and not line.startswith("#") \
                    and 'deployment="PredictionIngress"' in line and 'status="200"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    answered = len(platform.answered)
    assert answered > 50
    deadline, counted = time.monotonic() + 60, 0.0
    while time.monotonic() < deadline and counted < answered / 2:
        try:
            counted = ingress_predict_answers(httpx.get(platform.cluster.metrics_url, timeout=10).text)
        except httpx.HTTPError:
            counted = 0.0
        time.sleep(2)
    assert counted >= answered / 2, f"the ingress counted {counted} of {answered} answers as its own"


def test_a_version_that_cannot_load_leaves_the_live_one_serving(platform: Platform) -> None:
    live = dep.live_version(platform.target)
    records = platform.records(8)
    with pytest.raises(dep.DeploymentError, match="load check"):
        dep.deploy_version(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                           version="999", records=records, expected=[0.5] * len(records),
                           model_name=MODEL_NAME, env_vars=platform.env_vars, args=ARGS)
    assert dep.live_version(platform.target) == live

    # Past the in-process check (a config submitted by hand): the replica keeps its model.
    previous = dep.live_config(platform.target)
    assert previous is not None
    bad = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(model_name=MODEL_NAME, version="999"),
                                  env_vars=platform.env_vars, http_port=platform.cluster.serve_http_port, args=ARGS)
    dep.submit(platform.target, bad)
    with pytest.raises(dep.DeploymentError, match="could not switch to version 999"):
        dep.wait_until_serving(platform.target, "999", timeout_s=60)
    # A stable code and one line, from the real registry's error; the exception stays in the replica log.
    status, body = dep.get_json(platform.target, "/model")
    assert status == 200 and body["last_load_error"]["code"] == "model_version_not_found", body
    assert "version 999" in body["last_load_error"]["message"]
    shown = json.dumps(body)
    assert all(w not in shown for w in ("Traceback", "sqlite", "RESOURCE_DOES_NOT_EXIST", "Exception"))
    with httpx.Client(timeout=30) as client:
        response = platform.post(client, {"records": records})
    assert response.status_code == 200 and response.json()["model_version"] == live
    dep.submit(platform.target, previous)
    dep.wait_until_serving(platform.target, str(live), timeout_s=60)


def test_a_candidate_that_answers_differently_is_not_deployed(platform: Platform) -> None:
    live = dep.live_version(platform.target)
    other = "1" if live == "2" else "2"
    records = platform.records(8)
    wrong = [p + 0.01 for p in platform.expected(other, records)]
    with pytest.raises(dep.DeploymentError, match="differs from the offline model"):
        dep.deploy_version(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                           version=other, records=records, expected=wrong, model_name=MODEL_NAME,
                           env_vars=platform.env_vars, args=ARGS)
    assert dep.live_version(platform.target) == live


def test_rollback_returns_the_previous_version(platform: Platform) -> None:
    client = MlflowClient(tracking_uri=platform.tracking_uri)
    model_store.promote_to_champion(client, MODEL_NAME, "2")  # what the registry asset does after a pass
    if dep.live_version(platform.target) != "2":
        platform.deploy("2")
    result = dep.rollback(target=platform.target, tracking_uri=platform.tracking_uri, spec=platform.spec,
                          model_name=MODEL_NAME, records=platform.records(16), env_vars=platform.env_vars, args=ARGS)
    assert result.live_version == "1" and result.replaced_version == "2"
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION) == "1"
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_PREVIOUS_CHAMPION) == "2"
    records = platform.records(5)
    with httpx.Client(timeout=30) as http:
        response = platform.post(http, {"records": records})
    assert response.json()["model_version"] == "1"
    assert [p["phishing_probability"] for p in response.json()["predictions"]] == platform.expected("1", records)


@pytest.fixture()
def serve_config_file(platform: Platform, tmp_path: Path) -> str:
    """deploy/serve_config.yaml with this module's args, as MLOPS_SERVE_CONFIG would point to."""
    import yaml

    config = dep.load_serve_config()
    config["applications"][0]["args"] = dict(ARGS)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _resources(platform: Platform, serve_config_file: str) -> dict[str, Any]:
    from mlops_assets.defs.resources import MlflowResource, PlatformResource, RayServeResource

    return {
        "platform": PlatformResource.at(platform.env_vars["MLOPS_DATA_URL"]),
        "mlflow": MlflowResource(tracking_uri=platform.tracking_uri, model_name=MODEL_NAME),
        "ray_serve": RayServeResource(dashboard_url=platform.target.dashboard_url, serve_url=platform.target.serve_url,
                                      api_token=TOKEN, serve_config_path=serve_config_file),
    }


def test_model_deployment_asset_deploys_the_champion(platform: Platform, serve_config_file: str) -> None:
    from dataclasses import replace

    import dagster as dg

    from mlops_assets.core.records import Registration
    from mlops_assets.defs.deployment.assets import model_deployment, serving_health

    client = MlflowClient(tracking_uri=platform.tracking_uri)
    model_store.promote_to_champion(client, MODEL_NAME, "2")
    live_before = dep.live_version(platform.target)
    split = platform.sample.assign(split="test")
    registered = Registration(model_name=MODEL_NAME, version="2", champion_version="2")
    resources = _resources(platform, serve_config_file)
    with dg.build_asset_context() as context:
        result = model_deployment(context=context, registered_model=registered, train_test_split=split, **resources)
    assert result.value.live_version == "2"
    assert result.metadata["live_version"].value == "2"
    assert result.metadata["replaced_version"].value == (live_before if live_before != "2" else "none")
    assert result.metadata["endpoint"].url == platform.target.endpoint
    check = serving_health(ray_serve=resources["ray_serve"], model_deployment=result.value)
    assert check.passed

    with pytest.raises(dg.Failure, match="no champion"), dg.build_asset_context() as context:
        model_deployment(context=context, train_test_split=split, **resources,
                         registered_model=replace(registered, champion_version=None))


def test_cli_rollback_then_rollback_job(platform: Platform, serve_config_file: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlops_assets.defs.deployment.assets import rollback_job
    from mlops_assets.tools.cli import main

    client = MlflowClient(tracking_uri=platform.tracking_uri)
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION) == "2"
    for key, value in platform.env_vars.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLOPS_API_TOKEN", TOKEN)
    monkeypatch.setenv("MLOPS_SERVE_CONFIG", serve_config_file)
    assert main(["rollback", "--model-name", MODEL_NAME, "--dashboard-url", platform.target.dashboard_url,
                 "--endpoint", platform.target.serve_url]) == 0
    assert dep.live_version(platform.target) == "1"
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION) == "1"

    result = rollback_job.execute_in_process(resources=_resources(platform, serve_config_file))
    assert result.success
    assert dep.live_version(platform.target) == "2"
    assert model_store.alias_version(client, MODEL_NAME, c.ALIAS_CHAMPION) == "2"


def test_sample_request_answers_and_prints_the_curl_command(platform: Platform, monkeypatch, capsys) -> None:
    from mlops_assets.tools.sample_request import main

    monkeypatch.setenv("MLOPS_API_TOKEN", TOKEN)
    assert main(["--endpoint", platform.target.serve_url]) == 0
    out = capsys.readouterr().out
    assert "-> 200" in out and '"model_version"' in out and "curl -sS -X POST" in out and TOKEN not in out


def test_metrics_are_exported_for_prometheus(platform: Platform) -> None:
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(platform.cluster.metrics_url, timeout=10).text
        except httpx.HTTPError:
            text = ""
        if "mlops_serving_predictions_total" in text and "mlops_serving_errors_total" in text:
            break
        time.sleep(2)
    for name in ("mlops_serving_requests_total", "mlops_serving_errors_total", "mlops_serving_request_latency_ms",
                 "mlops_serving_predictions_total", "mlops_serving_model_info"):
        assert name in text, f"{name} not exported at {platform.cluster.metrics_url}"
    assert 'label="phishing"' in text and 'status="422"' in text


def test_the_prediction_log_holds_every_answered_request(platform: Platform) -> None:
    assert len(platform.answered) > 50
    deadline = time.monotonic() + 30
    logged = pd.DataFrame()
    while time.monotonic() < deadline:
        logged = read_prediction_log(platform.log_url)
        if not logged.empty and set(platform.answered) <= set(logged["request_id"]):
            break
        time.sleep(0.5)
    missing = set(platform.answered) - set(logged["request_id"])
    assert not missing, f"{len(missing)} of {len(platform.answered)} answered requests are not in the log"
    by_request = logged.groupby("request_id")["model_version"].first()
    assert all(by_request[r] == v for r, v in platform.answered.items())
    assert set(platform.spec.feature_names) <= set(logged.columns)
    assert logged["probability"].between(0, 1).all() and np.isin(logged["label"], [-1, 1]).all()
    print(f"prediction log: {len(platform.answered)} answered requests, {len(logged)} rows, all present")


def test_prediction_log_parts_are_partitioned_by_the_hour_of_their_rows(platform: Platform) -> None:
    # A flush may be mid-write (`*.parquet.tmp`) right now; readers only ever see renamed parts.
    parts = list(Path(platform.log_url).glob("date=*/hour=*/part-*.parquet"))
    assert parts, f"no part under date=*/hour=* in {platform.log_url}"
    for part in parts:
        stamps = pd.to_datetime(pd.read_parquet(part)["logged_at"], utc=True)
        hours = {f"date={t:%Y-%m-%d}/hour={t:%H}" for t in stamps}
        assert hours == {f"{part.parent.parent.name}/{part.parent.name}"}, part


def test_a_full_queue_answers_503_quickly_and_never_hangs(platform: Platform) -> None:
    """Last in the module: it redeploys with a scoring queue of one to make overload certain, the
    ingress forwarding every request (`ingress_scores` off; with it on the ingress's own bound, 256 in
    flight and 256 queued per replica, answers 503 the same way, Serve's backpressure)."""
    live = dep.live_version(platform.target)
    config = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(model_name=MODEL_NAME, version=live),
                                     env_vars=platform.env_vars, http_port=platform.cluster.serve_http_port,
                                     args={**ARGS, "ingress_scores": False})
    deployment = config["applications"][0]["deployments"][0]
    deployment.update(max_ongoing_requests=1, max_queued_requests=1)
    dep.submit(platform.target, config)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        details = dep.app_details(platform.target) or {}
        settings = (details.get("deployments", {}).get("PredictionService", {}).get("deployment_config") or {})
        if details.get("status") == "RUNNING" and settings.get("max_queued_requests") == 1:
            break
        time.sleep(0.5)
    records = platform.records(MAX_RECORDS)
    outcomes: list[tuple[int, str, float]] = []
    barrier = threading.Barrier(24)

    def one() -> None:
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            started = time.monotonic()
            response = platform.post(client, {"records": records})
            outcomes.append((response.status_code, response.text, time.monotonic() - started))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = [o[0] for o in outcomes]
    assert len(outcomes) == 24 and set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    rejected = [o for o in outcomes if o[0] == 503]
    assert all("backpressure" in o[1] for o in rejected)
    assert max(o[2] for o in rejected) < 10  # rejected fast, not after a hang


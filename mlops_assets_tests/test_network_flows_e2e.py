"""The second packaged data set end to end: network flows with string protocol/service/flag
columns, numeric bytes, durations, counts and rates, and labels normal/attack, chosen by
configuration only (MLOPS_DATASET_SPEC=network_flows).

A raw CSV in the landing folder -> ingestion -> the retraining job (validation, features,
CatBoost with categorical features, gate, registry, deployment on a real Ray Serve endpoint,
reference profile) -> predictions over HTTP, with bad values refused naming field and rule ->
drifted traffic: a drift report with KS (numeric) and Hellinger (categorical) statistics ->
the drift sensor asks for one retraining run, which learns from the labelled production rows.
One Ray head for the module (the loop tests' helpers), CatBoost with few iterations.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack

import dagster as dg
import httpx
import pytest
import yaml

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.monitoring import drift
from mlops_assets.settings import load_settings
from mlops_assets.tools import traffic
from mlops_assets.tools.ray_cluster import start_head, stop_head
from mlops_assets.tools.simulator import SimulationConfig, json_records, simulate_records, write_batch
from mlops_assets_tests.ray_support import delete_app_quietly, isolated_cluster
from mlops_assets_tests.settings_support import platform_definitions
from mlops_assets_tests.test_loop_e2e import ARGS, FAST, TOKEN, Loop, Webhook, _check, _meta, past_hour

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIFT = {"conn_rate": 0.6, "src_bytes": 0.6, "flag": 0.5}


@pytest.fixture(scope="module")
def flows_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    root = tmp_path_factory.mktemp("flows")
    data = root / "data"
    (data / "mlflow").mkdir(parents=True)
    tracking_uri = f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    cluster = isolated_cluster(root)
    config = dep.load_serve_config()
    config["applications"][0]["args"] = dict(ARGS)
    serve_config = root / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    webhook = Webhook()
    env = {
        "MLOPS_DATA_URL": str(data), "MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_API_TOKEN": TOKEN,
        "MLOPS_MLFLOW_ARTIFACT_ROOT": (data / "mlflow" / "artifacts").as_uri(),
        "MLOPS_RAY_DASHBOARD_URL": cluster.dashboard_url, "MLOPS_SERVE_URL": cluster.serve_url,
        "MLOPS_METRICS_URL": cluster.metrics_url, "MLOPS_SERVE_CONFIG": str(serve_config),
        "MLOPS_ALERT_WEBHOOK_URL": webhook.url, "MLOPS_DATASET_SPEC": "network_flows",
    }
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for key in ("MLOPS_LANDING_URL", "MLOPS_PREDICTION_LOG_URL", "MLOPS_LABELS_URL", "MLFLOW_UI_URL",
                    "MLOPS_MODEL_NAME", "MLOPS_MLFLOW_EXPERIMENT"):
            patch.delenv(key, raising=False)
        for key, value in env.items():
            patch.setenv(key, value)
        start_head(cluster, env={"MLOPS_API_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": tracking_uri,
                                 "MLOPS_DATA_URL": str(data), "MLOPS_DATASET_SPEC": "network_flows"})
        stack.callback(stop_head, cluster)
        target = dep.target_from_settings(load_settings())
        stack.callback(delete_app_quietly, target)
        stack.callback(webhook.server.shutdown)
        instance = stack.enter_context(dg.instance_for_test())
        defs = platform_definitions()
        yield Loop(data, load_spec("network_flows"), instance, defs, target, tracking_uri, webhook)


def _post(loop: Loop, records: list[dict]) -> httpx.Response:
    return httpx.post(loop.target.endpoint, json={"records": records}, timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {TOKEN}"})


def test_network_flows_from_a_raw_csv_to_a_served_model_to_drift_to_retraining(flows_loop: Loop) -> None:
    loop, spec = flows_loop, flows_loop.spec
    # 1. A raw CSV of flows in the landing folder, through every asset to the endpoint.
    raw = simulate_records(spec, SimulationConfig(n_rows=2000, seed=42))
    write_batch(raw, str(loop.data / "raw"), name="flows.csv")
    loop.ingest()
    [batch] = ingestion.accepted_batches(str(loop.data / "batches"))
    assert batch.rows == 2000
    first = loop.run("retraining", FAST)
    assert first.success, [e.message for e in first.all_events if e.is_failure]
    assert loop.champion() == "1" and dep.live_version(loop.target) == "1"
    evaluation = _meta(first, "model_evaluation")
    assert evaluation["roc_auc"] > 0.9

    # 2. Predictions over HTTP: labels are the spec's strings, the probability is the attack's.
    records = json_records(raw.head(5), spec)
    answer = _post(loop, records)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert {p["label"] for p in predictions} <= {"normal", "attack"} and "attack_probability" in predictions[0]

    # Each bad value kind is refused with a 4xx naming the field and the rule, never a trace.
    bad = {
        "src_bytes": ("12kB", "expected an integer (not a string, float or boolean); must be an integer >= 0"),
        "packets": (0, "value 0 is below min: must be an integer >= 1"),
        "service": ("gopher", "value 'gopher' is not allowed; allowed values:"),
        "protocol": (None, "a value is required (null is not allowed)"),
    }
    for field, (value, words) in bad.items():
        refused = _post(loop, [{**records[0], field: value}])
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]
        assert f"records[0].{field}: " in message and words in message and "Traceback" not in refused.text

    # 3. Drifted traffic, filed as a past hour's: the drift report scores numbers and categories.
    drift_hour = past_hour(2)
    drifted = loop.send(400, seed=102, drift=DRIFT)
    loop.wait_logged([drifted])
    loop.file_traffic_in(drift_hour, [drifted])
    traffic.write_labels(traffic.labels_frame(drifted), str(loop.data / "labels"))
    monitored = loop.monitor(drift_hour)
    assert monitored.success
    report = _meta(monitored, "drift_report")
    assert report["drift_detected"] is True and not _check(monitored, "no_drift").passed
    assert set(DRIFT) <= set(report["drifted_features"].split(", "))
    [path] = list((loop.data / "reports" / "drift").glob("*.json"))
    scores = json.loads(path.read_text())["features"]
    assert {scores[n]["method"] for n in spec.numeric_features} == {drift.METHOD_CONTINUOUS}
    assert {scores[n]["method"] for n in spec.categorical_features} == {drift.METHOD_CATEGORICAL}
    assert scores["conn_rate"]["statistic"] > 0.1 and scores["flag"]["statistic"] > 0.1
    assert scores["protocol"]["drift"] is False

    # 4. One retraining run for the event; it learns from the labelled production flows.
    requests, _, _ = loop.tick("drift_retraining_sensor", None)
    [request] = requests
    assert request.run_key == report["event_key"]
    retrained = loop.run("retraining", FAST, tags={**request.tags, "dagster/run_key": str(request.run_key)})
    assert _meta(retrained, "labelled_production_batch")["rows"] == 400
    assert sum(b.rows for b in ingestion.accepted_batches(str(loop.data / "batches"))) == 2400
    gate = _check(retrained, "promotion_gate")
    expected = "2" if gate.passed else "1"
    assert loop.champion() == expected and dep.live_version(loop.target) == expected
    print(f"flows: v1 roc_auc {evaluation['roc_auc']:.4f}; drifted {report['drifted_features']}; "
          f"retrained gate passed={gate.passed}")

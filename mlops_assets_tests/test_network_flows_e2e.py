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

import dagster as dg
import httpx
import pytest

from mlops_assets.core.dataset_spec import load_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.monitoring import drift
from mlops_assets.tools import traffic
from mlops_assets.tools.simulator import SimulationConfig, json_records, simulate_records, write_batch
from mlops_assets_tests.e2e_support import FAST, check_named, metadata_of, past_hour, platform_on_head
from mlops_assets_tests.settings_support import platform_definitions
from mlops_assets_tests.test_loop_e2e import TOKEN, Loop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIFT = {"conn_rate": 0.6, "src_bytes": 0.6, "flag": 0.5}


@pytest.fixture(scope="module")
def flows_loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    with (platform_on_head(tmp_path_factory.mktemp("flows"), TOKEN, env={"MLOPS_DATASET_SPEC": "network_flows"})
          as head, dg.instance_for_test() as instance):
        yield Loop(head.data, load_spec("network_flows"), instance, platform_definitions(), head.target,
                   head.tracking_uri, head.webhook)


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
    evaluation = metadata_of(first, "model_evaluation")
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
    report = metadata_of(monitored, "drift_report")
    assert report["drift_detected"] is True and not check_named(monitored, "no_drift").passed
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
    assert metadata_of(retrained, "labelled_production_batch")["rows"] == 400
    assert sum(b.rows for b in ingestion.accepted_batches(str(loop.data / "batches"))) == 2400
    gate = check_named(retrained, "promotion_gate")
    expected = "2" if gate.passed else "1"
    assert loop.champion() == expected and dep.live_version(loop.target) == expected
    print(f"flows: v1 roc_auc {evaluation['roc_auc']:.4f}; drifted {report['drifted_features']}; "
          f"retrained gate passed={gate.passed}")

"""The whole loop on one machine: a real Ray Serve endpoint on loopback, a real Dagster instance,
MLflow on SQLite, the platform's own Definitions and resources (configured by environment).

Raw data -> retraining job (train, gate, register, deploy, reference profile) -> normal traffic:
no drift -> drifted traffic with delayed labels: the drift check fails and the drift sensor asks
for exactly one retraining run, none more on later ticks -> that run learns from the labelled
production records and goes through the gate -> a bad version is deployed, the watch sees its
predictions move, requests the rollback job, which restores the previous version, and alerts.
One Ray head for the module; CatBoost runs with few iterations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.monitoring import live as mon
from mlops_assets.registry import model_store
from mlops_assets.settings import load_settings
from mlops_assets.tools import traffic
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets_tests.e2e_support import (
    FAST,
    Webhook,
    check_named,
    hour_key,
    ingest_landed,
    metadata_of,
    past_hour,
    platform_on_head,
)
from mlops_assets_tests.settings_support import platform_definitions, platform_resources

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "loop-test-token-0123456789"
WINDOW_S = 10  # monitoring windows of 10 s, so each traffic phase gets a window of its own
MONITOR = {"ops": {"production_profiles": {"config": {"window": f"{WINDOW_S}s"}}}}
DRIFT = {"SSLfinal_State": 0.6, "URL_of_Anchor": 0.6, "having_Sub_Domain": 0.6, "web_traffic": 0.6,
         "Prefix_Suffix": 0.6}


@dataclass
class Loop:
    data: Path
    spec: DatasetSpec
    instance: dg.DagsterInstance
    defs: dg.Definitions
    target: dep.ServeTarget
    tracking_uri: str
    webhook: Webhook

    def job(self, name: str) -> dg.JobDefinition:
        return self.defs.resolve_job_def(name)

    def run(self, name: str, run_config: dict | None = None, tags: dict | None = None) -> dg.ExecuteInProcessResult:
        return self.job(name).execute_in_process(instance=self.instance, run_config=run_config, tags=tags,
                                                 raise_on_error=False)

    def ingest(self) -> None:
        """Each landed file as its raw_batches partition (what raw_files_sensor's runs do)."""
        ingest_landed(self.instance, self.defs, self.data / "raw")

    def monitor(self, hour: datetime) -> dg.ExecuteInProcessResult:
        """The monitoring job for one hourly window (its partition), as the schedule runs the last complete hour."""
        return self.job("monitoring").execute_in_process(instance=self.instance, partition_key=hour_key(hour),
                                                         raise_on_error=False)

    def file_traffic_in(self, hour: datetime, results: list[traffic.TrafficResult]) -> None:
        """Move these requests' logged rows into a past, complete hour (its folder, its times, in order).

        Monitoring windows are hours and only complete ones exist as partitions: a test cannot wait
        for an hour to pass, so each traffic phase is filed as one past hour's traffic.
        """
        from mlops_assets.serving.prediction_log import write_part

        ids = {a["request_id"] for r in results for a in r.answered}
        root = self.data / "predictions"
        moved = []
        for part in sorted(root.rglob("*.parquet")):
            frame = pd.read_parquet(part)
            mine = frame["request_id"].isin(ids)
            if not mine.any():
                continue
            moved.append(frame[mine])
            if mine.all():
                part.unlink()
            else:
                frame[~mine].to_parquet(part, index=False)
        rows = pd.concat(moved, ignore_index=True).sort_values("logged_at", kind="stable")
        offset = (rows["logged_at"] - rows["logged_at"].min()).clip(upper=pd.Timedelta(minutes=59))
        rows["logged_at"] = pd.Timestamp(hour) + offset
        write_part(rows.to_dict("records"), str(root), f"part-filed-{hour_key(hour).replace(':', '')}.parquet")

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def champion(self) -> str | None:
        return model_store.alias_version(self.client(), c.REGISTERED_MODEL_NAME, c.ALIAS_CHAMPION)

    def send(self, records: int, seed: int, drift: dict | None = None, batch_size: int = 50) -> traffic.TrafficResult:
        config = traffic.TrafficConfig(endpoint=self.target.endpoint, token=TOKEN, records=records,
                                       batch_size=batch_size, rate=40, concurrency=2, max_duration_s=60, seed=seed,
                                       drift=drift or {})
        result = traffic.send_traffic(self.spec, config)
        assert result.records_answered == records, result.summary()
        return result

    def wait_logged(self, results: list[traffic.TrafficResult], timeout_s: float = 30) -> pd.DataFrame:
        wanted = {(a["request_id"], a["record_index"]) for r in results for a in r.answered}
        deadline = time.monotonic() + timeout_s
        while True:
            log = mon.read_prediction_log(str(self.data / "predictions"))
            have = set(zip(log.get(mon.REQUEST_ID, []), log.get(mon.RECORD_INDEX, []), strict=False))
            if wanted <= have:
                return log
            assert time.monotonic() < deadline, f"{len(wanted - have)} answered records not in the log"
            time.sleep(0.5)

    def tick(self, sensor_name: str, cursor: str | None, **monitoring: object,
             ) -> tuple[list[dg.RunRequest], str | None, str]:
        """One evaluation of a sensor on the real instance; `monitoring` overrides MonitoringResource fields."""
        from mlops_assets.defs.resources import MonitoringResource

        sensor = self.defs.get_sensor_def(sensor_name)
        context = dg.build_sensor_context(instance=self.instance, cursor=cursor, resources={
            **platform_resources(), "monitoring": MonitoringResource.from_settings(load_settings(), **monitoring)})
        result = sensor(context)
        requests = list(result.run_requests or []) if isinstance(result, dg.SensorResult) else []
        skip = result.skip_reason.skip_message if isinstance(result, dg.SensorResult) and result.skip_reason else ""
        return requests, (result.cursor if isinstance(result, dg.SensorResult) else cursor), skip


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    with platform_on_head(tmp_path_factory.mktemp("loop"), TOKEN) as head, dg.instance_for_test() as instance:
        defs = platform_definitions()  # built from the environment just set, as `make up` loads them
        yield Loop(head.data, default_spec(), instance, defs, head.target, head.tracking_uri, head.webhook)


def test_the_loop_from_raw_data_to_drift_to_one_retraining_through_the_gate(loop: Loop) -> None:
    started = time.monotonic()
    # 1. The first model: raw data through the same retraining job the sensor uses.
    write_batch(simulate_records(loop.spec, SimulationConfig(n_rows=2000, seed=42)), str(loop.data / "raw"),
                name="seed.csv")
    loop.ingest()
    first = loop.run("retraining", FAST)
    assert first.success
    assert loop.champion() == "1" and dep.live_version(loop.target) == "1"
    assert (loop.data / "profiles" / "reference" / "1" / "profile.bin").exists()

    # 2. Normal traffic (filed as one past hour's): no drift, no retraining.
    normal_hour, drift_hour = past_hour(3), past_hour(2)
    normal = loop.send(600, seed=101)
    loop.wait_logged([normal])
    loop.file_traffic_in(normal_hour, [normal])
    monitored = loop.monitor(normal_hour)
    assert monitored.success
    ok = metadata_of(monitored, "drift_report")
    assert ok["judged"] is True and ok["serving_version"] == "1" and ok["serving_source"] == "endpoint"
    assert ok["rows"] == 600 and check_named(monitored, "no_drift").passed and ok["n_drifted_features"] == 0
    requests, cursor, why = loop.tick("drift_retraining_sensor", None)
    assert requests == [] and why == "no drift"

    # 3. Drifted traffic in the next hour, and later the true labels of everything sent.
    drifted = loop.send(600, seed=102, drift=DRIFT)
    loop.wait_logged([normal, drifted])
    loop.file_traffic_in(drift_hour, [drifted])
    labels = traffic.labels_frame(normal)
    labels = pd.concat([labels, traffic.labels_frame(drifted)], ignore_index=True)
    traffic.write_labels(labels, str(loop.data / "labels"))
    monitored = loop.monitor(drift_hour)
    assert monitored.success
    bad = metadata_of(monitored, "drift_report")
    assert not check_named(monitored, "no_drift").passed and bad["drift_detected"] is True
    assert set(DRIFT) <= set(bad["drifted_features"].split(", ")) and bad["rows"] == 600
    live = metadata_of(monitored, "online_performance")  # the window's predictions, with their labels
    assert live["n_matched"] == 600 and live["serving_version"] == "1" and live["window"] == f"{drift_hour:%Y-%m-%dT%H}:00:00Z"

    # Exactly one retraining request for the event, none on the next ticks or a re-run report.
    requests, cursor, _ = loop.tick("drift_retraining_sensor", cursor)
    assert [r.run_key for r in requests] == [bad["event_key"]]
    [request] = requests
    for _ in range(2):
        again, cursor, why = loop.tick("drift_retraining_sensor", cursor)
        assert again == [] and "already handled" in why
    assert loop.monitor(drift_hour).success
    again, cursor, why = loop.tick("drift_retraining_sensor", cursor)
    assert again == []

    # 4. The requested run: labelled production records join the raw data; the gate decides.
    retrained = loop.run("retraining", FAST, tags={**request.tags, "dagster/run_key": str(request.run_key)})
    batch_meta = metadata_of(retrained, "labelled_production_batch")
    assert batch_meta["rows"] == 1200
    batches = ingestion.accepted_batches(str(loop.data / "batches"))
    assert len(batches) == 2 and sum(b.rows for b in batches) == 3200
    gate = check_named(retrained, "promotion_gate")
    evaluation = metadata_of(retrained, "model_evaluation")
    assert evaluation["champion"].startswith("champion v1")  # compared with the serving version
    if gate.passed:
        assert retrained.success and loop.champion() == "2" and dep.live_version(loop.target) == "2"
        assert (loop.data / "profiles" / "reference" / "2" / "profile.bin").exists()
    else:
        assert loop.champion() == "1" and dep.live_version(loop.target) == "1"
    print(f"loop: normal max statistic {ok['max_feature_statistic']:.3f}, drifted {bad['n_drifted_features']} "
          f"features (min Hellinger {min(bad[f'drift/{f}'] for f in DRIFT):.3f}), live accuracy "
          f"{live.get('live_accuracy', float('nan')):.3f}; retrained gate passed={gate.passed} "
          f"(roc_auc {evaluation.get('roc_auc', float('nan')):.4f}); {time.monotonic() - started:.0f}s")


def test_a_bad_deployment_is_rolled_back_by_the_watch_and_alerted(loop: Loop) -> None:
    from mlops_assets.defs.deployment.assets import model_deployment
    from mlops_assets.defs.resources import ParquetIOManager

    good = loop.champion()
    assert good is not None and dep.live_version(loop.target) == good
    # A version that passes every load check but was registered with a broken decision threshold
    # (0.0): it calls everything phishing.
    frame = simulate_records(loop.spec, SimulationConfig(n_rows=1500, seed=7))
    target = (frame[loop.spec.label] == loop.spec.positive_class).astype(int)
    model = CatBoostClassifier(iterations=40, depth=4, random_seed=1, verbose=False, thread_count=1,
                               allow_writing_files=False).fit(frame[loop.spec.feature_names], target)
    client = loop.client()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(loop.tracking_uri)
    try:
        with mlflow.start_run(experiment_id=client.get_experiment_by_name(c.MLFLOW_EXPERIMENT).experiment_id) as run:
            info = model_store.log_catboost_model(model, input_example=frame[loop.spec.feature_names].head(5))
    finally:
        mlflow.set_tracking_uri(previous)
    bad = str(model_store.register_version(client, c.REGISTERED_MODEL_NAME, run_id=run.info.run_id,
                                           model_uri=info.model_uri, tags={"decision_threshold": "0.0"}).version)

    # Traffic to the good version, then the bad one deployed through the model_deployment asset.
    loop.wait_logged([loop.send(300, seed=201, batch_size=5)])
    model_store.promote_to_champion(client, c.REGISTERED_MODEL_NAME, bad)

    @dg.asset(name="registered_model")
    def registered() -> dict:
        return {"model_name": c.REGISTERED_MODEL_NAME, "version": bad, "champion_version": bad}

    @dg.asset(name="train_test_split")
    def split() -> pd.DataFrame:
        return frame.assign(split="test")

    resources = {k: v for k, v in loop.defs.resources.items() if k in ("platform", "mlflow", "ray_serve")}
    deployed = dg.materialize([registered, split, model_deployment], instance=loop.instance,
                              resources={**resources, "io_manager": ParquetIOManager(base_url=str(loop.data / "stand-in"))})
    assert deployed.success and dep.live_version(loop.target) == bad

    watch_cursor = loop.tick("post_deploy_watch", None)[1]  # first tick: the metrics baseline
    after = loop.send(300, seed=202, batch_size=5)  # 60 requests >= the watch's minimum of 50
    loop.wait_logged([after])
    requests, watch_cursor, why = loop.tick("post_deploy_watch", watch_cursor)
    [request] = requests
    state = json.loads(watch_cursor)
    # Judged on the same rows: the good version, scored offline on the bad one's inputs, disagrees.
    assert state["verdict"] == "rollback" and state["seen"]["compared_with"] == good
    assert state["seen"]["compared_rows"] == 300 and state["seen"]["flip_share"] > 0.3
    [alert] = [a for a in loop.webhook.received if a["kind"] == "rollback"]
    assert f"version {bad}" in alert["summary"] and alert["details"]["rollback_to"] == good
    assert loop.tick("post_deploy_watch", watch_cursor)[0] == []  # decided once

    # The requested run is the rollback job: champion and endpoint return to the good version.
    rolled = loop.run("rollback", tags=request.tags)
    assert rolled.success
    assert loop.champion() == good and dep.live_version(loop.target) == good
    check = traffic.send_traffic(loop.spec, traffic.TrafficConfig(endpoint=loop.target.endpoint, token=TOKEN,
                                                                  records=20, batch_size=10, seed=203))
    assert {a["model_version"] for a in check.answered} == {good}
    seen = state["seen"]
    print(f"watch: v{bad} disagreed with v{good} on {seen['flip_share']:.2f} of the same {seen['compared_rows']} "
          f"rows (positive share {seen['positive_share_delta']:+.2f}); rolled back to v{good}")

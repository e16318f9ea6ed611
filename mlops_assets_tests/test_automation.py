"""Sensors of the loop on a test Dagster instance: one retraining per event, cooldown, no request
during a training run, the run-failure alert to a real webhook on 127.0.0.1, and the watch."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from mlops_assets.defs.ingestion import assets as ingestion
from mlops_assets.defs.ingestion.assets import raw_files_sensor
from mlops_assets.defs.monitoring.sensors import (
    degradation_retraining_sensor,
    drift_retraining_sensor,
    post_deploy_watch,
    retraining_job,
    run_failure_alert,
)
from mlops_assets.defs.resources import MonitoringResource, PlatformResource
from mlops_assets.monitoring import live as mon
from mlops_assets.serving.prediction_log import prediction_rows, write_part


class Webhook:
    """A real HTTP server on loopback that records POSTed JSON; `mode` makes it fail or hang."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.mode = "ok"
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hook.mode == "slow":
                    time.sleep(3)
                hook.received.append(json.loads(body))
                self.send_response(500 if hook.mode == "error" else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def _closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/metrics"


def _report(instance: dg.DagsterInstance, asset: str, partition: str | None = None, **metadata: object) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, partition=partition, metadata=metadata))


UNUSED_DATA = "memory://automation-test"  # a data root these sensors never read


def _definitions() -> dg.Definitions:
    """The platform's definitions: the retraining sensors ask Dagster what their runs would find stale."""
    from mlops_assets.definitions import defs

    return defs


def _tick(sensor, instance: dg.DagsterInstance, cursor: str | None, **resources: object):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=_definitions(),
                                      resources={"monitoring": MonitoringResource.at(UNUSED_DATA),
                                                 "platform": PlatformResource.at(UNUSED_DATA), **resources})
    result = sensor(context)
    return result, result.cursor if isinstance(result, dg.SensorResult) else cursor


def _requests(result) -> list[dg.RunRequest]:
    return list(result.run_requests or []) if isinstance(result, dg.SensorResult) else []


def _skip(result) -> str:
    return result.skip_reason.skip_message if isinstance(result, dg.SensorResult) and result.skip_reason else ""


def test_one_retraining_per_drift_event_and_none_during_the_cooldown() -> None:
    with dg.instance_for_test() as instance:
        result, cursor = _tick(drift_retraining_sensor, instance, None)
        assert _requests(result) == [] and "no drift" in _skip(result)

        _report(instance, "drift_report", "2026-01-05-11:00", drift_detected=True, event_key="drift-3-20260105T110000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        [request] = _requests(result)
        assert request.run_key == "drift-3-20260105T110000Z"
        assert request.tags["mlops_assets/trigger"] == "drift"

        # The same event on the next ticks, and reported again by a new drift_report run: nothing.
        for _ in range(3):
            result, cursor = _tick(drift_retraining_sensor, instance, cursor)
            assert _requests(result) == [] and "already handled" in _skip(result)
        _report(instance, "drift_report", "2026-01-05-11:00", drift_detected=True, event_key="drift-3-20260105T110000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert _requests(result) == []

        # Drift in the next window is a new event, but within the cooldown: not yet.
        _report(instance, "drift_report", "2026-01-05-12:00", drift_detected=True, event_key="drift-3-20260105T120000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert _requests(result) == [] and "cooldown" in _skip(result)

        # Once the cooldown is over (the last request 7 hours ago), the still-drifting window asks again.
        state = json.loads(cursor)
        state["last_requested_at"] = (datetime.now(UTC) - timedelta(hours=7)).isoformat()
        result, cursor = _tick(drift_retraining_sensor, instance, json.dumps(state))
        assert [r.run_key for r in _requests(result)] == ["drift-3-20260105T120000Z"]


def test_the_drift_sensor_judges_the_newest_window_not_the_latest_backfilled_one() -> None:
    with dg.instance_for_test() as instance:
        _report(instance, "drift_report", "2026-01-05-12:00", drift_detected=False, event_key="none")
        # A backfill of an older day, materialized later, found drift back then: not a reason now.
        _report(instance, "drift_report", "2026-01-04-09:00", drift_detected=True, event_key="drift-3-20260104T090000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, None)
        assert _requests(result) == [] and "no drift" in _skip(result)
        _report(instance, "drift_report", "2026-01-05-13:00", drift_detected=True, event_key="drift-3-20260105T130000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert [r.run_key for r in _requests(result)] == ["drift-3-20260105T130000Z"]


def test_the_monitoring_schedule_runs_the_last_complete_hour_and_the_hour_being_written_is_no_partition() -> None:
    from mlops_assets.defs.monitoring.assets import (
        drift_report,
        monitoring_partitions,
        online_performance,
        production_profiles,
    )
    from mlops_assets.defs.monitoring.release import release_comparison
    from mlops_assets.defs.monitoring.sensors import monitoring_job, monitoring_schedule

    unused = {k: dg.ResourceDefinition.none_resource() for k in ("platform", "monitoring", "mlflow", "ray_serve")}
    defs = dg.Definitions(assets=[production_profiles, drift_report, online_performance, release_comparison],
                          jobs=[monitoring_job],
                          schedules=[monitoring_schedule], resources=unused)
    schedule = defs.resolve_schedule_def("periodic_monitoring")
    tick = datetime(2026, 1, 5, 11, 5, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        result = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, scheduled_execution_time=tick))
    [request] = result.run_requests or []
    assert schedule.cron_schedule == "5 * * * *" and request.partition_key == "2026-01-05-10:00"
    keys = monitoring_partitions.get_partition_keys(current_time=datetime(2026, 1, 5, 11, 59, tzinfo=UTC))
    assert keys[-1] == "2026-01-05-10:00"  # 11:00 is still being written
    assert defs.resolve_job_def("monitoring").partitions_def == monitoring_partitions


def test_no_retraining_request_while_a_training_run_is_in_progress() -> None:
    from dagster._core.test_utils import create_run_for_test

    with dg.instance_for_test() as instance:
        _report(instance, "drift_report", "2026-01-05-13:00", drift_detected=True, event_key="drift-3-20260105T130000Z")
        run = create_run_for_test(instance, job_name="ingestion_onward", status=dg.DagsterRunStatus.STARTED)
        result, cursor = _tick(drift_retraining_sensor, instance, None)
        assert _requests(result) == [] and "in progress" in _skip(result)
        instance.report_run_failed(run)  # the run ended: the event is judged again
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert [r.run_key for r in _requests(result)] == ["drift-3-20260105T130000Z"]


def test_degradation_sensor_requests_one_retraining_per_degraded_version() -> None:
    with dg.instance_for_test() as instance:
        _report(instance, "online_performance", "2026-01-05-10:00", degraded=False, event_key="none")
        result, cursor = _tick(degradation_retraining_sensor, instance, None)
        assert _requests(result) == []
        _report(instance, "online_performance", "2026-01-05-11:00", degraded=True, event_key="degraded-4")
        result, cursor = _tick(degradation_retraining_sensor, instance, cursor)
        assert [(r.run_key, r.tags["mlops_assets/trigger"]) for r in _requests(result)] == [("degraded-4", "degradation")]
        result, cursor = _tick(degradation_retraining_sensor, instance, cursor)
        assert _requests(result) == []
    assert retraining_job.name == "retraining"


@dg.op
def _fails() -> None:
    raise RuntimeError("the feature store is on fire")


@dg.job
def doomed() -> None:
    _fails()


def _failure_context(instance: dg.DagsterInstance, webhook_url: str, timeout_s: float = 5.0):
    result = doomed.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    [event] = [e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE"]
    return dg.build_run_status_sensor_context(
        sensor_name="run_failure_alert", dagster_event=event, dagster_instance=instance, dagster_run=run,
        resources={"monitoring": MonitoringResource.at(UNUSED_DATA, alert_webhook_url=webhook_url, alert_timeout_s=timeout_s)},
    ).for_run_failure(), run


def test_run_failure_alert_posts_to_the_webhook(webhook: Webhook) -> None:
    with dg.instance_for_test() as instance:
        context, run = _failure_context(instance, webhook.url)
        run_failure_alert(context)
    [alert] = webhook.received
    assert alert["kind"] == "run_failed" and alert["details"]["job_name"] == "doomed"
    assert alert["details"]["run_id"] == run.run_id
    assert "doomed" in alert["text"] and "_fails" in alert["details"]["error"]


@pytest.mark.parametrize("mode", ["error", "slow", "closed"])
def test_a_failing_webhook_never_breaks_the_sensor_and_is_bounded(webhook: Webhook, mode: str) -> None:
    webhook.mode = mode
    url = _closed_url() if mode == "closed" else webhook.url
    with dg.instance_for_test() as instance:
        context, _ = _failure_context(instance, url, timeout_s=0.5)
        start = time.monotonic()
        run_failure_alert(context)  # must not raise
        elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"alert took {elapsed:.1f}s with a 0.5s timeout"


DRIFT = {"SSLfinal_State": 0.6, "URL_of_Anchor": 0.6, "having_Sub_Domain": 0.6, "web_traffic": 0.6,
         "Prefix_Suffix": 0.6}


@pytest.fixture()
def serving() -> Iterator[dict[str, object]]:
    """A healthy-looking endpoint (dashboard, /healthz, /model on loopback): the watch's outage
    branch sees no outage, so these tests reach the regression path."""
    from mlops_assets.defs.resources import RayServeResource
    from mlops_assets_tests.serve_stub import ServeStub

    stub = ServeStub()
    yield {"ray_serve": RayServeResource(dashboard_url=stub.url, serve_url=stub.url, api_token="stub-token")}
    stub.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, spec) -> Iterator[tuple[str, dict[str, str]]]:
    """A real MLflow store holding one small CatBoost model as three versions: 1 and 2 equal, 3 with
    a decision threshold of 0 (it calls everything phishing)."""
    import mlflow
    from mlflow import MlflowClient

    from mlops_assets.registry import model_store
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records
    from mlops_assets.training import tracking
    from mlops_assets.training import train as tr

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "watch", (root / "artifacts").as_uri())
    raw = simulate_records(spec, SimulationConfig(n_rows=800, seed=5))
    frame = raw[spec.feature_names].assign(target=(raw[spec.label] == spec.positive_class).astype(int))
    model = tr.train_model(frame, spec.feature_names, tr.TrainingParams(iterations=30, thread_count=1)).model
    versions = {}
    for name, tags in (("equal", {}), ("equal-again", {}), ("flips", {"decision_threshold": "0.0"})):
        with tracking.use_tracking_uri(uri), mlflow.start_run(experiment_id=experiment) as run:
            info = model_store.log_catboost_model(model, input_example=frame[spec.feature_names].head(3))
        versions[name] = str(model_store.register_version(client, "watched", run_id=run.info.run_id,
                                                          model_uri=info.model_uri, tags=tags).version)
    yield uri, versions


def _served_rows(spec, scorer, version: str, at: datetime, *, drift: dict, n: int, seed: int) -> list[dict]:
    """What `version` answered on n simulated records (drifted or not), four records a request."""
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records

    records = simulate_records(spec, SimulationConfig(n_rows=n, seed=seed, drift=drift))[spec.feature_names]
    scored = scorer.score(records)
    rows = []
    for start in range(0, n, 4):
        part = records.iloc[start:start + 4]
        rows += prediction_rows(request_id=f"v{version}-{seed}-{start}", model_version=version,
                                records=part.astype(int).to_dict("records"),
                                labels=scored.labels[start:start + 4], probabilities=scored.probabilities[start:start + 4],
                                logged_at=at + timedelta(seconds=start / 100))
    return rows


@pytest.mark.parametrize(("new", "after_rows", "verdict"), [
    ("equal-again", 240, "watching"),  # the same model on drifted traffic: no regression
    ("flips", 240, "rollback"),  # answers flip on the same rows: a regression
    ("flips", 60, "watching"),  # too few rows compared to judge yet
], ids=["equal-model-drifted-inputs", "predictions-flip", "below-minimum-rows"])
def test_the_watch_compares_versions_on_the_same_inputs(
    tmp_path: Path, webhook: Webhook, spec, registry: tuple[str, dict[str, str]], serving: dict[str, object],
    new: str, after_rows: int, verdict: str,
) -> None:
    from mlops_assets.defs.resources import MlflowResource
    from mlops_assets.registry import model_store
    from mlops_assets.serving.scoring import scorer_from_loaded

    uri, versions = registry
    old, live = versions["equal"], versions[new]
    resources = {
        "platform": PlatformResource.at(str(tmp_path)),
        "mlflow": MlflowResource(tracking_uri=uri, model_name="watched"),
        "monitoring": MonitoringResource.at(str(tmp_path), prediction_log_url=str(tmp_path / "predictions"), metrics_url=_closed_url(),
                                         alert_webhook_url=webhook.url, watch_min_requests=10,
                                         watch_min_compared_rows=100),
        **serving,
    }
    score = {v: scorer_from_loaded(model_store.load_verified_model(uri, "watched", version=v), spec)
             for v in (old, live)}
    with dg.instance_for_test() as instance:
        _report(instance, "model_deployment", live_version=live, replaced_version=old)
        at = datetime.fromtimestamp(
            instance.get_latest_materialization_event(dg.AssetKey("model_deployment")).timestamp, UTC)
        # The old version saw normal traffic before; the new one drifted traffic after.
        rows = _served_rows(spec, score[old], old, at - timedelta(minutes=5), drift={}, n=240, seed=1)
        rows += _served_rows(spec, score[live], live, at + timedelta(seconds=1), drift=DRIFT, n=after_rows, seed=2)
        write_part(rows, str(tmp_path / "predictions"), "part-1.parquet")
        first, cursor = _tick(post_deploy_watch, instance, None, **resources)
        second, cursor = _tick(post_deploy_watch, instance, cursor, **resources)
    state = json.loads(cursor)
    seen = state["seen"]
    assert state["verdict"] == verdict and seen["compared_rows"] == after_rows and seen["compared_with"] == old
    if verdict == "rollback":
        [request] = _requests(first)
        assert request.job_name in (None, "rollback") and request.tags["mlops_assets/rollback_from"] == live
        assert seen["flip_share"] > 0.3 and seen["positive_share_delta"] == pytest.approx(seen["flip_share"])
        assert _requests(second) == []  # decided once per deployment
        [alert] = webhook.received
        assert alert["kind"] == "rollback" and "of answers differ from the previous version" in alert["summary"]
    else:
        assert _requests(first) == [] and _requests(second) == [] and webhook.received == []
    if new == "equal-again":
        assert (seen["flip_share"], seen["mean_abs_delta"], seen["probability_ks"]) == (0.0, 0.0, 0.0)
        # Against the old version's answers on EARLIER inputs the drift looks like a regression.
        from scipy import stats

        frame = pd.DataFrame(rows)
        earlier_ks = stats.ks_2samp(frame[frame["model_version"] == old]["probability"],
                                    frame[frame["model_version"] == live]["probability"]).statistic
        assert earlier_ks > 0.2, earlier_ks
    if after_rows < 100:
        assert f"{after_rows} of 100 rows compared" in _skip(second)


def test_each_watch_tick_reads_only_the_parts_that_arrived_since_the_last(
    tmp_path: Path, webhook: Webhook, spec, registry: tuple[str, dict[str, str]], serving: dict[str, object],
) -> None:
    from mlops_assets.defs.monitoring import sensors
    from mlops_assets.defs.resources import MlflowResource
    from mlops_assets.registry import model_store
    from mlops_assets.serving.scoring import scorer_from_loaded

    uri, versions = registry
    old, live = versions["equal"], versions["equal-again"]
    log = tmp_path / "predictions"
    resources = {
        "platform": PlatformResource.at(str(tmp_path)),
        "mlflow": MlflowResource(tracking_uri=uri, model_name="watched"),
        "monitoring": MonitoringResource.at(str(tmp_path), prediction_log_url=str(log), metrics_url=_closed_url(),
                                         alert_webhook_url=webhook.url, watch_min_requests=10,
                                         watch_min_compared_rows=1000),
        **serving,
    }
    scorer = scorer_from_loaded(model_store.load_verified_model(uri, "watched", version=live), spec)
    with dg.instance_for_test() as instance:
        _report(instance, "model_deployment", live_version=live, replaced_version=old)
        at = datetime.fromtimestamp(
            instance.get_latest_materialization_event(dg.AssetKey("model_deployment")).timestamp, UTC)
        # Rows of older hours, never listed: the watch reads the folders since the deployment only.
        write_part(_served_rows(spec, scorer, live, at - timedelta(hours=3), drift={}, n=40, seed=4), str(log),
                   "part-0.parquet")
        write_part(_served_rows(spec, scorer, live, at + timedelta(seconds=1), drift={}, n=120, seed=5), str(log),
                   "part-1.parquet")
        _, cursor = _tick(post_deploy_watch, instance, None, **resources)
        first = json.loads(cursor)
        [part_1] = first["parts"]
        assert part_1.endswith("part-1.parquet") and first["seen"]["answered_requests"] == 30
        (log / part_1).unlink()  # read once: the next ticks must not need it
        write_part(_served_rows(spec, scorer, live, at + timedelta(seconds=2), drift={}, n=80, seed=6), str(log),
                   "part-2.parquet")
        _, cursor = _tick(post_deploy_watch, instance, cursor, **resources)
        second = json.loads(cursor)
        assert second["last_part"].endswith("part-2.parquet") and len(second["parts"]) == 2
        assert second["seen"]["answered_requests"] == 50 and second["seen"]["compared_rows"] == 200
        assert second["verdict"] == "watching"
        # A new process (no rows kept in memory) reads the deployment's parts again.
        sensors._WATCH_ROWS.clear()
        _, cursor = _tick(post_deploy_watch, instance, cursor, **resources)
        assert json.loads(cursor)["seen"]["compared_rows"] == 80


def test_a_version_restored_by_the_rollback_job_is_not_judged_against_the_one_it_replaced(
    tmp_path: Path, webhook: Webhook, spec, registry: tuple[str, dict[str, str]], serving: dict[str, object],
) -> None:
    from mlops_assets.defs.resources import MlflowResource
    from mlops_assets.registry import model_store
    from mlops_assets.serving.scoring import scorer_from_loaded

    uri, versions = registry
    good, bad = versions["equal"], versions["flips"]

    @dg.op
    def record_restore(context) -> None:  # no annotation: dagster reads it as a string here
        context.log_event(dg.AssetMaterialization("model_deployment",
                                                  metadata={"live_version": good, "replaced_version": bad}))

    @dg.job(name="rollback")
    def rollback_recorded() -> None:
        record_restore()

    resources = {
        "platform": PlatformResource.at(str(tmp_path)),
        "mlflow": MlflowResource(tracking_uri=uri, model_name="watched"),
        "monitoring": MonitoringResource.at(str(tmp_path), prediction_log_url=str(tmp_path / "predictions"), metrics_url=_closed_url(),
                                         alert_webhook_url=webhook.url, watch_min_requests=10),
        **serving,
    }
    scorer = scorer_from_loaded(model_store.load_verified_model(uri, "watched", version=good), spec)
    with dg.instance_for_test() as instance:
        assert rollback_recorded.execute_in_process(instance=instance).success
        at = datetime.fromtimestamp(
            instance.get_latest_materialization_event(dg.AssetKey("model_deployment")).timestamp, UTC)
        write_part(_served_rows(spec, scorer, good, at + timedelta(seconds=1), drift={}, n=200, seed=3),
                   str(tmp_path / "predictions"), "part-1.parquet")
        result, cursor = _tick(post_deploy_watch, instance, None, **resources)
    state = json.loads(cursor)
    # Compared with the bad version it replaced, every legit answer would "flip": no judging that.
    assert _requests(result) == [] and state["restored"] is True and state["verdict"] == "watching"
    assert state["seen"]["compared_with"] is None and state["seen"]["compared_rows"] == 0
    assert webhook.received == []


def test_the_watch_keeps_watching_when_the_replaced_version_cannot_be_loaded(
    tmp_path: Path, webhook: Webhook, registry: tuple[str, dict[str, str]], serving: dict[str, object],
) -> None:
    from mlops_assets.defs.resources import MlflowResource

    uri, versions = registry
    resources = {
        "platform": PlatformResource.at(str(tmp_path)),
        "mlflow": MlflowResource(tracking_uri=uri, model_name="watched"),
        "monitoring": MonitoringResource.at(str(tmp_path), prediction_log_url=str(tmp_path / "predictions"), metrics_url=_closed_url(),
                                         alert_webhook_url=webhook.url),
        **serving,
    }
    with dg.instance_for_test() as instance:
        _report(instance, "model_deployment", live_version=versions["flips"], replaced_version="99")  # unknown
        result, cursor = _tick(post_deploy_watch, instance, None, **resources)
    state = json.loads(cursor)
    assert _requests(result) == [] and state["verdict"] == "watching" and webhook.received == []
    assert "version 99 not loaded" in state["seen"]["load_error"] and state["seen"]["compared_with"] is None


def test_serving_counters_parse_ray_names_and_survive_a_restart() -> None:
    text = "\n".join([
        "# TYPE ray_mlops_serving_requests_total counter",
        'ray_mlops_serving_requests_total{route="/predict",status="200",WorkerId="a"} 180.0',
        'ray_mlops_serving_requests_total{route="/predict",status="500",WorkerId="a"} 20.0',
        'ray_mlops_serving_requests_total{route="/healthz",status="200",WorkerId="a"} 7.0',
        "# TYPE ray_mlops_serving_request_latency_ms histogram",
        'ray_mlops_serving_request_latency_ms_bucket{route="/predict",le="10.0"} 150.0',
        'ray_mlops_serving_request_latency_ms_bucket{route="/predict",le="200.0"} 195.0',
        'ray_mlops_serving_request_latency_ms_bucket{route="/predict",le="+Inf"} 200.0',
        'ray_mlops_serving_request_latency_ms_count{route="/predict"} 200.0',
        'ray_mlops_serving_request_latency_ms_sum{route="/predict"} 900.0',
    ]) + "\n"
    now = mon.parse_serving_metrics(text)
    assert (now.requests, now.server_errors) == (200, 20)
    base = mon.ServingCounters(100, 5, ((10.0, 100.0), (200.0, 100.0), (float("inf"), 100.0)))
    # Since base: 100 requests, 15 errors; 50 at <=10 ms and 45 at <=200 ms: the 95th is in the 200 ms bucket.
    assert mon.counters_since(now, base) == (100, 15, 0.2)
    assert mon.counters_since(base, now)[0] == 100  # counters went down: a restart, count from zero
    assert mon.ServingCounters.from_dict(json.loads(json.dumps(now.to_dict()))) == now
    assert pd.isna(mon.counters_since(mon.ServingCounters(), mon.ServingCounters())[2] or float("nan"))


def test_dashboard_and_alert_rules_only_use_metrics_that_exist() -> None:
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    rules = yaml.safe_load((root / "deploy/monitoring/alert_rules.yaml").read_text())
    dashboard = json.loads((root / "deploy/monitoring/grafana_dashboard.json").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(?:ray_)?mlops_\w+", e)}
    serving_src = (root / "mlops_assets/serving/metrics.py").read_text()
    declared = {f"ray_mlops_serving_{n}" for n in re.findall(r'PREFIX \+ "(\w+)"', serving_src)}
    histogram = {f"{n}_bucket" for n in declared}
    monitoring_src = (root / "mlops_assets/defs/monitoring/assets.py").read_text()
    written = set(re.findall(r'"(mlops_(?:drift|live)_\w+)"', monitoring_src))
    written |= {f"mlops_live_{k}" for k in ("n_labelled", "accuracy", "f1", "roc_auc", "precision", "recall")}
    written |= {f"mlops_offline_{k}" for k in ("accuracy", "f1", "roc_auc")}
    unknown = used - declared - histogram - written
    assert not unknown, f"dashboards use metrics nobody exports: {sorted(unknown)}"
    assert len(exprs) > 15 and any("mlops_drift" in e for e in exprs) and any("latency" in e for e in exprs)


# ---------------------------------------------------------------------------------------------
# The raw files sensor: a partition and a run per new landed file, then one ingestion_onward run


def _platform(root: Path) -> PlatformResource:
    return PlatformResource(data_url=str(root), landing_url=str(root / "raw"))


def _files_tick(root: Path, instance: dg.DagsterInstance, cursor: str | None):
    result = raw_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=_definitions(),
                                                      resources={"platform": _platform(root)}))
    return result, result.cursor if isinstance(result, dg.SensorResult) else cursor


def _run_partition_requests(root: Path, instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    """What the daemon does with the sensor's result: add the partitions, launch the runs."""
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys or []))
    job = dg.Definitions(assets=[ingestion.raw_batches], jobs=[ingestion.ingest_raw_batch_job],
                         resources={"platform": _platform(root)}).resolve_job_def(ingestion.INGEST_JOB)
    for request in _requests(result):
        job.execute_in_process(instance=instance, partition_key=request.partition_key, tags=request.tags,
                               raise_on_error=False)


def test_the_raw_files_sensor_adds_a_partition_per_new_file_then_requests_training_once(tmp_path: Path) -> None:
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch

    root = tmp_path / "data"
    landing = str(root / "raw")
    records = simulate_records(default_spec(), SimulationConfig(n_rows=200, seed=5))
    with dg.instance_for_test() as instance:
        result, cursor = _files_tick(root, instance, None)
        assert _requests(result) == [] and "no new files" in _skip(result)

        write_batch(records.head(100), landing, name="a.csv")
        (Path(landing) / "garbage.csv").write_text("\x00\x01 not a table")
        result, cursor = _files_tick(root, instance, cursor)
        requests = _requests(result)
        [added] = result.dynamic_partitions_requests
        assert added.partitions_def_name == "raw_batches" and set(added.partition_keys) == {
            r.partition_key for r in requests}
        assert len(requests) == 2 and {r.job_name for r in requests} == {ingestion.INGEST_JOB}
        assert all(r.run_key == f"raw_batch-{r.partition_key}" and len(r.partition_key) == 64 for r in requests)

        # Requested but not run yet: nothing downstream, no partition requested twice.
        result, cursor = _files_tick(root, instance, cursor)
        assert _requests(result) == [] and "waiting for 2" in _skip(result)

        _run_partition_requests(root, instance, dg.SensorResult(
            run_requests=requests, dynamic_partitions_requests=[added]))
        assert instance.get_materialized_partitions(dg.AssetKey("raw_batches")) == set(added.partition_keys)
        result, cursor = _files_tick(root, instance, cursor)  # garbage.csv is in quarantine now
        [onward] = _requests(result)
        assert onward.job_name == "ingestion_onward" and onward.partition_key is None
        assert onward.run_key and onward.run_key.startswith("ingestion_onward-")

        # Nothing new: no request; the same bytes landed under another name: not a new partition.
        result, cursor = _files_tick(root, instance, cursor)
        assert _requests(result) == []
        write_batch(records.head(100), landing, name="a-again.csv")
        result, cursor = _files_tick(root, instance, cursor)
        assert _requests(result) == [] and "no new files" in _skip(result)

        # Only a bad file: its partition runs, and no training is requested for it.
        (Path(landing) / "broken.csv").write_text("a,b\n1,2\n")
        result, cursor = _files_tick(root, instance, cursor)
        [bad] = _requests(result)
        _run_partition_requests(root, instance, result)
        result, cursor = _files_tick(root, instance, cursor)
        assert _requests(result) == [] and "none of the 1 new file(s) met the contract" in _skip(result)


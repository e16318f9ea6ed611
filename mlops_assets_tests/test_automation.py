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

from mlops_assets.defs.automation import (
    degradation_retraining_sensor,
    drift_retraining_sensor,
    post_deploy_watch,
    retraining_job,
    run_failure_alert,
)
from mlops_assets.defs.monitoring import MonitoringResource
from mlops_assets.defs.resources import PlatformResource
from mlops_assets.lib import monitoring as mon
from mlops_assets.lib.serving.prediction_log import prediction_rows, write_part


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


def _report(instance: dg.DagsterInstance, asset: str, **metadata: object) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=asset, metadata=metadata))


def _tick(sensor, instance: dg.DagsterInstance, cursor: str | None, **resources: object):
    context = dg.build_sensor_context(instance=instance, cursor=cursor,
                                      resources={"monitoring": MonitoringResource(), **resources})
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

        _report(instance, "drift_report", drift_detected=True, event_key="drift-3-20260105T110000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        [request] = _requests(result)
        assert request.run_key == "drift-3-20260105T110000Z"
        assert request.tags["mlops_assets/trigger"] == "drift"

        # The same event on the next ticks, and reported again by a new drift_report run: nothing.
        for _ in range(3):
            result, cursor = _tick(drift_retraining_sensor, instance, cursor)
            assert _requests(result) == [] and "already handled" in _skip(result)
        _report(instance, "drift_report", drift_detected=True, event_key="drift-3-20260105T110000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert _requests(result) == []

        # Drift in the next window is a new event, but within the cooldown: not yet.
        _report(instance, "drift_report", drift_detected=True, event_key="drift-3-20260105T120000Z")
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert _requests(result) == [] and "cooldown" in _skip(result)

        # Once the cooldown is over (the last request 7 hours ago), the still-drifting window asks again.
        state = json.loads(cursor)
        state["last_requested_at"] = (datetime.now(UTC) - timedelta(hours=7)).isoformat()
        result, cursor = _tick(drift_retraining_sensor, instance, json.dumps(state))
        assert [r.run_key for r in _requests(result)] == ["drift-3-20260105T120000Z"]


def test_no_retraining_request_while_a_training_run_is_in_progress() -> None:
    from dagster._core.test_utils import create_run_for_test

    with dg.instance_for_test() as instance:
        _report(instance, "drift_report", drift_detected=True, event_key="drift-3-20260105T130000Z")
        run = create_run_for_test(instance, job_name="ingestion_onward", status=dg.DagsterRunStatus.STARTED)
        result, cursor = _tick(drift_retraining_sensor, instance, None)
        assert _requests(result) == [] and "in progress" in _skip(result)
        instance.report_run_failed(run)  # the run ended: the event is judged again
        result, cursor = _tick(drift_retraining_sensor, instance, cursor)
        assert [r.run_key for r in _requests(result)] == ["drift-3-20260105T130000Z"]


def test_degradation_sensor_requests_one_retraining_per_degraded_version() -> None:
    with dg.instance_for_test() as instance:
        _report(instance, "online_performance", degraded=False, event_key="none")
        result, cursor = _tick(degradation_retraining_sensor, instance, None)
        assert _requests(result) == []
        _report(instance, "online_performance", degraded=True, event_key="degraded-4")
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
        resources={"monitoring": MonitoringResource(alert_webhook_url=webhook_url, alert_timeout_s=timeout_s)},
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


def _deployment_log(root: Path, at: datetime, *, flip_after: bool, requests: int = 30) -> None:
    """Version 1 answered before `at`; version 2 after, with flipped answers when `flip_after`."""
    rows = []
    for i in range(requests):
        label = -1 if i % 3 == 0 else 1  # a third predicted phishing
        rows += prediction_rows(request_id=f"before-{i}", model_version="1", records=[{"URL_Length": 1}],
                                labels=[label], probabilities=[0.8 if label == -1 else 0.2],
                                logged_at=at - timedelta(minutes=5) + timedelta(seconds=i))
        after = -label if flip_after else label
        rows += prediction_rows(request_id=f"after-{i}", model_version="2", records=[{"URL_Length": 1}],
                                labels=[after], probabilities=[0.8 if after == -1 else 0.2],
                                logged_at=at + timedelta(seconds=5 + i))
    write_part(rows, str(root / "predictions"), "part-1.parquet")


@pytest.mark.parametrize("bad", [True, False], ids=["predictions-flip", "healthy"])
def test_the_watch_rolls_back_a_deployment_whose_predictions_move(tmp_path: Path, webhook: Webhook, bad: bool) -> None:
    resources = {
        "platform": PlatformResource(data_url=str(tmp_path)),
        "monitoring": MonitoringResource(prediction_log_url=str(tmp_path / "predictions"), metrics_url=_closed_url(),
                                         alert_webhook_url=webhook.url, watch_min_requests=20),
    }
    with dg.instance_for_test() as instance:
        _report(instance, "model_deployment", live_version="2", replaced_version="1")
        at = datetime.fromtimestamp(
            instance.get_latest_materialization_event(dg.AssetKey("model_deployment")).timestamp, UTC)
        _deployment_log(tmp_path, at, flip_after=bad)
        first, cursor = _tick(post_deploy_watch, instance, None, **resources)
        second, cursor = _tick(post_deploy_watch, instance, cursor, **resources)
    state = json.loads(cursor)
    if bad:
        [request] = _requests(first)
        assert request.job_name in (None, "rollback") and request.tags["mlops_assets/rollback_from"] == "2"
        assert state["verdict"] == "rollback" and state["seen"]["positive_share_delta"] == pytest.approx(1 / 3)
        assert _requests(second) == []  # decided once per deployment
        [alert] = webhook.received
        assert alert["kind"] == "rollback" and "share predicted positive moved" in alert["summary"]
    else:
        assert _requests(first) == [] and _requests(second) == []
        assert state["verdict"] == "watching" and webhook.received == []
        assert state["seen"]["positive_share_delta"] == 0.0 and state["seen"]["answered_requests"] == 30


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
    serving_src = (root / "mlops_assets/lib/serving/metrics.py").read_text()
    declared = {f"ray_mlops_serving_{n}" for n in re.findall(r'PREFIX \+ "(\w+)"', serving_src)}
    histogram = {f"{n}_bucket" for n in declared}
    monitoring_src = (root / "mlops_assets/defs/monitoring.py").read_text()
    written = set(re.findall(r'"(mlops_(?:drift|live)_\w+)"', monitoring_src))
    written |= {f"mlops_live_{k}" for k in ("n_labelled", "accuracy", "f1", "roc_auc", "precision", "recall")}
    written |= {f"mlops_offline_{k}" for k in ("accuracy", "f1", "roc_auc")}
    unknown = used - declared - histogram - written
    assert not unknown, f"dashboards use metrics nobody exports: {sorted(unknown)}"
    assert len(exprs) > 15 and any("mlops_drift" in e for e in exprs) and any("latency" in e for e in exprs)

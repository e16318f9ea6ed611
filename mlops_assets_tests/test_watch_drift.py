"""Drifted traffic right after a deployment of an equal model, on a real Ray Serve endpoint and a
real Dagster instance (the loop's fixture: its own Ray head on loopback, MLflow on SQLite).

Version N serves normal traffic; the same model, logged again, is deployed as N+1 and gets
drifted traffic at once. The post-deploy watch scores N on N+1's logged inputs, finds the same
answers and never asks for a rollback; drift_report fails its no_drift check on the window; the
drift sensor asks for exactly one retraining run for that event.
"""

from __future__ import annotations

import json
import time

import dagster as dg
import mlflow
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from scipy import stats

from mlops_assets import constants as c
from mlops_assets.deployment import rollout as dep
from mlops_assets.monitoring import live as mon
from mlops_assets.registry import model_store
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets.training import tracking
from mlops_assets_tests.e2e_support import check_named, metadata_of, past_hour
from mlops_assets_tests.test_loop_e2e import DRIFT, Loop
from mlops_assets_tests.test_loop_e2e import loop as loop  # noqa: F401 - the fixture, one cluster for this module

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WATCH_WINDOW_S = 40  # short, so the test sees the watch end with "passed"


def _log_model(lp: Loop, model: CatBoostClassifier, example: pd.DataFrame) -> tuple[str, str]:
    """The model logged in a run of its own: (run id, model URI)."""
    client = lp.client()
    experiment = tracking.ensure_experiment(client, c.MLFLOW_EXPERIMENT, (lp.data / "mlflow" / "artifacts").as_uri())
    with tracking.use_tracking_uri(lp.tracking_uri), mlflow.start_run(experiment_id=experiment) as run:
        info = model_store.log_catboost_model(model, input_example=example.head(5))
    return run.info.run_id, info.model_uri


def _deploy(lp: Loop, version: str, run_id: str, frame: pd.DataFrame) -> dg.ExecuteInProcessResult:
    """Champion := version, then the platform's model_deployment and reference_profile assets."""
    from mlops_assets.defs.deployment.assets import model_deployment
    from mlops_assets.defs.monitoring.assets import reference_profile
    from mlops_assets.defs.resources import ParquetIOManager

    model_store.promote_to_champion(lp.client(), c.REGISTERED_MODEL_NAME, version)

    @dg.asset(name="registered_model")
    def registered() -> dict:
        return {"model_name": c.REGISTERED_MODEL_NAME, "version": version, "run_id": run_id,
                "champion_version": version}

    @dg.asset(name="train_test_split")
    def split() -> pd.DataFrame:
        return frame

    resources = {k: v for k, v in lp.defs.resources.items() if k in ("platform", "mlflow", "ray_serve")}
    result = dg.materialize(
        [registered, split, model_deployment, reference_profile], instance=lp.instance,
        resources={**resources, "io_manager": ParquetIOManager(base_url=str(lp.data / f"stand-in-{version}"))})
    assert result.success and dep.live_version(lp.target) == version
    return result


def test_drift_after_deploying_an_equal_model_is_no_rollback_one_failed_check_one_retraining(loop: Loop) -> None:
    started = time.monotonic()
    spec = loop.spec
    raw = simulate_records(spec, SimulationConfig(n_rows=2000, seed=42))
    frame = raw.assign(split=["train"] * 1600 + ["test"] * 400)
    train = frame[frame["split"] == "train"]
    model = CatBoostClassifier(iterations=80, depth=4, random_seed=c.TRAINING_SEED, verbose=False, thread_count=1,
                               allow_writing_files=False)
    model.fit(train[spec.feature_names], (train[spec.label] == spec.positive_class).astype(int))
    # One trained model, two runs: two registered versions holding the same model.
    versions = []
    for _ in range(2):
        run_id, uri = _log_model(loop, model, train[spec.feature_names])
        mv = model_store.register_version(loop.client(), c.REGISTERED_MODEL_NAME, run_id=run_id, model_uri=uri,
                                          tags={"decision_threshold": "0.5"})
        versions.append((str(mv.version), run_id))
    (old, old_run), (new, new_run) = versions

    # Version N in service with normal traffic.
    _deploy(loop, old, old_run, frame)
    loop.wait_logged([loop.send(300, seed=301, batch_size=5)])

    # N+1 (the same model) deployed, drifted traffic right after, in a monitoring window of its own.
    deployed = _deploy(loop, new, new_run, frame)
    assert metadata_of(deployed, "model_deployment")["replaced_version"] == old
    watch = {"watch_window": f"{WATCH_WINDOW_S}s"}
    _, cursor, _ = loop.tick("post_deploy_watch", None, **watch)  # first tick: the counters' baseline
    drifted = loop.send(300, seed=302, drift=DRIFT, batch_size=5)  # 60 requests
    log = loop.wait_logged([drifted])
    assert {a["model_version"] for a in drifted.answered} == {new}

    # Against N's answers on EARLIER inputs the drift looks like a regression (the old watch's
    # mistake): the probability distributions differ well beyond the watch's KS limit.
    earlier_ks = stats.ks_2samp(log[log[mon.MODEL_VERSION] == old][mon.PROBABILITY],
                                log[log[mon.MODEL_VERSION] == new][mon.PROBABILITY]).statistic
    assert earlier_ks > c.WATCH_MAX_PROBABILITY_KS, earlier_ks

    # The watch over its ticks: N scored on N+1's inputs gives the same answers; never a rollback.
    verdicts = []
    deadline = time.monotonic() + WATCH_WINDOW_S + 30
    while True:
        requests, cursor, why = loop.tick("post_deploy_watch", cursor, **watch)
        state = json.loads(cursor or "{}")
        verdicts.append(state["verdict"])
        assert requests == [], why
        if state["verdict"] == "passed" or time.monotonic() > deadline:
            break
        time.sleep(5)
    seen = state["seen"]
    assert verdicts[0] == "watching" and verdicts[-1] == "passed", verdicts
    assert seen["compared_with"] == old and seen["compared_rows"] == 300
    assert (seen["flip_share"], seen["mean_abs_delta"], seen["probability_ks"]) == (0.0, 0.0, 0.0)
    assert loop.instance.get_runs(dg.RunsFilter(job_name="rollback")) == []
    assert not [a for a in loop.webhook.received if a["kind"] == "rollback"]
    assert loop.champion() == new and dep.live_version(loop.target) == new

    # The drift path judges the window (the drifted traffic filed as one past hour's): no_drift fails.
    drift_hour = past_hour(2)
    loop.file_traffic_in(drift_hour, [drifted])
    monitored = loop.monitor(drift_hour)
    assert monitored.success
    report = metadata_of(monitored, "drift_report")
    assert not check_named(monitored, "no_drift").passed and report["drift_detected"] is True
    assert report["serving_version"] == new and report["rows"] == 300
    assert set(DRIFT) <= set(report["drifted_features"].split(", "))

    # Exactly one retraining request for the event: none on later ticks or a re-run report.
    requests, sensor_cursor, _ = loop.tick("drift_retraining_sensor", None)
    assert [r.run_key for r in requests] == [report["event_key"]] and report["event_key"].startswith(f"drift-{new}-")
    for _ in range(2):
        again, sensor_cursor, why = loop.tick("drift_retraining_sensor", sensor_cursor)
        assert again == [] and "already handled" in why
    assert loop.monitor(drift_hour).success
    again, sensor_cursor, _ = loop.tick("drift_retraining_sensor", sensor_cursor)
    assert again == []
    print(f"watch-drift: v{old} vs v{new} KS on earlier inputs {earlier_ks:.2f}, on the same rows 0.00; "
          f"watch {' -> '.join(dict.fromkeys(verdicts))}; {report['n_drifted_features']} features drifted; "
          f"one retraining request {report['event_key']}; {time.monotonic() - started:.0f}s")

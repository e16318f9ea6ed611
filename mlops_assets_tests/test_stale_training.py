"""Stale-only training through the command `make pipeline` runs (`mlops-assets pipeline`: ingest,
then train, which launches a run of the training job with the training path selected only when
something in it is stale, then status; a real instance in DAGSTER_HOME, MLflow on SQLite): a second run on
unchanged data launches no run, trains, registers and promotes nothing and says why; a run launched
anyway (the UI, a sensor) reuses the model; changed parameters are stale; a new file retrains. The
sensors that start training runs follow the same rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets_tests.settings_support import platform_resources
from mlops_assets_tests.test_postgres_platform import FAST, IN_PROCESS, REPO, _land, training_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "stale-classifier"
EXPERIMENT = "stale-training"


def _env(tmp: Path) -> dict[str, str]:
    home = tmp / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").touch()
    return {**os.environ, "DAGSTER_HOME": str(home), "MLOPS_DATA_URL": str(tmp / "data"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "MLOPS_MLFLOW_ARTIFACT_ROOT": (tmp / "artifacts").as_uri(),
            "MLOPS_MLFLOW_EXPERIMENT": EXPERIMENT, "MLOPS_MODEL_NAME": MODEL}


def _pipeline(env: dict[str, str], gate_may_reject: bool = False) -> tuple[float, str]:
    """`make pipeline`'s commands; returns the seconds they took and what they printed. With
    `gate_may_reject` the run may fail at the blocking passed_gate check (a candidate that is
    registered, as challenger)."""
    started = time.monotonic()
    done = subprocess.run(  # ingest (landed files become raw_batches partitions), train if stale, status
        [str(Path(sys.executable).with_name("mlops-assets")), "pipeline", "--select", ",".join(training_path()),
         "--config-json", json.dumps({**FAST, **IN_PROCESS})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    rejected = gate_may_reject and "registered_model: passed_gate" in out
    assert done.returncode == 0 or rejected, done.stdout[-4000:] + done.stderr[-4000:]
    return time.monotonic() - started, out


def _materialize(env: dict[str, str]) -> None:
    """`dagster asset materialize` itself, as the UI's "Materialize" or a sensor's run launches it."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "mlops_assets.definitions",
         "--select", ",".join(training_path()), "--config-json", json.dumps({**FAST, **IN_PROCESS})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def _dagster_runs(env: dict[str, str]) -> int:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        return len(instance.get_run_records())


def _state(env: dict[str, str]) -> tuple[int, list[str], str | None]:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    try:
        champion = str(client.get_model_version_by_alias(MODEL, c.ALIAS_CHAMPION).version)
    except Exception:
        champion = None
    return len(runs), versions, champion


def _latest_meta(env: dict[str, str], asset: str) -> dict[str, object]:
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization is not None
        return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}


def test_a_second_run_on_unchanged_data_trains_nothing_and_a_new_file_retrains(tmp_path: Path) -> None:
    env = _env(tmp_path)
    _land(tmp_path / "data", rows=2000, seed=42)
    first_s, out = _pipeline(env)
    assert "launching a run" in out and "raw_dataset was never materialized" in out
    assert "champion: version 1" in out, out[-3000:]  # a run that trained ends with the status
    runs, versions, champion = _state(env)
    assert (runs, versions, champion) == (1, ["1"], "1")
    dagster_runs = _dagster_runs(env)

    second_s, out = _pipeline(env)
    # No Dagster run launched, no MLflow run, no model version, no alias moved; it says why.
    assert "skipped, no run launched: nothing on the training path is stale" in out, out[-3000:]
    # Nothing this command did touched the registry, so it skips the status (MLflow's import) and says so.
    assert "registry is as the last run left it" in out and "champion: version" not in out, out[-3000:]
    assert _dagster_runs(env) == dagster_runs
    assert _state(env) == (runs, versions, champion)
    print(f"\nstale-only training: first run {first_s:.1f}s, unchanged re-run {second_s:.1f}s "
          f"({second_s / first_s:.2f} of the first)")

    # Changed parameters are stale (what the run config says, with defaults filled in); so is a
    # changed training code version (the training sources' digest is in it).
    from mlops_assets.definitions import defs
    from mlops_assets.defs.training.staleness import training_staleness

    graph = defs.resolve_asset_graph()
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        same = training_staleness(instance, graph, training_path(), {**FAST, **IN_PROCESS}, None)
        more = {"ops": {"trained_model": {"config": {**FAST["ops"]["trained_model"]["config"], "iterations": 61}}}}
        changed = training_staleness(instance, graph, training_path(), more, None)
    assert not same.stale, same.reasons
    assert changed.reasons == ("trained_model: parameters changed (iterations 60 -> 61)",)
    assert "." in str(graph.get(dg.AssetKey("trained_model")).code_version)

    # A run launched anyway (the UI, a sensor) on unchanged data reuses the model and says why.
    _materialize(env)
    assert _state(env) == (runs, versions, champion)
    trained = _latest_meta(env, "trained_model")
    assert trained["skipped"] is True and "unchanged" in str(trained["skip_reason"])
    registered = _latest_meta(env, "registered_model")
    assert registered["skipped"] is True and registered["version"] == "1"

    # A new landed file is new data: it is stale, retrains and registers version 2.
    _land(tmp_path / "data", rows=1500, seed=43)
    third_s, out = _pipeline(env, gate_may_reject=True)  # the gate judges it; trained and registered either way
    assert "launching a run" in out and "raw_batches" in out, out[-3000:]
    runs_after, versions_after, _ = _state(env)
    assert runs_after == 2 and versions_after == ["1", "2"]
    assert _latest_meta(env, "trained_model")["skipped"] is False
    print(f"stale-only training: after a new file {third_s:.1f}s")


def _sensor_tick(sensor, instance: dg.DagsterInstance, defs: dg.Definitions, cursor: str | None):
    resources = platform_resources()
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                      resources={k: resources[k] for k in ("platform", "monitoring")})
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    skip = result.skip_reason.skip_message if result.skip_reason else ""
    return list(result.run_requests or []), skip, result


def _schedule_tick(instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
    from mlops_assets.defs.monitoring.sensors import retraining_schedule

    resources = platform_resources()
    context = dg.build_schedule_context(instance=instance, resources={k: resources[k] for k in ("platform", "monitoring")})
    return retraining_schedule(context)


def _labelled_traffic(data: Path, frame, version: str) -> None:
    """`frame`'s records logged as served by `version` a minute ago, and their true labels."""
    from mlops_assets.core.dataset_spec import default_spec
    from mlops_assets.serving.prediction_log import prediction_rows, write_part

    spec = default_spec()
    at = datetime.now(UTC) - timedelta(minutes=1)
    records = frame[spec.feature_names].astype(int).to_dict("records")
    rows = prediction_rows(request_id="req-labelled", model_version=version, records=records,
                           labels=frame[spec.label].tolist(), probabilities=[0.5] * len(frame), logged_at=at)
    write_part(rows, str(data / "predictions"), "part-labelled.parquet")
    (data / "labels").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"request_id": "req-labelled", "record_index": range(len(frame)), "label": frame[spec.label].tolist(),
                  "labelled_at": datetime.now(UTC).isoformat()}).to_csv(data / "labels" / "labels.csv", index=False)


def test_the_training_sensors_start_no_run_when_nothing_is_stale_and_new_data_gets_its_run(
        data_root: Path, simulated) -> None:
    """On a real instance whose training path was materialized: the file sensor and a drift event
    start no training run while nothing is stale and no labelled records wait (the SkipReason says
    so, the event stays unhandled); labelled records, then a new file, get their runs."""
    from mlops_assets.defs.ingestion.assets import INGEST_JOB, raw_files_sensor
    from mlops_assets.defs.monitoring.sensors import degradation_retraining_sensor, drift_retraining_sensor
    from mlops_assets.tools.simulator import write_batch
    from mlops_assets_tests.settings_support import platform_definitions

    defs = platform_definitions()
    ingest_job = defs.resolve_job_def(INGEST_JOB)
    assets = defs.resolve_implicit_global_asset_job_def()

    def ingest(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
        """What the daemon does with the file sensor's result: add the partitions, launch their runs."""
        for added in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(added.partitions_def_name, list(added.partition_keys or []))
        for request in result.run_requests or []:
            assert ingest_job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                                 tags=request.tags).success

    write_batch(simulated.head(1500), str(data_root / "raw"), name="a.csv")
    with dg.instance_for_test() as instance:
        requests, _, result = _sensor_tick(raw_files_sensor, instance, defs, None)
        files_cursor = result.cursor
        assert [r.job_name for r in requests] == [INGEST_JOB]
        ingest(instance, result)
        # `make pipeline` trains on the file before the sensor's next tick (the sensor's runs use the
        # assets' default parameters, so does this one).
        trained = assets.execute_in_process(instance=instance,
                                            asset_selection=[dg.AssetKey(a) for a in c.TRAINING_PATH_ASSETS])
        assert trained.success
        requests, skip, result = _sensor_tick(raw_files_sensor, instance, defs, files_cursor)
        files_cursor = result.cursor
        assert requests == [] and "1 new file(s) accepted, no training run: nothing on the training path is stale" in skip

        # A drift event with nothing new to learn from: no run, and the event is not spent.
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "drift_report", partition="2026-01-05-11:00", metadata={"drift_detected": True, "event_key": "drift-1-a"}))
        requests, skip, result = _sensor_tick(drift_retraining_sensor, instance, defs, None)
        assert requests == [], skip
        assert "drift event drift-1-a: no retraining, nothing new to learn from" in skip
        assert "nothing on the training path is stale" in skip and "no new labelled production records" in skip
        assert json.loads(result.cursor)["keys"] == []
        # The weekly schedule follows the same rule.
        scheduled = _schedule_tick(instance)
        assert isinstance(scheduled, dg.SkipReason) and "nothing new to learn from" in str(scheduled.skip_message)
        # Labelled production records arrive: the same event now gets its run, and so does the schedule.
        _labelled_traffic(data_root, simulated.iloc[1500:1700], version="1")
        requests, _, result = _sensor_tick(drift_retraining_sensor, instance, defs, result.cursor)
        assert [(r.run_key, r.tags["mlops_assets/trigger"]) for r in requests] == [("drift-1-a", "drift")]
        scheduled = _schedule_tick(instance)
        assert isinstance(scheduled, dg.RunRequest) and scheduled.tags["mlops_assets/trigger"] == "schedule"

        # A new landed file is new data: once ingested, the training path is stale for both sensors.
        write_batch(simulated.iloc[1700:2500], str(data_root / "raw"), name="b.csv")
        requests, _, result = _sensor_tick(raw_files_sensor, instance, defs, files_cursor)
        ingest(instance, result)
        [onward], _, _ = _sensor_tick(raw_files_sensor, instance, defs, result.cursor)
        assert onward.job_name == "ingestion_onward"
        instance.report_runless_asset_event(dg.AssetMaterialization(
            "online_performance", partition="2026-01-05-11:00", metadata={"degraded": True, "event_key": "degraded-1"}))
        requests, _, _ = _sensor_tick(degradation_retraining_sensor, instance, defs, None)
        assert [r.run_key for r in requests] == ["degraded-1"]
    assert not (data_root / "labels_staging").exists()  # asking reads the labels, it exports nothing

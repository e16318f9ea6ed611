"""Stale-only training through the command `make pipeline` runs (`mlops-assets pipeline`: ingest,
then train, which launches `dagster asset materialize` of the training path only when something in
it is stale, then status; a real instance in DAGSTER_HOME, MLflow on SQLite): a second run on
unchanged data launches no run, trains, registers and promotes nothing and says why; a run launched
anyway (the UI, a sensor) reuses the model; changed parameters are stale; a new file retrains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from mlops_assets import constants as c
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
    runs, versions, champion = _state(env)
    assert (runs, versions, champion) == (1, ["1"], "1")
    dagster_runs = _dagster_runs(env)

    second_s, out = _pipeline(env)
    # No Dagster run launched, no MLflow run, no model version, no alias moved; it says why.
    assert "skipped, no run launched: nothing on the training path is stale" in out, out[-3000:]
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

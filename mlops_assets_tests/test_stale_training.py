"""Stale-only training through the command `make pipeline` runs (`dagster asset materialize` of the
training path, one process per run, a real instance in DAGSTER_HOME, MLflow on SQLite): a second
run on unchanged data trains, registers and promotes nothing and says why; a new file retrains."""

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


def _pipeline(env: dict[str, str], gate_may_reject: bool = False) -> float:
    """`make pipeline`'s commands; returns the seconds they took. With `gate_may_reject` the run
    may fail at the blocking passed_gate check (a candidate that is registered, as challenger)."""
    started = time.monotonic()
    if "raw_batches" not in training_path():  # landed files become batches first
        ingest = subprocess.run([str(Path(sys.executable).with_name("mlops-assets")), "ingest"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert ingest.returncode == 0, ingest.stdout[-3000:] + ingest.stderr[-3000:]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "mlops_assets.definitions",
         "--select", ",".join(training_path()), "--config-json", json.dumps({**FAST, **IN_PROCESS})],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    rejected = gate_may_reject and "registered_model: passed_gate" in done.stdout + done.stderr
    assert done.returncode == 0 or rejected, done.stdout[-4000:] + done.stderr[-4000:]
    return time.monotonic() - started


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
    first_s = _pipeline(env)
    runs, versions, champion = _state(env)
    assert (runs, versions, champion) == (1, ["1"], "1")

    second_s = _pipeline(env)
    # No MLflow run, no model version, no alias moved; the run says why it skipped.
    assert _state(env) == (runs, versions, champion)
    trained = _latest_meta(env, "trained_model")
    assert trained["skipped"] is True and "unchanged" in str(trained["skip_reason"])
    registered = _latest_meta(env, "registered_model")
    assert registered["skipped"] is True and registered["version"] == "1"
    print(f"\nstale-only training: first run {first_s:.1f}s, unchanged re-run {second_s:.1f}s "
          f"({second_s / first_s:.2f} of the first)")

    # A new landed file is new data: it retrains and registers version 2.
    _land(tmp_path / "data", rows=1500, seed=43)
    third_s = _pipeline(env, gate_may_reject=True)  # the gate judges it; it is trained and registered either way
    runs_after, versions_after, _ = _state(env)
    assert runs_after == 2 and versions_after == ["1", "2"]
    assert _latest_meta(env, "trained_model")["skipped"] is False
    print(f"stale-only training: after a new file {third_s:.1f}s")

"""The production configuration on a real PostgreSQL server: a Dagster instance loaded from
deploy/production/dagster.yaml (run, event log and schedule storage on Postgres) materializes the
training path with MLflow tracking and registry on Postgres; runs and registry writes happen
concurrently, from several processes and threads, and all succeed.

The server: MLOPS_TEST_POSTGRES_URL (a role that may create databases; `.ci/run` starts one and
exports it), else a private cluster started here from the installed server binaries. With
neither, the tests fail under CI=true and skip elsewhere, saying why.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.registry import model_store
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets.training import tracking
from mlops_assets_tests.postgres_support import (
    URL_ENV,
    admin,
    mlflow_uri,
    postgres_server_url,
    unavailable,
    with_db,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PRODUCTION_INSTANCE = REPO / "deploy" / "production" / "dagster.yaml"
MODEL = "pg-classifier"
FAST = {"ops": {"trained_model": {"config": {"iterations": 60, "thread_count": 1}}}}
# One process per run: the default multiprocess executor re-imports the code location per step.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
CONCURRENT_RUNS = 2
REGISTRY_THREADS = 8


def training_path() -> list[str]:
    """The asset selection of `make pipeline` (and of CI's smoke run), read from the Makefile."""
    found = re.search(r"^TRAINING_PATH := (.+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found, "Makefile defines TRAINING_PATH"
    return found.group(1).strip().split(",")


def test_without_a_server_ci_fails_and_elsewhere_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        unavailable("no PostgreSQL")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL"):
        unavailable("no PostgreSQL")


@pytest.fixture()
def databases(postgres_url: str) -> Iterator[dict[str, str]]:
    """Fresh `dagster` and `mlflow` databases for one test, dropped afterwards."""
    suffix = secrets.token_hex(4)
    names = {"dagster": f"dagster_{suffix}", "mlflow": f"mlflow_{suffix}"}
    try:
        conn = admin(postgres_url)
    except Exception as exc:  # a named server that does not answer is an environment problem
        unavailable(f"cannot connect to the PostgreSQL server of {URL_ENV}: {type(exc).__name__}")
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {role: with_db(postgres_url, name) for role, name in names.items()}
    finally:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


# --- the platform on Postgres -------------------------------------------------------------------


@dataclass
class Platform:
    root: Path
    home: Path
    # URLs with the database password: kept out of the repr pytest prints for a failing test.
    env: dict[str, str] = field(repr=False)
    tracking_uri: str = field(repr=False)
    mlflow_db: str = field(repr=False)

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A superuser URL of a running server: the one CI names, else a private one started here."""
    yield from postgres_server_url()


def _dagster_pg_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {"DAGSTER_PG_HOST": parts.hostname or "127.0.0.1", "DAGSTER_PG_PORT": str(parts.port or 5432),
            "DAGSTER_PG_USER": parts.username or "", "DAGSTER_PG_PASSWORD": parts.password or "",
            "DAGSTER_PG_DB": parts.path.lstrip("/")}


@pytest.fixture()
def platform(databases: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    """DAGSTER_HOME with the production dagster.yaml, MLflow on Postgres, every setting by env."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PRODUCTION_INSTANCE, home / "dagster.yaml")
    env = {
        "DAGSTER_HOME": str(home),
        **_dagster_pg_env(databases["dagster"]),
        "MLFLOW_TRACKING_URI": mlflow_uri(databases["mlflow"]),
        "MLOPS_MLFLOW_ARTIFACT_ROOT": (tmp_path / "artifacts").as_uri(),
        "MLOPS_MODEL_NAME": MODEL,
        "MLOPS_DATA_URL": str(tmp_path / "data"),
        "MLOPS_ACTOR": "test-postgres",
    }
    for key in ("MLOPS_LANDING_URL", "MLOPS_DATASET_SPEC", "MLFLOW_UI_URL", "MLOPS_MLFLOW_EXPERIMENT",
                "MLOPS_PREDICTION_LOG_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # MLflow creates its tables on first use; do it once here, as `mlflow server`/`mlflow db upgrade`
    # does in production, so concurrent first connections do not race on the schema migration.
    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()
    with tracking.use_tracking_uri(env["MLFLOW_TRACKING_URI"]):
        yield Platform(tmp_path, home, env, env["MLFLOW_TRACKING_URI"], databases["mlflow"])


def _land(data: Path, rows: int = 2000, seed: int = 42) -> Path:
    return Path(write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=rows, seed=seed)),
                            str(data / "raw"), name=f"batch-{seed}.csv"))


def _materialize_cli(env: dict[str, str], data: Path) -> subprocess.Popen[str]:
    """`dagster asset materialize` of the training path, as CI's smoke run and `make pipeline` do."""
    full = {**os.environ, **env, "MLOPS_DATA_URL": str(data)}
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "mlops_assets.definitions",
         "--select", ",".join(training_path()), "--config-json", json.dumps({**FAST, **IN_PROCESS})],
        cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_the_production_instance_config_puts_every_storage_on_postgres(platform: Platform) -> None:
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    assert platform.tracking_uri.startswith("postgresql+psycopg2://")
    # MLflow made its tables in the mlflow database: tracking and registry.
    with admin(platform.mlflow_db) as conn, conn.cursor() as cur:
        cur.execute("select tablename from pg_tables where schemaname = 'public'")
        tables = {row[0] for row in cur.fetchall()}
    assert {"experiments", "runs", "registered_models", "model_versions", "alembic_version"} <= tables


def test_the_training_path_materializes_on_postgres_and_concurrent_runs_succeed(platform: Platform) -> None:
    from mlops_assets_tests.settings_support import platform_definitions

    # Built from this test's environment: definitions imported earlier in the session hold another data root.
    defs = platform_definitions()
    from mlops_assets.defs.ingestion.assets import INGEST_JOB

    # 1. One run in this process, on the instance that DAGSTER_HOME names.
    _land(platform.root / "data")
    _ingest_first(platform.env, platform.root / "data")
    started = time.monotonic()
    with dg.DagsterInstance.get() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        first = job.execute_in_process(instance=instance, run_config=FAST, raise_on_error=False,
                                       asset_selection=[dg.AssetKey(k) for k in training_path()])
    first_s = time.monotonic() - started
    assert first.success, [e.message for e in first.all_events if e.is_failure]
    client = platform.client()
    assert model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION) == "1"

    # 2. Two more runs at the same time, from two processes through the CLI, on the same instance
    #    and the same MLflow database and registered model (each with its own data folder and data:
    #    the same data as the first run would train nothing, see test_stale_training.py).
    for i in range(CONCURRENT_RUNS):
        _land(platform.root / f"data{i}", seed=43 + i)
        _ingest_first(platform.env, platform.root / f"data{i}")
    started = time.monotonic()
    procs = [_materialize_cli(platform.env, platform.root / f"data{i}") for i in range(CONCURRENT_RUNS)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    concurrent_s = time.monotonic() - started
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-4000:]

    with dg.DagsterInstance.get() as instance:
        # The training runs (each landed file also had its own raw_batches partition run).
        runs = [r for r in instance.get_runs() if r.job_name != INGEST_JOB]
        assert len(runs) == 1 + CONCURRENT_RUNS
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        # Their lifetimes overlapped: both started before either ended.
        records = [r for r in instance.get_run_records() if r.dagster_run.job_name != INGEST_JOB]
        cli_runs = [r for r in records if r.dagster_run.run_id != first.run_id]
        assert max(r.start_time for r in cli_runs) < min(r.end_time for r in cli_runs)  # type: ignore[operator]
        registered = instance.fetch_materializations(dg.AssetKey("registered_model"), limit=10).records
        assert {r.run_id for r in registered} == {r.dagster_run.run_id for r in records}
        for asset in training_path():
            assert len(instance.fetch_materializations(dg.AssetKey(asset), limit=10).records) == 3, asset

    # Every run tracked in MLflow on Postgres and registered as its own version, tagged with its run.
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {v.tags["dagster_run_id"] for v in versions} == {r.dagster_run.run_id for r in records}
    for v in versions:
        run = client.get_run(v.run_id)
        assert run.info.status == "FINISHED" and "test_roc_auc" in run.data.metrics
        assert v.tags[model_store.TAG_SHA256]
    batches = ingestion.accepted_batches(str(platform.root / "data" / "batches"))
    [first_version] = [v for v in versions if str(v.version) == "1"]  # the in-process run's, on `data`
    assert first_version.tags["raw_dataset_version"] == ingestion.dataset_version([b.batch_id for b in batches])
    print(f"\npostgres: first run {first_s:.1f}s; {CONCURRENT_RUNS} concurrent CLI runs {concurrent_s:.1f}s")


def _tiny_model() -> tuple[CatBoostClassifier, pd.DataFrame]:
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.integers(-1, 2, size=(200, 4)), columns=["a", "b", "c", "d"])
    y = (X["a"] + X["b"] > 0).astype(int)
    model = CatBoostClassifier(iterations=10, depth=2, verbose=False, thread_count=1, allow_writing_files=False)
    model.fit(X, y)
    return model, X


def test_concurrent_registry_writes_succeed_and_leave_one_promotion_chain(platform: Platform) -> None:
    """Threads register versions, promote and tag them at once: no lost or duplicated version, and
    the aliases and the history agree (the advisory lock serializes the alias moves)."""
    import mlflow

    from mlops_assets_tests.test_model_store import assert_one_promotion_chain

    client = platform.client()
    assert model_store.lock_kind(platform.tracking_uri) == "postgres"
    experiment = tracking.ensure_experiment(client, "concurrent", (platform.root / "artifacts").as_uri())
    model, X = _tiny_model()
    logged: list[tuple[str, str]] = []
    for _ in range(REGISTRY_THREADS):
        with mlflow.start_run(experiment_id=experiment) as run:
            info = model_store.log_catboost_model(model, input_example=X.head(3))
            logged.append((run.info.run_id, info.model_uri))

    barrier = threading.Barrier(REGISTRY_THREADS)
    errors: list[BaseException] = []
    results: dict[str, str] = {}

    def write(run_id: str, model_uri: str) -> None:
        try:
            own = MlflowClient(tracking_uri=platform.tracking_uri)
            barrier.wait(timeout=60)
            mv = model_store.register_version(own, MODEL, run_id=run_id, model_uri=model_uri,
                                              tags={"writer": run_id}, by="test-postgres")
            barrier.wait(timeout=120)  # every promotion at the same moment: the race the lock must win
            model_store.promote_to_champion(own, MODEL, str(mv.version), by="test-postgres")
            own.set_model_version_tag(MODEL, str(mv.version), "reviewed", "yes")
            results[run_id] = str(mv.version)
        except BaseException as exc:  # collected and asserted in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=item) for item in logged]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    elapsed = time.monotonic() - started
    assert not errors, errors
    assert sorted(int(v) for v in results.values()) == list(range(1, REGISTRY_THREADS + 1))
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert len(versions) == REGISTRY_THREADS
    for run_id, version in results.items():
        assert versions[version].run_id == run_id and versions[version].tags["writer"] == run_id
        assert versions[version].tags["reviewed"] == "yes" and versions[version].tags[model_store.TAG_SHA256]
    # Champion = the last promoted, previous-champion = the one before, every promotion once.
    assert_one_promotion_chain(client, MODEL, list(results.values()))
    events = model_store.history(client, MODEL)
    assert sum(e.action == "register" for e in events) == REGISTRY_THREADS
    assert all(e.by == "test-postgres" for e in events)
    print(f"\npostgres: {REGISTRY_THREADS} concurrent register+promote+tag writers in {elapsed:.1f}s")


def _ingest_first(env: dict[str, str], data: Path) -> None:
    """When the training path starts at raw_dataset, landed files become batches through
    `mlops-assets ingest` first, as `make pipeline` does."""
    if "raw_batches" in training_path():
        return
    done = subprocess.run([str(Path(sys.executable).with_name("mlops-assets")), "ingest"], cwd=REPO,
                          env={**os.environ, **env, "MLOPS_DATA_URL": str(data)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_concurrent_training_runs_on_different_data_each_record_their_own_versions(platform: Platform) -> None:
    """Two `dagster asset materialize` processes at once, same Postgres instance and registry, each
    on its own data root: each model's tags, metadata.json, model card and trace name its own data."""
    from mlops_assets.registry import governance

    roots = {"left": platform.root / "left", "right": platform.root / "right"}
    _land(roots["left"], rows=2000, seed=11)
    _land(roots["right"], rows=2600, seed=12)
    for root in roots.values():
        _ingest_first(platform.env, root)
    procs = {side: _materialize_cli(platform.env, root) for side, root in roots.items()}
    outputs = {side: p.communicate(timeout=900)[0] for side, p in procs.items()}
    for side, proc in procs.items():
        assert proc.returncode == 0, outputs[side][-4000:]

    client = platform.client()
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 2
    with dg.DagsterInstance.get() as instance:
        records = [r for r in instance.get_run_records() if "trained_model" in
                   {k.to_user_string() for k in (r.dagster_run.asset_selection or set())}]
        assert len(records) == 2
        assert max(r.start_time for r in records) < min(r.end_time for r in records)  # type: ignore[operator]
        by_run = {r.run_id: r for r in instance.fetch_materializations(dg.AssetKey("trained_model"), limit=10).records}
    for side, root in roots.items():
        batches = ingestion.accepted_batches(str(root / "batches"))
        data_version = ingestion.dataset_version([b.batch_id for b in batches])
        # One feature version per data (beside it, by-input: which inputs made which version).
        [feature_dir] = [p.name for p in (root / "features").iterdir() if p.is_dir() and p.name != "by-input"]
        own = [v for v in versions if v.tags["raw_dataset_version"] == data_version]
        # The old design failed here: both versions named the data version of whichever run
        # materialized train_test_split last.
        assert len(own) == 1, (side, data_version, [v.tags["raw_dataset_version"] for v in versions])
        [mv] = own
        assert mv.tags["data_version"] == data_version and mv.tags["feature_version"] == feature_dir, side
        # The Dagster materialization of that run says the same.
        meta = by_run[mv.tags["dagster_run_id"]].asset_materialization.metadata
        assert (meta["data_version"].value, meta["feature_version"].value) == (data_version, feature_dir), side
        # metadata.json, written from the trained_model record.
        stored = tracking.read_metadata_json(client, mv.run_id)
        assert stored["batch_ids"] == [b.batch_id for b in batches] and stored["feature_version"] == feature_dir
        assert Path(stored["feature_path"]).parent == root / "features" / feature_dir
        # The model card lists this data set's batches and versions, not the other's.
        card = governance.read_model_card(client, mv.tags[governance.TAG_MODEL_CARD])
        assert data_version in card and feature_dir in card and all(b.batch_id in card for b in batches), side
        other = roots["right" if side == "left" else "left"]
        assert not any(b.batch_id in card for b in ingestion.accepted_batches(str(other / "batches"))), side
        # trace: every link resolves, to this data set's batches (re-hashed) and feature file.
        sources = governance.TraceSources(prediction_log_url=str(root / "predictions"),
                                          tracking_uri=platform.tracking_uri, model_name=MODEL,
                                          batches_url=str(platform.root / "no-such-store"))
        report = governance.trace_version(str(mv.version), sources)
        assert report["data"]["raw_dataset_version"] == data_version
        assert [b["batch_id"] for b in report["data"]["batches"]] == [b.batch_id for b in batches]
        assert report["data"]["exists"] and report["features"]["exists"], report["broken"]
        assert report["features"]["feature_version"] == feature_dir

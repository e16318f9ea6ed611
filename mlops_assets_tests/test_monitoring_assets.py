"""The monitoring assets materialized for real: a registered CatBoost version in a SQLite MLflow
registry, prediction log parts written by the serving writer, labels files in the landing folder,
and a test Dagster instance. No Ray: the endpoint is unreachable, so the champion is what serves."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostClassifier
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.defs.monitoring.assets import (
    DEGRADATION_CHECK,
    FRESH_DATA_CHECK,
    NO_DRIFT_CHECK,
    MonitoringResource,
    drift_report,
    labelled_production_batch,
    online_performance,
    production_profiles,
    reference_profile,
)
from mlops_assets.defs.resources import MlflowResource, ParquetIOManager, PlatformResource, RayServeResource
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.monitoring import drift
from mlops_assets.monitoring import live as mon
from mlops_assets.registry import model_store
from mlops_assets.serving.prediction_log import prediction_rows, write_part
from mlops_assets.tools.simulator import SimulationConfig, simulate_records
from mlops_assets_tests.e2e_support import check_named, metadata_of

pytestmark = pytest.mark.integration

MODEL = "monitoring-test-classifier"
DRIFTED = {"SSLfinal_State": 0.6, "URL_of_Anchor": 0.6, "having_Sub_Domain": 0.6, "web_traffic": 0.6}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    root: Path
    tracking_uri: str
    spec: DatasetSpec
    model: CatBoostClassifier
    run_id: str
    train: pd.DataFrame  # a train_test_split-shaped frame
    offline_accuracy: float

    def resources(self, data: Path) -> dict:
        port = _closed_port()  # nothing listens: the endpoint is "unknown", the champion serves
        return {
            "platform": PlatformResource.at(str(data)),
            "io_manager": ParquetIOManager(base_url=str(data / "assets")),
            "mlflow": MlflowResource(tracking_uri=self.tracking_uri, artifact_root=(self.root / "artifacts").as_uri(),
                                     experiment="monitoring-test", model_name=MODEL),
            "ray_serve": RayServeResource(dashboard_url=f"http://127.0.0.1:{port}",
                                          serve_url=f"http://127.0.0.1:{port}", api_token="unused"),
            "monitoring": MonitoringResource(prediction_log_url=str(data / "predictions"),
                                             labels_url=str(data / "labels")),
        }

    def cli_args(self) -> dict:
        return {"root": str(self.root), "tracking_uri": self.tracking_uri}

    @staticmethod
    def resources_for(args: dict) -> dict:
        """The same resources, in another process (a definitions file for the CLI)."""
        from types import SimpleNamespace

        where = SimpleNamespace(root=Path(args["registry"]["root"]), tracking_uri=args["registry"]["tracking_uri"])
        return Registry.resources(where, Path(args["data"]))  # type: ignore[arg-type]

    def predict(self, frame: pd.DataFrame) -> tuple[list[int], list[float]]:
        p = self.model.predict_proba(frame[self.spec.feature_names])[:, 1]
        labels = np.where(p >= 0.5, self.spec.positive_class, self.spec.negative_class)
        return labels.astype(int).tolist(), p.astype(float).tolist()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    spec = default_spec()
    raw = simulate_records(spec, SimulationConfig(n_rows=2500, seed=5)).drop_duplicates(spec.feature_names)
    y = (raw[spec.label] == spec.positive_class).astype(int)
    model = CatBoostClassifier(iterations=60, depth=4, random_seed=1, verbose=False, thread_count=1,
                               allow_writing_files=False)
    model.fit(raw[spec.feature_names], y)
    test = simulate_records(spec, SimulationConfig(n_rows=1500, seed=6))
    accuracy = float((np.where(model.predict_proba(test[spec.feature_names])[:, 1] >= 0.5, spec.positive_class,
                               spec.negative_class) == test[spec.label]).mean())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("monitoring-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = model_store.log_catboost_model(model, input_example=raw[spec.feature_names].head(5))
        client = MlflowClient(tracking_uri=tracking_uri)
        model_store.register_version(client, MODEL, run_id=run.info.run_id, model_uri=info.model_uri, tags={
            "decision_threshold": "0.5", "metric.test_accuracy": f"{accuracy:.6f}"})
        model_store.promote_to_champion(client, MODEL, "1")
    finally:
        mlflow.set_tracking_uri(previous)
    split = raw[spec.feature_names].assign(target=y.to_numpy(), split="train")
    yield Registry(root, tracking_uri, spec, model, run.info.run_id, split, accuracy)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _log_traffic(reg: Registry, data: Path, n: int, seed: int, at: datetime, drift_: dict | None = None,
                 per_request: int = 10, version: str = "1") -> pd.DataFrame:
    """Score simulated records with the champion and write them as the serving writer does."""
    frame = simulate_records(reg.spec, SimulationConfig(n_rows=n, seed=seed, drift=drift_ or {}))
    labels, probabilities = reg.predict(frame)
    rows, ids = [], []
    for start in range(0, n, per_request):
        request_id = f"req-{seed}-{start}"
        stop = min(start + per_request, n)
        records = frame[reg.spec.feature_names].iloc[start:stop].astype(int).to_dict("records")
        rows += prediction_rows(request_id=request_id, model_version=version, records=records,
                                labels=labels[start:stop], probabilities=probabilities[start:stop],
                                logged_at=at + timedelta(seconds=start / n))
        ids += [(request_id, i) for i in range(stop - start)]
    write_part(rows, str(data / "predictions"), f"part-{seed}-v{version}.parquet")
    return frame.assign(request_id=[r for r, _ in ids], record_index=[i for _, i in ids], predicted=labels)


def _materialize(reg: Registry, data: Path, instance: dg.DagsterInstance, assets: list, selection=None,
                 run_config: dict | None = None, hour: datetime | None = None) -> dg.ExecuteInProcessResult:
    """One run; the monitoring assets for the partition of `hour` (their window)."""
    key = _key(hour) if hour is not None else None
    return dg.materialize(assets, resources=reg.resources(data), instance=instance, selection=selection,
                          run_config=run_config, raise_on_error=False, partition_key=key)


def _key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:00")


def _registered_stand_in(reg: Registry) -> list[dg.AssetsDefinition]:
    @dg.asset(name="registered_model")
    def _registered() -> dict:
        return {"model_name": MODEL, "version": "1", "run_id": reg.run_id, "champion_version": "1"}

    @dg.asset(name="train_test_split")
    def _split() -> pd.DataFrame:
        return reg.train

    return [_registered, _split]


def test_reference_profile_is_stored_with_the_version_in_the_data_root_and_mlflow(registry: Registry, data: Path):
    with dg.instance_for_test() as instance:
        result = _materialize(registry, data, instance, [*_registered_stand_in(registry), reference_profile])
    assert result.success
    meta = metadata_of(result, "reference_profile")
    local = data / "profiles" / "reference" / "1" / "profile.bin"
    summary = drift.profile_summary(local.read_bytes())
    assert summary["n_rows"] == len(registry.train) == meta["rows"]
    # The predictions in the reference are the version's own answers on its training rows.
    labels, probabilities = registry.predict(registry.train)
    assert summary["columns"][mon.PREDICTED_LABEL]["values"] == dict(sorted(pd.Series(labels).value_counts().items()))
    assert summary["columns"][mon.PROBABILITY]["mean"] == pytest.approx(np.mean(probabilities), abs=1e-9)
    assert meta["predicted_positive_share"] == pytest.approx(np.mean(np.array(labels) == -1), abs=1e-6)
    # The same bytes are an artifact of the version's MLflow run.
    client = MlflowClient(tracking_uri=registry.tracking_uri)
    downloaded = client.download_artifacts(registry.run_id, "monitoring/reference_profile.bin", str(data))
    assert Path(downloaded).read_bytes() == local.read_bytes()


def test_reference_profile_and_model_deployment_load_their_inputs_only_from_their_own_run(
        registry: Registry, data: Path):
    """Run alone after a run that materialized registered_model and train_test_split, neither reads
    those materializations: each fails at loading its input, naming what to select (and, for the
    deployment, the command that serves the champion without a run)."""
    from mlops_assets.defs.deployment.assets import model_deployment

    with dg.instance_for_test() as instance:
        stand_ins = _registered_stand_in(registry)
        assert _materialize(registry, data, instance, [*stand_ins, reference_profile]).success
        profile = data / "profiles" / "reference" / "1" / "profile.bin"
        profile.unlink()
        for asset in (reference_profile, model_deployment):
            alone = _materialize(registry, data, instance, [*stand_ins, asset], selection=[asset.key])
            assert not alone.success
            [failure] = [e for e in alone.all_events if e.is_step_failure]
            message = str(failure.event_specific_data)
            name = asset.key.to_user_string()
            assert f"{name} loads " in message and "only from its own run" in message and "select " in message
            assert ("mlops-assets serve restore" in message) == (name == "model_deployment")
            assert not alone.asset_materializations_for_node(name)
    assert not profile.exists()  # nothing was profiled from another run's values


def test_normal_traffic_passes_drifted_traffic_fails_the_drift_check(registry: Registry, data: Path):
    hour = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assets = [*_registered_stand_in(registry), reference_profile, production_profiles, drift_report]
    with dg.instance_for_test() as instance:
        assert _materialize(registry, data, instance, assets, selection=["registered_model", "train_test_split", "reference_profile"]).success
        _log_traffic(registry, data, 600, seed=21, at=hour)
        normal = _materialize(registry, data, instance, assets, selection=["production_profiles", "drift_report"],
                              hour=hour)
        assert normal.success
        _log_traffic(registry, data, 600, seed=22, at=hour + timedelta(hours=1), drift_=DRIFTED)
        drifted = _materialize(registry, data, instance, assets, selection=["production_profiles", "drift_report"],
                               hour=hour + timedelta(hours=1))
        assert drifted.success

    ok, bad = metadata_of(normal, "drift_report"), metadata_of(drifted, "drift_report")
    assert check_named(normal, NO_DRIFT_CHECK).passed and ok["drift_detected"] is False
    assert ok["serving_version"] == "1" and ok["serving_source"] == "registry champion"
    assert ok["n_drifted_features"] == 0 and ok["rows"] == 600 and ok["window"] == "2026-01-05T10:00:00Z"
    assert not check_named(drifted, NO_DRIFT_CHECK).passed and bad["drift_detected"] is True
    assert set(bad["drifted_features"].split(", ")) == set(DRIFTED)  # exactly the drifted ones
    assert bad["event_key"] == "drift-1-20260105T110000Z"
    # Numeric metadata per feature, so the UI plots each over runs.
    for feature in registry.spec.feature_names:
        assert isinstance(bad[f"drift/{feature}"], float)
    assert min(bad[f"drift/{f}"] for f in DRIFTED) > c.DRIFT_HELLINGER > max(ok[f"drift/{f}"] for f in DRIFTED)
    print(f"drift: normal max Hellinger {ok['max_feature_statistic']:.3f}, prediction KS {ok['prediction_ks']:.3f}; "
          f"drifted min Hellinger {min(bad[f'drift/{f}'] for f in DRIFTED):.3f}")

    # The same verdict as gauges for Prometheus (deploy/monitoring/ reads them).
    prom = (data / "metrics" / "drift_report.prom").read_text()
    assert 'mlops_drift_detected{model_version="1"} 1.0' in prom
    assert 'mlops_drift_feature_statistic{feature="SSLfinal_State",model_version="1"}' in prom

    # Per-window profiles merge into the profile of the whole log, and into the day's profile.
    windows = sorted((data / "profiles" / "production" / "3600s").glob("*/1.bin"))
    assert len(windows) == 2
    merged = drift.profile_summary(drift.merge_profiles(p.read_bytes() for p in windows))
    assert merged["n_rows"] == 1200
    whole = mon.read_prediction_log(str(data / "predictions"))
    assert merged["columns"]["URL_Length"]["values"] == dict(sorted(whole["URL_Length"].value_counts().items()))
    day = drift.profile_summary((data / "profiles" / "production" / "daily" / "2026-01-05" / "1.bin").read_bytes())
    assert day["n_rows"] == 1200 and day["columns"]["URL_Length"]["values"] == merged["columns"]["URL_Length"]["values"]
    # Each window is a partition of its own, with its own scores.
    assert [e.partition for e in (normal.asset_materializations_for_node("drift_report")
                                  + drifted.asset_materializations_for_node("drift_report"))] == [
        "2026-01-05-10:00", "2026-01-05-11:00"]


def test_drift_thresholds_are_config(registry: Registry, data: Path):
    hour = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assets = [*_registered_stand_in(registry), reference_profile, production_profiles, drift_report]
    _log_traffic(registry, data, 600, seed=22, at=hour, drift_=DRIFTED)
    lenient = {"ops": {"drift_report": {"config": {"hellinger": 0.9, "ks_statistic": 0.9}}}}
    with dg.instance_for_test() as instance:
        result = _materialize(registry, data, instance, assets, run_config=lenient,
                              selection=["registered_model", "train_test_split", "reference_profile", "production_profiles",
                                         "drift_report"], hour=hour)
    assert result.success and check_named(result, NO_DRIFT_CHECK).passed
    assert metadata_of(result, "drift_report")["n_drifted_features"] == 0


def test_without_a_local_reference_the_mlflow_artifact_is_used_and_every_version_s_rows_are_judged(
        registry: Registry, data: Path, tmp_path: Path):
    other = tmp_path / "other-data-root"
    with dg.instance_for_test() as instance:  # the version's reference, logged to its MLflow run
        assert _materialize(registry, other, instance, [*_registered_stand_in(registry), reference_profile]).success
    at = datetime(2026, 1, 5, 10, tzinfo=UTC)
    _log_traffic(registry, data, 300, seed=23, at=at)
    with dg.instance_for_test() as instance:
        result = _materialize(registry, data, instance, [production_profiles, drift_report], hour=at)
        assert not (data / "profiles" / "reference").exists()
        meta = metadata_of(result, "drift_report")
        assert meta["judged"] is True and meta["reference"] == f"runs:/{registry.run_id}/monitoring/reference_profile.bin"

        # Traffic another version answered is still the traffic: judged against the serving reference.
        for part in (data / "predictions").rglob("*.parquet"):
            frame = pd.read_parquet(part).assign(model_version="7")
            frame.to_parquet(part, index=False)
        again = _materialize(registry, data, instance, [production_profiles, drift_report], hour=at)
    meta = metadata_of(again, "drift_report")
    assert meta["judged"] is True and meta["serving_version"] == "1" and meta["rows"] == 300
    assert meta["rows_by_version"] == "v7: 300" and check_named(again, NO_DRIFT_CHECK).passed


def test_a_window_split_between_versions_is_judged_on_all_its_rows(registry: Registry, data: Path):
    # The incident: drifted traffic, 64 rows answered by v1 and 66 by v2 before a switch back to v1.
    # Neither part reaches the 100-row minimum; together they do, and the drift is found.
    at = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)
    assets = [*_registered_stand_in(registry), reference_profile, production_profiles, drift_report]
    _log_traffic(registry, data, 64, seed=31, at=at, drift_=DRIFTED, version="1")
    _log_traffic(registry, data, 66, seed=32, at=at + timedelta(minutes=1), drift_=DRIFTED, version="2")
    with dg.instance_for_test() as instance:
        result = _materialize(registry, data, instance, assets, hour=at)
    assert result.success
    meta = metadata_of(result, "drift_report")
    assert meta["judged"] is True and meta["serving_version"] == "1" and meta["rows"] == 130
    assert meta["rows_by_version"] == "v1: 64, v2: 66"
    assert not check_named(result, NO_DRIFT_CHECK).passed and meta["drift_detected"] is True
    assert meta["event_key"] == "drift-1-20260105T100000Z"
    assert set(DRIFTED) <= set(meta["drifted_features"].split(", "))


def test_a_profiles_run_applies_the_log_s_retention_and_never_touches_the_current_hour(registry: Registry, data: Path):
    old = datetime(2026, 1, 5, 10, tzinfo=UTC)
    _log_traffic(registry, data, 100, seed=51, at=old)
    _log_traffic(registry, data, 100, seed=52, at=datetime.now(UTC))
    resources = {**registry.resources(data), "monitoring": MonitoringResource(
        prediction_log_url=str(data / "predictions"), labels_url=str(data / "labels"),
        prediction_log_retention_days=1, prediction_log_retention_action="delete")}
    with dg.instance_for_test() as instance:
        result = dg.materialize([production_profiles], resources=resources, instance=instance, partition_key=_key(old))
    meta = metadata_of(result, "production_profiles")
    assert meta["log_rows"] == 100  # the window is profiled first, then the retention runs
    assert meta["retention_action"] == "delete" and meta["retention_hours"] == 1
    assert not (data / "predictions" / "date=2026-01-05").exists()
    assert len(mon.read_prediction_log(str(data / "predictions"))) == 100  # the current hour's rows stay
    assert (data / "profiles" / "production" / "3600s" / "20260105T100000Z" / "1.bin").exists()


def test_data_freshness_check_and_the_freshness_policy(registry: Registry, data: Path):
    from dagster._core.definitions.freshness import FreshnessState
    from dagster._core.definitions.freshness_evaluator import TimeWindowFreshnessPolicyEvaluator
    from dagster._core.loader import LoadingContextForTest
    from dagster._core.test_utils import freeze_time

    now = datetime.now(UTC)
    _log_traffic(registry, data, 200, seed=24, at=now - timedelta(hours=5))
    with dg.instance_for_test() as instance:
        stale = _materialize(registry, data, instance, [production_profiles], hour=now - timedelta(hours=5))
        _log_traffic(registry, data, 200, seed=25, at=now - timedelta(minutes=2))
        # The hour being written is no partition yet; the check looks at the newest record of the log.
        fresh = _materialize(registry, data, instance, [production_profiles], hour=now - timedelta(hours=1))

        # Dagster's own evaluator of the asset's FreshnessPolicy (what the UI shows), at three times.
        node = dg.Definitions(assets=[production_profiles], resources=registry.resources(data)).resolve_asset_graph().get(dg.AssetKey("production_profiles"))
        evaluator = TimeWindowFreshnessPolicyEvaluator()

        def state(at: datetime) -> FreshnessState:
            import asyncio

            with freeze_time(at):
                return asyncio.run(evaluator.evaluate_freshness(LoadingContextForTest(instance), node))

        lag = timedelta(minutes=c.PROFILES_MAX_LAG_MINUTES)
        assert state(datetime.now(UTC) + timedelta(minutes=1)) == FreshnessState.PASS
        assert state(datetime.now(UTC) + lag / 2 + timedelta(minutes=1)) == FreshnessState.WARN
        assert state(datetime.now(UTC) + lag + timedelta(minutes=1)) == FreshnessState.FAIL

    assert stale.success and not check_named(stale, FRESH_DATA_CHECK).passed
    assert "old (>" in check_named(stale, FRESH_DATA_CHECK).description
    assert check_named(fresh, FRESH_DATA_CHECK).passed
    assert 100 < metadata_of(fresh, "production_profiles")["newest_record_age_seconds"] < 600


def _write_labels(data: Path, traffic: pd.DataFrame, spec: DatasetSpec, flip_share: float, name: str) -> pd.DataFrame:
    labels = traffic[["request_id", "record_index", spec.label]].rename(columns={spec.label: "label"})
    flip = np.random.default_rng(0).random(len(labels)) < flip_share
    labels.loc[flip, "label"] = -labels.loc[flip, "label"]
    labels["labelled_at"] = datetime.now(UTC).isoformat()
    (data / "labels").mkdir(parents=True, exist_ok=True)
    labels.to_csv(data / "labels" / name, index=False)
    return labels


def test_online_performance_joins_labels_and_judges_degradation(registry: Registry, data: Path):
    spec = registry.spec
    hour = datetime(2026, 1, 5, 10, tzinfo=UTC)
    traffic = _log_traffic(registry, data, 400, seed=26, at=hour)
    _log_traffic(registry, data, 100, seed=28, at=hour + timedelta(hours=1))  # another window: not counted
    # 300 true labels, plus one label for a prediction that was never logged.
    labels = _write_labels(data, traffic.head(300), spec, 0.0, "good.csv")
    pd.DataFrame({"request_id": ["never-logged"], "record_index": [0], "label": [1],
                  "labelled_at": [datetime.now(UTC).isoformat()]}).to_csv(data / "labels" / "stray.csv", index=False)
    with dg.instance_for_test() as instance:
        good = _materialize(registry, data, instance, [online_performance], hour=hour)
        # Corrections arrive later for the same keys: 40% of them flipped; the latest label wins.
        _write_labels(data, traffic.head(300), spec, 0.4, "zz-corrections.csv")
        bad = _materialize(registry, data, instance, [online_performance], hour=hour)
    assert good.success and bad.success
    meta = metadata_of(good, "online_performance")
    assert (meta["n_predictions"], meta["n_labels"], meta["n_matched"], meta["n_unknown"]) == (400, 301, 300, 1)
    expected = float((traffic.head(300)["predicted"].to_numpy() == labels["label"].to_numpy()).mean())
    assert meta["live_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert meta["offline_accuracy"] == pytest.approx(registry.offline_accuracy, abs=1e-5)
    assert check_named(good, DEGRADATION_CHECK).passed and meta["degraded"] is False

    worse = metadata_of(bad, "online_performance")
    assert worse["n_duplicates"] == 300 and worse["n_matched"] == 300
    assert worse["live_accuracy"] < expected - 0.2
    assert not check_named(bad, DEGRADATION_CHECK).passed
    assert worse["degraded"] is True and worse["event_key"] == "degraded-1"


def test_labelled_production_records_become_one_raw_batch_once(registry: Registry, data: Path):
    spec = registry.spec
    traffic = _log_traffic(registry, data, 300, seed=27, at=datetime.now(UTC) - timedelta(minutes=5))
    _write_labels(data, traffic.head(250), spec, 0.0, "labels.csv")
    with dg.instance_for_test() as instance:
        first = _materialize(registry, data, instance, [labelled_production_batch])
        again = _materialize(registry, data, instance, [labelled_production_batch])
    assert first.success and again.success
    assert metadata_of(first, "labelled_production_batch")["rows"] == 250
    assert metadata_of(again, "labelled_production_batch")["rows"] == 0  # nothing new: no second batch
    [batch] = ingestion.accepted_batches(str(data / "batches"))
    assert batch.rows == 250 and batch.columns == spec.columns
    stored = pd.read_parquet(Path(batch.stored_at) / "data.parquet")
    truth = traffic.head(250)
    assert stored[spec.label].tolist() == truth[spec.label].tolist()
    assert stored[spec.feature_names].to_numpy().tolist() == truth[spec.feature_names].to_numpy().tolist()


def test_labelled_production_batch_reads_only_the_log_hours_of_its_window(registry: Registry, data: Path):
    spec = registry.spec
    now = datetime.now(UTC)
    old = _log_traffic(registry, data, 200, seed=31, at=now - timedelta(days=10))  # labelled, beyond the window
    recent = _log_traffic(registry, data, 120, seed=32, at=now - timedelta(hours=2))
    _write_labels(data, pd.concat([old, recent]), spec, 0.0, "labels.csv")
    # An unreadable part in an hour outside the window: read, it would be reported as skipped.
    outside = data / "predictions" / f"date={now - timedelta(days=20):%Y-%m-%d}" / "hour=03"
    outside.mkdir(parents=True)
    (outside / "part-broken.parquet").write_bytes(b"not parquet")
    with dg.instance_for_test() as instance:
        result = _materialize(registry, data, instance, [labelled_production_batch])
        wider = _materialize(registry, data, instance, [labelled_production_batch],
                             run_config={"ops": {"labelled_production_batch": {"config": {"lookback_hours": 24 * 11}}}})
    assert result.success and wider.success
    meta = metadata_of(result, "labelled_production_batch")
    assert meta["rows"] == 120 and meta["log_parts_read"] == 1  # the recent hour's part only
    assert pd.Timestamp(meta["window_start"]) > pd.Timestamp(now - timedelta(days=10))
    # A wider window reaches the old hour: its records were never exported, so they are now.
    assert metadata_of(wider, "labelled_production_batch")["rows"] == 200
    assert sorted(b.rows for b in ingestion.accepted_batches(str(data / "batches"))) == [120, 200]
    # What was exported is kept per log hour, and a run reads the key files of its window's hours
    # only: the old hour's file is not read by the default window.
    keys = data / c.PRODUCTION_BATCH_STAGING_SUBDIR / "exported_keys"
    files = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*.csv"))
    old_hour, recent_hour = (now - timedelta(days=10)), (now - timedelta(hours=2))
    assert files == sorted({f"date={t:%Y-%m-%d}/hour={t:%H}.csv" for t in (old_hour, recent_hour)}), files
    assert sum(len(pd.read_csv(keys / f)) for f in files) == 320
    with dg.instance_for_test() as instance:
        again = metadata_of(_materialize(registry, data, instance, [labelled_production_batch]), "labelled_production_batch")
    assert again["rows"] == 0 and again["exported_key_files_read"] == 1 and again["already_exported"] == 120


def test_the_legacy_file_of_every_exported_key_is_split_by_hour_once_and_nothing_is_exported_twice(
        registry: Registry, data: Path):
    spec = registry.spec
    recent = _log_traffic(registry, data, 250, seed=33, at=datetime.now(UTC) - timedelta(minutes=30))
    _write_labels(data, recent, spec, 0.0, "labels.csv")
    staging = data / c.PRODUCTION_BATCH_STAGING_SUBDIR
    staging.mkdir(parents=True)
    # The earlier layout: one file of every key; 100 of the window's records and 5 of older hours.
    older = pd.DataFrame({"request_id": [f"gone-{i}" for i in range(5)], "record_index": 0})
    pd.concat([recent[["request_id", "record_index"]].head(100), older]).to_csv(staging / "exported_keys.csv",
                                                                               index=False)
    with dg.instance_for_test() as instance:
        first = metadata_of(_materialize(registry, data, instance, [labelled_production_batch]), "labelled_production_batch")
        again = metadata_of(_materialize(registry, data, instance, [labelled_production_batch]), "labelled_production_batch")
    assert first["rows"] == 150 and first["already_exported"] == 100
    assert not (staging / "exported_keys.csv").exists()
    [before] = (staging / "exported_keys").glob("before-*.csv")  # read only by a window reaching further back
    assert sorted(pd.read_csv(before)["request_id"]) == sorted(older["request_id"])
    assert again["rows"] == 0 and again["already_exported"] == 250 and again["exported_key_files_read"] == 1


_CLI_DEFS = '''
import dagster as dg
from mlops_assets.defs.monitoring.assets import drift_report, production_profiles
from mlops_assets_tests.test_monitoring_assets import Registry

defs = dg.Definitions(assets=[production_profiles, drift_report], resources=Registry.resources_for({args!r}))
'''


def test_a_backfill_of_past_hours_from_the_cli_gives_each_window_its_partition_and_scores(
        registry: Registry, data: Path, tmp_path: Path):
    import json
    import os
    import subprocess
    import sys

    hour = datetime(2026, 1, 5, 10, tzinfo=UTC)
    with dg.instance_for_test() as instance:
        assert _materialize(registry, data, instance, [*_registered_stand_in(registry), reference_profile]).success
    _log_traffic(registry, data, 600, seed=41, at=hour)
    _log_traffic(registry, data, 600, seed=42, at=hour + timedelta(hours=2), drift_=DRIFTED)  # 11:00 has none
    defs_file = tmp_path / "backfill_defs.py"
    defs_file.write_text(_CLI_DEFS.format(args={"registry": registry.cli_args(), "data": str(data)}))
    home = tmp_path / "dagster_home"
    home.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(repo)}
    command = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-f", str(defs_file),
               "--select", "production_profiles,drift_report", "--partition-range", "2026-01-05-10:00...2026-01-05-12:00"]
    done = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        key = dg.AssetKey("drift_report")
        assert instance.get_materialized_partitions(key) == {"2026-01-05-10:00", "2026-01-05-11:00", "2026-01-05-12:00"}
        meta = {}
        for partition in sorted(instance.get_materialized_partitions(key)):
            [record] = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1).records
            meta[partition] = {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}
    normal, empty, drifted = (meta[k] for k in sorted(meta))
    assert normal["judged"] is True and normal["drift_detected"] is False and normal["rows"] == 600
    assert empty["judged"] is False and "no production data" in empty["reason"]
    assert drifted["drift_detected"] is True and drifted["event_key"] == "drift-1-20260105T120000Z"
    assert min(drifted[f"drift/{f}"] for f in DRIFTED) > c.DRIFT_HELLINGER > max(normal[f"drift/{f}"] for f in DRIFTED)
    print("backfill:", " ".join(command[1:]), json.dumps({k: v.get("drift_share") for k, v in meta.items()}))

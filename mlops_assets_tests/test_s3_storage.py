"""The platform on S3, against a real S3-compatible server (moto's standalone server, on loopback,
started and stopped by this module; see s3_support.py).

By configuration only (MLOPS_DATA_URL=s3://..., MLOPS_MLFLOW_ARTIFACT_ROOT=s3://..., endpoint and
credentials in the standard AWS_* / MLFLOW_S3_ENDPOINT_URL variables): a landed file is ingested
into the batch store, a real Dagster instance materializes the training path through to
`model_deployment` on a real Ray Serve cluster, the replicas load the model from S3 artifacts and
write the prediction log to S3, and the monitoring assets read that log (and labels) from S3.
Nothing lands in a local data folder but MLflow's SQLite store, and the secret key is in no
metadata, log, MLflow record, Serve config or stored file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from mlops_assets import constants as c
from mlops_assets.core import storage
from mlops_assets.core.dataset_spec import DatasetSpec, default_spec
from mlops_assets.deployment import rollout as dep
from mlops_assets.ingestion import batches as ingestion
from mlops_assets.registry import model_store
from mlops_assets.serving.prediction_log import PredictionLogWriter, prediction_rows, read_prediction_log
from mlops_assets.settings import Settings, load_settings
from mlops_assets.tools.ray_cluster import ClusterConfig, start_head
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets.tools.traffic import write_labels
from mlops_assets_tests import s3_support
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster
from mlops_assets_tests.s3_support import S3Server, s3_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "s3-classifier"
TOKEN = "s3-test-token-0123456789"
FAST = {"ops": {"trained_model": {"config": {"iterations": 40, "thread_count": 1}}}}
TRAINING_PATH = ["raw_dataset", "validation_report", "feature_set", "train_test_split", "trained_model",
                 "model_evaluation", "registered_model"]
SERVE_ARGS = {"log_flush_interval_s": 0.5, "predict_timeout_s": 20}
PER_REQUEST = 20  # records per POST /predict


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from s3_server(tmp_path_factory.mktemp("moto"))


@pytest.fixture()
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


# --- the storage helper on a real S3 endpoint ------------------------------------------------------


def test_without_the_s3_server_ci_fails_and_elsewhere_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        s3_support.unavailable("moto's S3 server did not start")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="did not start"):
        s3_support.unavailable("moto's S3 server did not start")


def test_make_and_every_image_install_the_s3_extra_which_declares_s3fs_and_boto3() -> None:
    import re
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    extra = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0] for req in project["optional-dependencies"]["s3"]}
    assert {"s3fs", "boto3"} <= extra
    locked = {line.split("==")[0].lower() for line in (repo / "requirements.lock").read_text().splitlines() if "==" in line}
    assert {"s3fs", "boto3", "moto"} <= locked  # pinned with the rest of the stack
    installs = re.findall(r"pip install [^\n]*", (repo / "Makefile").read_text())
    assert any("[dev,s3]" in line for line in installs), installs
    for image in ("Dockerfile.dagster", "Dockerfile.serving"):  # the MLflow server runs on the Dagster image
        lines = re.findall(r"^RUN pip install [^\n]*", (repo / "deploy" / image).read_text(), re.MULTILINE)
        assert lines and all("[s3]" in line for line in lines), (image, lines)


def test_files_appear_whole_listings_see_other_writers_and_urls_with_credentials_are_refused(s3_env: S3Server) -> None:
    root = s3_env.url("helper")
    target = storage.join_url(root, "a", "report.json")
    assert storage.write_once(target, b'{"n": 1}') and not storage.write_once(target, b'{"n": 2}')
    assert storage.read_json(target) == {"n": 1}
    storage.write_json(target, {"n": 3})  # replaced in one put
    assert storage.read_json(target) == {"n": 3}

    # A write that fails half-way leaves nothing: no partial object, no temporary one.
    with pytest.raises(RuntimeError, match="half-way"), storage.atomic_writer(storage.join_url(root, "a", "part.parquet")) as handle:
        handle.write(b"PAR1 half")
        raise RuntimeError("half-way")
    assert s3_env.keys("helper/") == ["helper/a/report.json"]

    # Another process (here: a plain S3 client) adds a file: the next listing shows it (no stale cache).
    assert storage.list_files(storage.join_url(root, "a")) == [f"{s3_env.bucket}/helper/a/report.json"]
    s3_env.client().put_object(Bucket=s3_env.bucket, Key="helper/a/other.parquet", Body=b"x")
    assert storage.list_files(storage.join_url(root, "a"), (".parquet",)) == [f"{s3_env.bucket}/helper/a/other.parquet"]
    assert storage.list_files(storage.join_url(root, "missing")) == []
    storage.makedirs(storage.join_url(root, "never-a-bucket"))  # no folders on S3: nothing created
    assert s3_env.keys("helper/never") == []

    # Credentials belong in AWS_* variables: a URL carrying them is refused, naming the setting, redacted.
    with pytest.raises(storage.StorageURLError, match=r"MLOPS_DATA_URL=s3://AKIAEXAMPLE:\*\*\*@") as refused:
        load_settings({"MLOPS_DATA_URL": f"s3://AKIAEXAMPLE:{s3_env.secret}@{s3_env.bucket}/data"})
    assert s3_env.secret not in str(refused.value)


# --- the whole platform on S3 ----------------------------------------------------------------------


@dataclass
class Platform:
    s3: S3Server
    settings: Settings
    env: dict[str, str] = field(repr=False)  # holds the (test) secret key: never printed
    cluster: ClusterConfig
    home: Path
    local: Path  # this module's local folder: only MLflow's SQLite store and Ray's state belong here
    spec: DatasetSpec
    training: dg.ExecuteInProcessResult
    seconds: dict[str, float]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.settings.mlflow_tracking_uri)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else f"no {path}"


def _serve_config(path: Path) -> str:
    config = dep.load_serve_config()
    config["applications"][0]["args"] = {**config["applications"][0].get("args", {}), **SERVE_ARGS}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def platform(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """Every setting by environment, the data root and MLflow artifacts on S3; a Ray head of this
    module's own; the training path and the deployment materialized on a real Dagster instance."""
    from mlops_assets_tests.settings_support import platform_definitions

    local = tmp_path_factory.mktemp("s3-platform")
    home = local / "dagster_home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("MLOPS_LANDING_URL", "MLOPS_PREDICTION_LOG_URL", "MLOPS_LABELS_URL", "MLOPS_DATASET_SPEC",
                    "MLFLOW_UI_URL", "MLOPS_MLFLOW_EXPERIMENT", "MLOPS_API_TOKEN_FILE", "MLOPS_METRICS_URL",
                    "MLOPS_MLFLOW_TRACKING_URI_FILE"):
            mp.delenv(key, raising=False)
        cluster = isolated_cluster(local)  # sets the Ray client's token variables in os.environ
        env = {
            **s3.env,
            "DAGSTER_HOME": str(home),
            "MLOPS_DATA_URL": s3.url("data"),
            "MLOPS_MLFLOW_ARTIFACT_ROOT": s3.url("mlflow"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{local / 'mlflow.db'}",
            "MLOPS_MODEL_NAME": MODEL,
            "MLOPS_ACTOR": "test-s3",
            "MLOPS_API_TOKEN": TOKEN,
            "MLOPS_RAY_DASHBOARD_URL": cluster.dashboard_url,
            "MLOPS_SERVE_URL": cluster.serve_url,
            "MLOPS_SERVE_CONFIG": _serve_config(local / "serve_config.yaml"),
        }
        for key, value in env.items():
            mp.setenv(key, value)
        settings = load_settings()
        seconds: dict[str, float] = {}

        try:
            spec = default_spec()
            write_batch(simulate_records(spec, SimulationConfig(n_rows=1500, seed=31)), settings.landing_url,
                        name="batch-31.csv")
            defs = platform_definitions()
            from mlops_assets.defs.ingestion.assets import INGEST_JOB, ingest_landed_on_instance

            started = time.monotonic()
            with dg.DagsterInstance.get() as instance:
                ingested = ingest_landed_on_instance(instance, defs.resolve_job_def(INGEST_JOB), settings.landing_url)
                assert [f.status for f in ingested] == ["accepted"], ingested
                job = defs.resolve_implicit_global_asset_job_def()
                training = job.execute_in_process(instance=instance, run_config=FAST, raise_on_error=False,
                                                  asset_selection=[dg.AssetKey(k) for k in TRAINING_PATH])
                seconds["ingest_and_training_path"] = time.monotonic() - started
                assert training.success, [e.message for e in training.all_events if e.is_failure]
                # The head inherits the AWS_* variables (as replicas on a node with an instance role or
                # mounted credentials would); the Serve config carries none of them. Started after
                # training: on 2 cores a head starting beside CatBoost may miss its startup deadlines.
                started = time.monotonic()
                start_head(cluster, env={"MLOPS_API_TOKEN": TOKEN})
                seconds["ray_head"] = time.monotonic() - started
                started = time.monotonic()
                # model_deployment loads the registration of its own run: the training path runs
                # again with it, and on unchanged inputs reuses the registered version (no new run).
                deployed = job.execute_in_process(
                    instance=instance, run_config=FAST, raise_on_error=False,
                    asset_selection=[dg.AssetKey(k) for k in [*TRAINING_PATH, "model_deployment"]])
                seconds["model_deployment"] = time.monotonic() - started
                assert deployed.success, ([e.message for e in deployed.all_events if e.is_failure],
                                          _tail(Path(cluster.log_file)))
            yield Platform(s3, settings, env, cluster, home, local, spec, training, seconds)
        finally:
            end_test_head(cluster)


def test_the_training_path_keeps_every_artifact_on_s3_and_the_model_loads_from_there(platform: Platform) -> None:
    s3, settings = platform.s3, platform.settings
    keys = s3.keys()
    # Batch store: the original bytes, the typed copy and the record of the one landed file.
    [batch] = ingestion.accepted_batches(settings.batches_url)
    assert batch.stored_at == s3.url("data", c.BATCHES_SUBDIR, batch.batch_id)
    assert {f"data/{c.BATCHES_SUBDIR}/{batch.batch_id}/{name}" for name in ("source.csv", "data.parquet", "batch.json")} <= set(keys)
    # Every asset's value, features, split and the validation report, under the S3 data root.
    for asset in TRAINING_PATH:
        assert any(k.startswith(f"data/{c.ASSETS_SUBDIR}/{asset}/") and k.endswith(".json") for k in keys), asset
        [event] = platform.training.asset_materializations_for_node(asset)
        assert str(event.metadata["stored_at"].value).startswith(s3.url("data", c.ASSETS_SUBDIR, asset))
    assert any(k.startswith(f"data/{c.FEATURES_SUBDIR}/") and k.endswith("features.parquet") for k in keys)
    assert any(k.startswith(f"data/{c.REPORTS_SUBDIR}/validation-") and k.endswith(".md") for k in keys)
    assert not any(".tmp" in k for k in keys), [k for k in keys if ".tmp" in k]  # written whole, no leftovers
    # Nothing of the data root went to a local folder: only MLflow's SQLite store (and its registry
    # lock), the Dagster instance, Ray's state and this module's Serve config are local.
    local = {p.name for p in platform.local.iterdir() if not p.name.startswith("mlflow.db")}
    assert local <= {"dagster_home", "ray", "serve_config.yaml", "spool"}, local

    # MLflow's artifacts (the model among them) are on S3, and the model loads from there, hash-checked.
    client = platform.client
    version = model_store.alias_version(client, MODEL, c.ALIAS_CHAMPION)
    assert version == "1"
    mv = client.get_model_version(MODEL, version)
    run = client.get_run(mv.run_id)
    assert run.info.artifact_uri.startswith(s3.url("mlflow"))
    assert any(k.startswith("mlflow/") and k.endswith(f"/{model_store.MODEL_ARTIFACT_FILE}") for k in keys)
    model = model_store.load_logged_model(client, f"models:/{MODEL}/{version}", mv.tags[model_store.TAG_SHA256])
    assert 0 < model.tree_count_ <= FAST["ops"]["trained_model"]["config"]["iterations"]
    print(f"\ns3: {len(keys)} objects; seconds: {json.dumps({k: round(v, 1) for k, v in platform.seconds.items()})}")


def _post(client: httpx.Client, platform: Platform, records: list[dict[str, int]]) -> dict[str, Any]:
    response = client.post(f"{platform.cluster.serve_url}/predict", json={"records": records},
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_serving_logs_predictions_to_s3_and_monitoring_reads_them_from_there(platform: Platform) -> None:
    from mlops_assets_tests.settings_support import platform_definitions

    s3, settings, spec = platform.s3, platform.settings, platform.spec
    log_url = settings.prediction_log_url
    assert log_url == s3.url("data", "predictions")
    # 1. The real endpoint, whose replicas write the log to S3 (they inherited the AWS_* variables).
    traffic = simulate_records(spec, SimulationConfig(n_rows=200, seed=41))
    records = dep.sample_records(traffic, spec, len(traffic))
    answered: dict[str, str] = {}
    with httpx.Client(timeout=30) as http:
        for start in range(0, len(records), PER_REQUEST):
            body = _post(http, platform, records[start:start + PER_REQUEST])
            answered[body["request_id"]] = body["model_version"]
    assert set(answered.values()) == {"1"}
    deadline, logged = time.monotonic() + 60, pd.DataFrame()
    while time.monotonic() < deadline:
        logged = read_prediction_log(log_url)
        if not logged.empty and set(answered) <= set(logged["request_id"]):
            break
        time.sleep(0.5)
    assert set(answered) <= set(logged["request_id"]), "answered requests missing from the S3 prediction log"
    parts = s3.keys("data/predictions/")
    assert parts and all(k.split("/")[2].startswith("date=") and k.split("/")[3].startswith("hour=") for k in parts)

    # 2. Delayed labels land on S3; labelled_production_batch joins them with the S3 log and the
    #    records become a raw batch in the S3 batch store.
    truth = traffic[spec.label].astype(int).tolist()
    labels = pd.DataFrame([{"request_id": request_id, "record_index": i, "label": truth[k * PER_REQUEST + i]}
                           for k, request_id in enumerate(answered) for i in range(PER_REQUEST)]
                          ).assign(labelled_at=datetime.now(UTC).isoformat())
    write_labels(labels, settings.labels_url, name="labels-s3.csv")

    # 3. The previous, complete hour of the log, written by the serving writer itself, for the
    #    hourly monitoring assets (the current hour is no partition yet).
    hour = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    writer = PredictionLogWriter(log_url, flush_interval_s=60, flush_rows=10_000, max_buffer_rows=100_000,
                                 spool_dir=str(platform.local / "spool"))
    past = simulate_records(spec, SimulationConfig(n_rows=300, seed=42))
    probabilities = [0.2] * len(past)
    for start in range(0, len(past), 30):
        chunk = past.iloc[start:start + 30]
        writer.append(prediction_rows(
            request_id=f"past-{start}", model_version="1",
            records=chunk[spec.feature_names].astype(int).to_dict("records"),
            labels=chunk[spec.label].astype(int).tolist(), probabilities=probabilities[start:start + len(chunk)],
            logged_at=hour + timedelta(minutes=start / 10)))
    writer.close()
    assert writer.written_rows == len(past)

    defs = platform_definitions()
    key = hour.strftime("%Y-%m-%d-%H:00")
    with dg.DagsterInstance.get() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        # reference_profile profiles its own run's registration: with the training path, before the
        # labelled batch lands, so the unchanged inputs reuse the served version and train nothing.
        reference = job.execute_in_process(
            instance=instance, run_config=FAST, raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in [*TRAINING_PATH, "reference_profile"]])
        assert reference.success, [e.message for e in reference.all_events if e.is_failure]
        labelled = job.execute_in_process(instance=instance, raise_on_error=False,
                                          asset_selection=[dg.AssetKey("labelled_production_batch")])
        assert labelled.success, [e.message for e in labelled.all_events if e.is_failure]
        monitoring = job.execute_in_process(
            instance=instance, raise_on_error=False, partition_key=key,
            asset_selection=[dg.AssetKey("production_profiles"), dg.AssetKey("drift_report")])
        assert monitoring.success, [e.message for e in monitoring.all_events if e.is_failure]
        runs = [r.run_id for r in instance.get_runs()]
        events = [rec for run_id in runs for rec in instance.all_logs(run_id)]

    [batch_event] = labelled.asset_materializations_for_node("labelled_production_batch")
    assert batch_event.metadata["rows"].value == len(labels)
    batches = ingestion.accepted_batches(settings.batches_url)
    assert len(batches) == 2 and any(b.rows == len(labels) for b in batches)
    [profiles] = monitoring.asset_materializations_for_node("production_profiles")
    assert profiles.metadata["log_rows"].value == len(past)
    [drift_event] = monitoring.asset_materializations_for_node("drift_report")
    assert drift_event.metadata["rows"].value == len(past)
    keys = s3.keys()
    assert any(k.startswith(f"data/{c.PROFILES_SUBDIR}/production/") for k in keys)
    assert any(k.startswith(f"data/{c.PROFILES_SUBDIR}/reference/") for k in keys)

    # No secret anywhere it could be read: event log (metadata, logs), MLflow, the Serve config, files.
    secret = s3.secret
    assert events and not [r for r in events if secret in dg.serialize_value(r)]
    client = platform.client
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert secret not in json.dumps({"tags": run.data.tags, "params": run.data.params})
    for mv in client.search_model_versions(f"name = '{MODEL}'"):
        assert secret not in json.dumps(mv.tags) and secret not in (mv.source or "")
    target = dep.ServeTarget(platform.cluster.dashboard_url, platform.cluster.serve_url, token=TOKEN)
    assert secret not in json.dumps(dep.serve_applications(target))
    for k in keys:
        if k.endswith((".json", ".md", ".csv", ".prom")):
            assert secret.encode() not in s3.client().get_object(Bucket=s3.bucket, Key=k)["Body"].read(), k

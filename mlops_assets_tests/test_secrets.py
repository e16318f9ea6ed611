"""Secrets stay secret: the MLflow password and the serving token never reach MLflow (params, tags,
metrics, inputs, artifacts, the store's files), the Dagster event log, logs or HTTP responses.

The MLflow server runs as in the production configuration: `mlflow server --app-name basic-auth`
started through deploy/production/entrypoint.sh, its admin password and Flask secret read from
mounted files, the auth settings from deploy/production/mlflow-auth.ini. The training path then
runs against it over HTTP with basic auth, artifacts proxied by the server.

Then a tracking URI that carries its password (PostgreSQL, `postgresql+psycopg2://role:password@...`):
training and a deployment to a Ray Serve application on a Ray head of the test's own; the password
shows up nowhere but in the 0600 file that hands the URI to the replicas.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml
from mlflow import MlflowClient

from mlops_assets.core.dataset_spec import default_spec
from mlops_assets.settings import load_settings
from mlops_assets.tools.simulator import SimulationConfig, simulate_records, write_batch
from mlops_assets_tests.postgres_support import admin, mlflow_uri, postgres_server_url, unavailable
from mlops_assets_tests.settings_support import platform_definitions

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "deploy" / "production"
FAST = {"ops": {"trained_model": {"config": {"iterations": 60, "thread_count": 1}}}}
TRAINING_PATH = ["raw_dataset", "validation_report", "feature_set", "train_test_split",
                 "trained_model", "model_evaluation", "registered_model"]


def _ingest(instance: dg.DagsterInstance, defs: dg.Definitions, data: Path) -> None:
    """Each landed file as its raw_batches partition, as `mlops-assets ingest` does."""
    from mlops_assets.defs.ingestion.assets import INGEST_JOB, ingest_landed_on_instance

    files = ingest_landed_on_instance(instance, defs.resolve_job_def(INGEST_JOB), str(data / "raw"))
    assert files and all(f.status == "accepted" for f in files), files


SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET)", re.IGNORECASE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- static: configuration files ------------------------------------------------------------------


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_production_configs_hold_no_secret_values_and_publish_only_on_loopback() -> None:
    for path in (PRODUCTION / "docker-compose.yaml", REPO / "deploy" / "docker-compose.yaml"):
        compose = _compose(path)
        for name, service in compose["services"].items():
            for port in service.get("ports") or []:
                assert str(port).startswith("127.0.0.1:"), f"{path.name}: {name} publishes {port} beyond loopback"
    prod = _compose(PRODUCTION / "docker-compose.yaml")
    for name, service in prod["services"].items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if SECRET_NAME.search(key) and key != "MLFLOW_TRACKING_USERNAME":
                # A secret is a file path under /run/secrets, never a value.
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
    assert not re.search(r"^\s*admin_password\s*=", (PRODUCTION / "mlflow-auth.ini").read_text(), re.MULTILINE)
    dagster_yaml = yaml.safe_load((PRODUCTION / "dagster.yaml").read_text())
    assert dagster_yaml["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    # Local services bind loopback by default.
    platform_sh = (REPO / "scripts" / "platform.sh").read_text()
    assert platform_sh.count("--host 127.0.0.1") == 2  # the MLflow UI and the Dagster UI
    from mlops_assets.tools.ray_cluster import ClusterConfig, head_command

    command = head_command(ClusterConfig(), "ray")
    assert "--dashboard-host=127.0.0.1" in command and "--node-ip-address=127.0.0.1" in command


def test_the_entrypoint_reads_secrets_from_files_and_never_prints_them(tmp_path: Path) -> None:
    token, password = secrets.token_hex(16), secrets.token_hex(16)
    (tmp_path / "token").write_text(token + "\n")
    (tmp_path / "db").write_text(password)
    env = {"PATH": os.environ["PATH"], "MLOPS_API_TOKEN_FILE": str(tmp_path / "token"),
           "MLFLOW_DB_PASSWORD_FILE": str(tmp_path / "db"), "MLFLOW_DB_HOST": "db", "MLFLOW_DB_USER": "u"}
    script = ('test "$MLOPS_API_TOKEN" = "$1" && test -z "${MLOPS_API_TOKEN_FILE:-}" && '
              'test "$MLFLOW_BACKEND_STORE_URI" = "postgresql+psycopg2://u:$2@db:5432/mlflow" && echo loaded')
    done = subprocess.run([str(PRODUCTION / "entrypoint.sh"), "sh", "-c", script, "sh", token, password],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr
    bad = subprocess.run([str(PRODUCTION / "entrypoint.sh"), "true"], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "MLOPS_API_TOKEN_FILE": str(tmp_path / "missing")})
    assert bad.returncode == 1 and "MLOPS_API_TOKEN_FILE" in bad.stderr and token not in bad.stderr


# --- MLflow with basic auth, and the training path against it -----------------------------------


@dataclass
class AuthServer:
    url: str
    password: str = field(repr=False)
    folder: Path
    log: Path


@pytest.fixture(scope="module")
def mlflow_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    folder = tmp_path_factory.mktemp("mlflow-auth")
    password = "pw-" + secrets.token_hex(12)
    (folder / "admin_password").write_text(password + "\n")
    (folder / "flask_secret").write_text(secrets.token_hex(16))
    ini = (PRODUCTION / "mlflow-auth.ini").read_text()
    ini = re.sub(r"^database_uri = .*$", f"database_uri = sqlite:///{folder / 'basic_auth.db'}", ini, flags=re.M)
    (folder / "auth.ini").write_text(ini)
    port = _free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD_FILE": str(folder / "admin_password"),
           "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(folder / "flask_secret")}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    log = folder / "server.log"
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(PRODUCTION / "entrypoint.sh"), mlflow_bin, "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--serve-artifacts",
             "--artifacts-destination", str(folder / "artifacts")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not start: " + log.read_text()[-3000:]
            time.sleep(0.5)
        yield AuthServer(url, password, folder, log)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            found += [f"{path} holds secret #{i}" for i, n in enumerate(needles) if n in content]
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_requires_auth_and_no_secret_reaches_mlflow_dagster_or_responses(
        mlflow_auth: AuthServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = "tok-" + secrets.token_hex(12)
    wrong = "wrong-" + secrets.token_hex(6)
    # Without credentials, or with wrong ones, MLflow answers 401 and echoes nothing back.
    search = f"{mlflow_auth.url}/api/2.0/mlflow/experiments/search"
    # (Password checks are a slow hash by design: generous timeouts on a busy machine.)
    responses = [httpx.post(search, json={"max_results": 1}, timeout=60),
                 httpx.post(search, json={"max_results": 1}, auth=("admin", wrong), timeout=60)]
    assert [r.status_code for r in responses] == [401, 401]
    assert httpx.post(search, json={"max_results": 1}, auth=("admin", mlflow_auth.password),
                      timeout=60).status_code == 200

    data = tmp_path / "data"
    for key, value in {
        "MLFLOW_TRACKING_URI": mlflow_auth.url, "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": mlflow_auth.password, "MLOPS_API_TOKEN": token,
        "MLOPS_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/", "MLOPS_DATA_URL": str(data),
        "MLOPS_MODEL_NAME": "secrets-test", "MLOPS_ACTOR": "secrets-test",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("MLOPS_LANDING_URL", "MLOPS_DATASET_SPEC", "MLFLOW_UI_URL", "MLOPS_MLFLOW_EXPERIMENT"):
        monkeypatch.delenv(key, raising=False)
    write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=1500, seed=5)), str(data / "raw"),
                name="landed.csv")
    defs = platform_definitions()  # built from the environment just set

    with dg.instance_for_test() as instance:
        _ingest(instance, defs, data)
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, run_config=FAST, raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in TRAINING_PATH])
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        event_log = "\n".join(repr(e) for e in instance.all_logs(result.run_id))

    needles = [mlflow_auth.password, token]
    client = MlflowClient(tracking_uri=mlflow_auth.url)
    seen: list[str] = []  # every string MLflow holds about the runs, models and versions
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "the pipeline logged no run"
    for run in runs:
        seen += [run.info.run_name or "", run.info.artifact_uri or ""]
        seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        seen += list(run.data.metrics)
        for d in run.inputs.dataset_inputs:
            seen += [d.dataset.source, d.dataset.profile or "", d.dataset.schema or ""]
            seen += [f"{t.key}={t.value}" for t in d.tags]
    for model in client.search_registered_models():
        seen += [model.description or "", *[f"{k}={v}" for k, v in model.tags.items()]]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            seen += [version.description or "", version.source or ""]
            seen += [f"{k}={v}" for k, v in version.tags.items()]
    assert any("model_card" in s for s in seen)  # the scan covers what governance writes too
    for needle in needles:
        assert not [s for s in seen if needle in s]
        assert needle not in event_log
        for r in responses:
            assert needle not in r.text and needle not in str(r.headers)
    # The stores themselves, byte for byte: MLflow's database, proxied artifacts (model, metadata.json,
    # plots, model card), the auth database (a hash, never the password), the server log, the data root.
    leaks = _files_containing(mlflow_auth.folder, [n.encode() for n in needles if n != mlflow_auth.password])
    leaks += [p for p in _files_containing(mlflow_auth.folder, [mlflow_auth.password.encode()])
              if not p.endswith("admin_password holds secret #0")]
    leaks += _files_containing(data, [n.encode() for n in needles])
    assert not leaks, leaks
    assert any((mlflow_auth.folder / "artifacts").rglob("model.cb")), "artifacts went through the proxy"


# --- a tracking URI with a password: redacted everywhere, handed to replicas as a file ----------


def test_a_password_in_the_tracking_uri_reaches_replicas_as_a_0600_file_never_as_a_variable(tmp_path: Path) -> None:
    from mlops_assets.deployment import rollout as dep
    from mlops_assets.serving.config import (
        TRACKING_URI_FILE_ENV,
        ModelRef,
        mlflow_tracking_uri,
        replica_tracking_env,
    )

    uri = "postgresql+psycopg2://mlflow:pw-123@db:5432/mlflow"
    env = replica_tracking_env(uri, secrets_dir=tmp_path / "secrets", env={})
    path = Path(env[TRACKING_URI_FILE_ENV])
    assert list(env) == [TRACKING_URI_FILE_ENV] and path.parent == tmp_path / "secrets"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert mlflow_tracking_uri(env) == uri  # what the replica reads
    assert mlflow_tracking_uri({}) is None
    # An operator's mounted file wins; a URI without credentials stays a plain variable.
    assert replica_tracking_env(uri, secrets_dir=None, env={TRACKING_URI_FILE_ENV: "/run/secrets/uri"}) == {
        TRACKING_URI_FILE_ENV: "/run/secrets/uri"}
    assert replica_tracking_env("http://mlflow:5000", secrets_dir=None, env={}) == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    with pytest.raises(ValueError, match="mount it as a file") as raised:
        replica_tracking_env(uri, secrets_dir=None, env={})
    assert "pw-123" not in str(raised.value) and "mlflow:***@db" in str(raised.value)
    with pytest.raises(ValueError, match=TRACKING_URI_FILE_ENV):
        mlflow_tracking_uri({TRACKING_URI_FILE_ENV: str(tmp_path / "missing")})
    # The process environment is forwarded without the credential; the Serve config refuses one.
    assert dep.forwarded_env({"MLFLOW_TRACKING_URI": uri, "MLOPS_DATA_URL": "/d"}) == {"MLOPS_DATA_URL": "/d"}
    with pytest.raises(dep.DeploymentError, match="MLFLOW_TRACKING_URI") as refused:
        dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(version="1"),
                                env_vars={"MLFLOW_TRACKING_URI": uri})
    assert "pw-123" not in str(refused.value)


def test_the_replica_env_of_the_deployment_asset_names_a_file_under_the_data_root(tmp_path: Path) -> None:
    from mlops_assets.defs.deployment.assets import replica_env
    from mlops_assets.defs.resources import MlflowResource, PlatformResource, RayServeResource

    uri = "postgresql+psycopg2://mlflow:pw-456@db:5432/mlflow"
    with_password, ray_serve = MlflowResource(tracking_uri=uri), RayServeResource()
    env = replica_env(PlatformResource.at(str(tmp_path / "data")), with_password, ray_serve)
    assert "pw-456" not in repr(env) and "MLFLOW_TRACKING_URI" not in env
    assert Path(env["MLOPS_MLFLOW_TRACKING_URI_FILE"]) == tmp_path / "data" / "secrets" / "mlflow_tracking_uri"
    remote = PlatformResource.at("s3://bucket/data")
    with pytest.raises(dg.Failure, match="MLOPS_MLFLOW_TRACKING_URI_FILE"):
        replica_env(remote, with_password, ray_serve)
    mounted = MlflowResource(tracking_uri=uri, tracking_uri_file="/run/secrets/uri")  # the operator's file
    assert replica_env(remote, mounted, ray_serve)["MLOPS_MLFLOW_TRACKING_URI_FILE"] == "/run/secrets/uri"
    plain = replica_env(remote, MlflowResource(tracking_uri="http://mlflow:5000"), ray_serve)
    assert plain["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_run_links_show_the_store_without_its_password() -> None:
    from mlops_assets.defs.resources import MlflowResource

    resource = MlflowResource(tracking_uri="postgresql+psycopg2://u:pw-789@db/mlflow")
    for value in (resource.run_link("1", "abc"), resource.model_version_link("m", "2")):
        assert "pw-789" not in str(value.value) and "u:***@db" in str(value.value)


# The real thing: PostgreSQL with a password, the training path, a deployment on a Ray head.

PG_MODEL = "secrets-pg"
PG_ARGS = {"log_flush_interval_s": 0.5, "max_records": 100}


@dataclass
class PgStore:
    # postgresql+psycopg2://<role>:<password>@.../<db>, the role's own database; none of the three
    # secrets goes into the repr pytest prints for a failing test.
    tracking_uri: str = field(repr=False)
    password: str = field(repr=False)
    admin_url: str = field(repr=False)
    database: str


@pytest.fixture(scope="module")
def pg_store() -> Iterator[PgStore]:
    """A role with a fresh password and a database it owns, on CI's server or a private one.
    Fails under CI=true when there is no PostgreSQL, skips elsewhere (as test_postgres_platform)."""
    from urllib.parse import urlsplit, urlunsplit

    for admin_url in postgres_server_url():
        suffix = secrets.token_hex(4)
        role, database, password = f"mlflow_{suffix}", f"mlflow_{suffix}", "pg-" + secrets.token_hex(12)
        try:
            conn = admin(admin_url)
        except Exception as exc:
            unavailable(f"cannot connect to the PostgreSQL server: {type(exc).__name__}")
        with conn.cursor() as cur:
            cur.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
            cur.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')
        parts = urlsplit(admin_url)
        netloc = f"{role}:{password}@{parts.hostname}:{parts.port or 5432}"
        uri = mlflow_uri(urlunsplit((parts.scheme, netloc, f"/{database}", "", "")))
        try:
            yield PgStore(uri, password, admin_url, database)
        finally:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                cur.execute(f'DROP ROLE IF EXISTS "{role}"')
            conn.close()


def _mlflow_strings(client: MlflowClient) -> list[str]:
    """Every string MLflow holds about the runs, models and versions."""
    seen: list[str] = []
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        seen += [run.info.run_name or "", run.info.artifact_uri or ""]
        seen += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        seen += list(run.data.metrics)
        for d in run.inputs.dataset_inputs:
            seen += [d.dataset.source, d.dataset.source_type, d.dataset.profile or "", d.dataset.schema or ""]
            seen += [f"{t.key}={t.value}" for t in d.tags]
    for experiment in client.search_experiments():
        seen += [experiment.name, experiment.artifact_location, *[f"{k}={v}" for k, v in experiment.tags.items()]]
    for model in client.search_registered_models():
        seen += [model.description or "", *[f"{k}={v}" for k, v in model.tags.items()]]
        seen += [f"{a}={v}" for a, v in (model.aliases or {}).items()]
        for version in client.search_model_versions(f"name = '{model.name}'"):
            seen += [version.description or "", version.source or ""]
            seen += [f"{k}={v}" for k, v in version.tags.items()]
    return seen


def _database_text(admin_url: str, database: str) -> str:
    """Every row of every table of the MLflow database, as text: whatever MLflow stored."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(admin_url)
    conn = admin(urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", "")))
    try:
        with conn.cursor() as cur:
            cur.execute("select tablename from pg_tables where schemaname = 'public'")
            rows = []
            for (table,) in cur.fetchall():
                cur.execute(f'select t::text from "{table}" t')
                rows += [f"{table}: {r[0]}" for r in cur.fetchall()]
        return "\n".join(rows)
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_postgres_password_in_the_tracking_uri_reaches_no_event_mlflow_field_serve_config_output_or_response(
        pg_store: PgStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    from contextlib import ExitStack

    from mlops_assets.deployment import rollout as dep
    from mlops_assets.tools import cli
    from mlops_assets.tools.ray_cluster import start_head
    from mlops_assets_tests.ray_support import end_test_head, isolated_cluster

    password, token = pg_store.password, "tok-" + secrets.token_hex(12)
    data = tmp_path / "data"
    cluster = isolated_cluster(tmp_path)
    config = dep.load_serve_config()
    config["applications"][0]["args"] = {**config["applications"][0].get("args", {}), **PG_ARGS}
    for deployment in config["applications"][0]["deployments"]:
        deployment["num_replicas"] = 1  # two cores shared by the whole suite
    serve_config = tmp_path / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    for key in ("MLOPS_LANDING_URL", "MLOPS_DATASET_SPEC", "MLFLOW_UI_URL", "MLOPS_MLFLOW_EXPERIMENT",
                "MLOPS_PREDICTION_LOG_URL", "MLOPS_MLFLOW_TRACKING_URI_FILE", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {
        "MLFLOW_TRACKING_URI": pg_store.tracking_uri, "MLOPS_API_TOKEN": token, "MLOPS_DATA_URL": str(data),
        "MLOPS_MLFLOW_ARTIFACT_ROOT": (tmp_path / "artifacts").as_uri(), "MLOPS_MODEL_NAME": PG_MODEL,
        "MLOPS_ACTOR": "secrets-test", "MLOPS_RAY_DASHBOARD_URL": cluster.dashboard_url,
        "MLOPS_SERVE_URL": cluster.serve_url, "MLOPS_SERVE_CONFIG": str(serve_config),
    }.items():
        monkeypatch.setenv(key, value)
    write_batch(simulate_records(default_spec(), SimulationConfig(n_rows=1500, seed=7)), str(data / "raw"),
                name="landed.csv")
    MlflowClient(tracking_uri=pg_store.tracking_uri).search_experiments()  # schema first, as `mlflow db upgrade`

    with ExitStack() as stack:
        # The head knows no tracking URI: replicas can only get it from the file Dagster hands over.
        start_head(cluster, env={"MLOPS_API_TOKEN": token, "MLFLOW_TRACKING_URI": "", "MLOPS_DATA_URL": str(data)})
        stack.callback(end_test_head, cluster)
        target = dep.target_from_settings(load_settings())
        defs = platform_definitions()  # built from the environment just set

        instance = stack.enter_context(dg.instance_for_test())
        _ingest(instance, defs, data)
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=instance, run_config=FAST, raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in [*TRAINING_PATH, "model_deployment"]])
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        event_log = "\n".join(repr(e) for e in instance.all_logs(result.run_id))
        assert "model_deployment" in event_log and "secrets-pg" in event_log

        # The Serve config as the dashboard returns it: the file's path, never the URI.
        applications = httpx.get(f"{cluster.dashboard_url}/api/serve/applications/", timeout=30,
                                 headers=_ray_auth_headers(cluster))
        assert applications.status_code == 200, applications.text[:300]
        app_config = applications.json()["applications"][target.app_name]["deployed_app_config"]
        env_vars = app_config["runtime_env"]["env_vars"]
        secret_file = Path(env_vars["MLOPS_MLFLOW_TRACKING_URI_FILE"])
        assert "MLFLOW_TRACKING_URI" not in env_vars
        assert secret_file.read_text().strip() == pg_store.tracking_uri
        assert secret_file.stat().st_mode & 0o777 == 0o600

        # Every HTTP answer of the endpoint, the good and the refused.
        records = dep.sample_records(simulate_records(default_spec(), SimulationConfig(n_rows=5, seed=3)),
                                     default_spec(), 5)
        auth = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30, trust_env=False) as http:
            responses = [
                http.post(target.endpoint, json={"records": records}, headers=auth),
                http.post(target.endpoint, json={"records": records}),  # 401
                http.post(target.endpoint, json={"records": [{"nope": 1}]}, headers=auth),  # 422
                http.get(f"{cluster.serve_url}/healthz"), http.get(f"{cluster.serve_url}/model"),
                http.get(f"{cluster.serve_url}/metrics"), http.get(f"{cluster.serve_url}/nowhere"),
                http.get(cluster.metrics_url),
            ]
        predicted = responses[0]
        assert predicted.status_code == 200, predicted.text[:300]
        assert [r.status_code for r in responses[1:5]] == [401, 422, 200, 200]

        # `status` and `trace`, human and JSON, as a user runs them (stdout and stderr).
        outputs: list[str] = []
        capfd.readouterr()
        for argv in (["status"], ["status", "--json"], ["status", "--history"]):
            assert cli.main(argv) == 0, capfd.readouterr()
            outputs.append("".join(capfd.readouterr()))
        request_id = predicted.json()["request_id"]
        deadline = time.monotonic() + 60
        while True:
            cli.main(["trace", request_id])
            text = "".join(capfd.readouterr())
            if "not in the prediction log" not in text or time.monotonic() > deadline:
                break
            outputs.append(text)  # the not-found message names the log URL too
            time.sleep(1)
        outputs.append(text)
        assert f"request {request_id}" in text, text
        cli.main(["trace", request_id, "--json"])
        outputs.append("".join(capfd.readouterr()))

    client = MlflowClient(tracking_uri=pg_store.tracking_uri)
    seen = _mlflow_strings(client)
    assert any("model_card" in s for s in seen) and any("feature_set" in s or "features" in s for s in seen)
    leaks = [f"MLflow: {s[:200]}" for s in seen if password in s]
    leaks += ["Dagster event log"] * (password in event_log)
    leaks += ["Serve config from the dashboard"] * (password in applications.text)
    leaks += [f"HTTP {r.request.method} {r.request.url.path} -> {r.status_code}" for r in responses
              if password in r.text or password in str(r.headers)]
    leaks += [f"CLI output #{i}" for i, out in enumerate(outputs) if password in out]
    # Byte for byte: the MLflow database's rows, the artifacts (model, metadata.json, card, plots),
    # the data root (prediction log, reports, IO manager pickles) except the replicas' secret file.
    leaks += ["MLflow database rows"] * (password in _database_text(pg_store.admin_url, pg_store.database))
    leaks += _files_containing(tmp_path / "artifacts", [password.encode()])
    leaks += [p for p in _files_containing(data, [password.encode(), token.encode()])
              if not p.startswith(str(secret_file))]
    assert not leaks, leaks
    assert "mlflow_" in outputs[0] and "***@" in outputs[0]  # status shows the store, not its password
    assert any((tmp_path / "artifacts").rglob("*.md")), "the model card was written and scanned"


def _ray_auth_headers(cluster: object) -> dict[str, str]:
    """The Ray token header when the head runs with token authentication (else none)."""
    try:
        from mlops_assets.tools.ray_cluster import auth_headers  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return dict(auth_headers(cluster))

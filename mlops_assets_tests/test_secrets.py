"""Secrets stay secret: the MLflow password and the serving token never reach MLflow (params, tags,
metrics, inputs, artifacts, the store's files), the Dagster event log, logs or HTTP responses.

The MLflow server runs as in the production configuration: `mlflow server --app-name basic-auth`
started through deploy/production/entrypoint.sh, its admin password and Flask secret read from
mounted files, the auth settings from deploy/production/mlflow-auth.ini. The training path then
runs against it over HTTP with basic auth, artifacts proxied by the server.
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
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml
from mlflow import MlflowClient

from mlops_assets.lib.dataset_spec import default_spec
from mlops_assets.lib.simulator import SimulationConfig, simulate_records, write_batch

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = REPO / "deploy" / "production"
FAST = {"ops": {"trained_model": {"config": {"iterations": 60, "thread_count": 1}}}}
TRAINING_PATH = ["raw_batches", "raw_dataset", "validation_report", "feature_set", "train_test_split",
                 "trained_model", "model_evaluation", "registered_model"]
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
    from mlops_assets.lib.ray_cluster import ClusterConfig, head_command

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
    password: str
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
    from mlops_assets.definitions import defs

    with dg.instance_for_test() as instance:
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

"""Deploy logic without a cluster: config rendering, comparisons, restore-on-failure, local head settings."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.config import ModelRef
from mlops_assets.tools.ray_cluster import ClusterConfig, config_from_env, head_command


def _app(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]


def test_the_shipped_serve_config_is_valid_and_points_at_the_app() -> None:
    config = dep.load_serve_config()
    app = _app(config)
    assert app["import_path"] == "mlops_assets.serving.app:build_app"
    assert config["http_options"]["host"] == "127.0.0.1"
    assert "MLOPS_API_TOKEN" not in str(config)  # the token never goes into a config
    from mlops_assets.serving.app import build_app

    assert build_app(app["args"]) is not None


def test_render_pins_the_version_and_fills_the_environment() -> None:
    base = dep.load_serve_config()
    out = dep.render_serve_config(base, ref=ModelRef(model_name="m", version="4"),
                                  env_vars={"MLFLOW_TRACKING_URI": "sqlite:////x.db"}, http_port=8123,
                                  args={"max_records": 10})
    deployment = _app(out)["deployments"][0]
    assert deployment["user_config"] == {"model_name": "m", "version": "4"}
    assert _app(out)["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": "sqlite:////x.db"}
    assert out["http_options"]["port"] == 8123 and _app(out)["args"]["max_records"] == 10
    assert _app(base)["deployments"][0]["user_config"] == {"model_name": "phishing-classifier", "alias": "champion"}


def test_render_rejects_a_bad_option_or_a_missing_app() -> None:
    base = dep.load_serve_config()
    with pytest.raises(ValueError, match="unknown serving option"):
        dep.render_serve_config(base, ref=ModelRef(version="1"), args={"max_recrods": 10})
    with pytest.raises(dep.DeploymentError, match="exactly one application"):
        dep.render_serve_config(base, ref=ModelRef(version="1"), app_name="other")


def test_mismatches() -> None:
    assert dep.mismatches([0.1, 0.2], [0.1, 0.2]) == []
    assert dep.mismatches([0.1, 0.2], [0.1, 0.2001]) == [1]
    assert dep.mismatches([0.1], [0.1, 0.2]) == [0, 1]


def test_forwarded_env_never_includes_the_token() -> None:
    env = {"MLOPS_API_TOKEN": "t", "MLFLOW_TRACKING_URI": "sqlite:////a.db", "MLOPS_DATA_URL": "", "HOME": "/root"}
    assert dep.forwarded_env(env) == {"MLFLOW_TRACKING_URI": "sqlite:////a.db"}


class FakeCluster:
    """Records submitted configs; `fail_wait` makes the replicas never report the candidate."""

    def __init__(self, live: str | None, fail_wait: bool = False) -> None:
        self.live = live
        self.fail_wait = fail_wait
        self.submitted: list[dict[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        previous = {"applications": [{"name": "phishing", "marker": "previous"}]} if self.live else None
        monkeypatch.setattr(dep, "check_candidate", lambda *a, **k: None)
        monkeypatch.setattr(dep, "app_details", lambda target: {"status": "RUNNING"} if self.live else None)
        monkeypatch.setattr(dep, "live_config", lambda target: previous)
        monkeypatch.setattr(dep, "live_version", lambda target: self.live)
        before = self.live

        def submit(target, config):
            self.submitted.append(config)
            if config is previous:  # the restore: the version that was live answers again
                self.live = before

        monkeypatch.setattr(dep, "submit", submit)

        def wait(target, version, timeout_s=0):
            if self.fail_wait:
                raise dep.DeploymentError(f"replica could not switch to version {version}: boom")
            self.live = version

        monkeypatch.setattr(dep, "wait_until_serving", wait)
        monkeypatch.setattr(dep, "get_json", lambda target, path, timeout=5.0: (200, {"status": "ok"}))
        monkeypatch.setattr(dep, "predict_over_http", lambda target, records, spec: (self.live, [0.25] * len(records)))


def _deploy(spec, version: str = "2", expected: float = 0.25) -> dep.DeployResult:
    target = dep.ServeTarget("http://127.0.0.1:1", "http://127.0.0.1:2", token="t")
    records = [{f.name: f.values[0] for f in spec.features}] * 3
    return dep.deploy_version(target=target, tracking_uri="sqlite:////nowhere.db", spec=spec, version=version,
                              records=records, expected=[expected] * 3, model_name="m")


def test_a_successful_deploy_reports_live_and_replaced(spec, monkeypatch) -> None:
    cluster = FakeCluster(live="1")
    cluster.install(monkeypatch)
    result = _deploy(spec)
    assert (result.live_version, result.replaced_version) == ("2", "1")
    assert len(cluster.submitted) == 1
    assert _app(cluster.submitted[0])["deployments"][0]["user_config"]["version"] == "2"


def test_a_failed_switch_restores_the_previous_config(spec, monkeypatch) -> None:
    cluster = FakeCluster(live="1", fail_wait=True)
    cluster.install(monkeypatch)
    with pytest.raises(dep.DeploymentError, match="could not switch.*previous config was restored"):
        _deploy(spec)
    assert cluster.submitted[-1] == {"applications": [{"name": "phishing", "marker": "previous"}]}


def test_live_answers_that_differ_fail_and_restore(spec, monkeypatch) -> None:
    cluster = FakeCluster(live="1")
    cluster.install(monkeypatch)
    with pytest.raises(dep.DeploymentError, match="differ from the offline model.*version 1 serves"):
        _deploy(spec, expected=0.5)
    assert len(cluster.submitted) == 2  # the candidate, then the previous config again


def test_first_deploy_failure_says_nothing_was_deployed(spec, monkeypatch) -> None:
    cluster = FakeCluster(live=None, fail_wait=True)
    cluster.install(monkeypatch)
    with pytest.raises(dep.DeploymentError, match="nothing was deployed before"):
        _deploy(spec)


def test_head_command_is_loopback_and_configurable() -> None:
    cfg = ClusterConfig(port=7000, dashboard_port=7001, metrics_export_port=7002,
                        extra_ports={"ray-client-server-port": 7003})
    cmd = head_command(cfg, "/venv/bin/ray")
    assert cmd[:4] == ["/venv/bin/ray", "start", "--head", "--block"]
    assert "--node-ip-address=127.0.0.1" in cmd and "--dashboard-host=127.0.0.1" in cmd
    assert "--port=7000" in cmd and "--ray-client-server-port=7003" in cmd
    assert cfg.dashboard_url == "http://127.0.0.1:7001" and cfg.metrics_url == "http://127.0.0.1:7002/metrics"


def test_cluster_and_target_from_the_same_settings(tmp_path) -> None:
    from mlops_assets.settings import load_settings

    env = {"MLOPS_DATA_URL": str(tmp_path), "MLOPS_SERVE_PORT": "8100", "MLOPS_RAY_DASHBOARD_PORT": "8300"}
    cfg = config_from_env(env)
    assert cfg.serve_url == "http://127.0.0.1:8100" and cfg.state_dir == str(tmp_path / "ray")
    target = dep.target_from_settings(load_settings({**env, "MLOPS_API_TOKEN": "tok"}))
    assert (target.dashboard_url, target.serve_url, target.token) == (cfg.dashboard_url, cfg.serve_url, "tok")
    assert cfg.dashboard_url == "http://127.0.0.1:8300"
    explicit = dep.target_from_settings(load_settings({**env, "MLOPS_SERVE_URL": "http://10.0.0.1:80"}))
    assert explicit.endpoint == "http://10.0.0.1:80/predict"


def test_deployment_definitions_load_with_the_platform() -> None:
    from mlops_assets import definitions
    from mlops_assets.defs.deployment import assets as deployment

    key = dg.AssetKey("model_deployment")
    defs = definitions.defs
    if key not in defs.resolve_asset_graph().get_all_asset_keys():  # until definitions.py merges it
        defs = dg.Definitions.merge(defs, deployment.defs,
                                    dg.Definitions(resources={"ray_serve": deployment.RayServeResource()}))
    asset = defs.resolve_assets_def("model_deployment")
    assert asset.group_names_by_key[key] == "deployment"
    assert set(asset.specs_by_key[key].kinds) == {"ray", "mlflow"}
    assert {k.to_user_string() for k in asset.dependency_keys} == {"registered_model", "train_test_split"}
    assert [n.name for n in defs.resolve_job_def("rollback").nodes] == ["rollback_champion_op"]


def test_deploy_folder_is_consistent_with_the_code() -> None:
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from mlops_assets.serving.config import ServiceOptions

    deploy = Path(dep.DEFAULT_SERVE_CONFIG).parent
    local = dep.load_serve_config()
    service = yaml.safe_load((deploy / "rayservice.yaml").read_text())
    k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(k8s)
    assert _app(k8s)["import_path"] == _app(local)["import_path"]
    assert set(_app(k8s)["args"]) == set(_app(local)["args"])
    ServiceOptions.from_args(_app(k8s)["args"])
    assert _app(k8s)["deployments"][0]["name"] == _app(local)["deployments"][0]["name"]

    compose = yaml.safe_load((deploy / "docker-compose.yaml").read_text())
    read_by_code = {"MLFLOW_TRACKING_URI", "MLOPS_DATA_URL", "MLOPS_PREDICTION_LOG_URL", "MLOPS_API_TOKEN",
                    "MLOPS_RAY_DASHBOARD_URL", "MLOPS_SERVE_URL", "MLOPS_SERVE_HTTP_HOST", "MLFLOW_UI_URL",
                    "DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB",
                    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",  # read by Ray itself (token auth)
                    # read by Ray Serve itself: the HAProxy ingress, run through the loopback wrapper
                    "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH",
                    # secret files, read by deploy/production/entrypoint.sh (test_deploy_files.py)
                    "MLOPS_API_TOKEN_FILE", "DAGSTER_PG_PASSWORD_FILE", "RAY_AUTH_TOKEN_FILE"}
    for name in ("ray-head", "dagster-webserver"):
        assert set(compose["services"][name]["environment"]) <= read_by_code, name
    # The HAProxy binary the compose files and the RayService name is the wrapper shipped in deploy/.
    production = yaml.safe_load((deploy / "production" / "docker-compose.yaml").read_text())
    named = {services["services"]["ray-head"]["environment"].get("RAY_SERVE_HAPROXY_BINARY_PATH")
             for services in (compose, production)}
    assert named == {"/app/deploy/haproxy-loopback"} and (deploy / "haproxy-loopback").is_file()
    assert "/app/deploy/haproxy-loopback" in (deploy / "rayservice.yaml").read_text()
    for dockerfile in ("Dockerfile.serving", "Dockerfile.dagster"):
        text = (deploy / dockerfile).read_text()
        assert "requirements.lock" in text and "MLOPS_SERVE_CONFIG=/app/deploy/serve_config.yaml" in text


def test_sample_request_prints_a_reproducible_command() -> None:
    from mlops_assets.tools.sample_request import curl_command

    command = curl_command("http://127.0.0.1:8000/predict", {"records": [{"a": 1}]})
    assert "$MLOPS_API_TOKEN" in command and "'{\"records\": [{\"a\": 1}]}'" in command


@pytest.fixture()
def serve_stub():
    from mlops_assets_tests.serve_stub import ServeStub

    stub = ServeStub(version="3")
    yield stub
    stub.close()


def test_serving_outage_names_what_is_down_and_nothing_while_serving(serve_stub) -> None:
    from mlops_assets_tests.ray_support import free_port
    from mlops_assets_tests.serve_stub import running_app

    assert dep.serving_outage(serve_stub.target) is None
    serve_stub.healthz = 503
    assert dep.serving_outage(serve_stub.target) == "/healthz answered 503"
    serve_stub.healthz = 200
    serve_stub.applications = {"phishing": {**running_app(replicas=0), "status": "DEPLOYING"}}
    assert "DEPLOYING with no running replica" in (dep.serving_outage(serve_stub.target) or "")
    serve_stub.applications = {"phishing": running_app(replicas=1, state="STARTING")}
    assert "no running replica" in (dep.serving_outage(serve_stub.target) or "")
    serve_stub.applications = {}
    assert "'phishing' is not deployed" in (dep.serving_outage(serve_stub.target) or "")
    closed = f"http://127.0.0.1:{free_port()}"
    assert (dep.serving_outage(dep.ServeTarget(closed, closed)) or "").startswith(dep.DASHBOARD_DOWN)


def test_restore_champion_without_a_champion_deploys_nothing(serve_stub, spec, tmp_path) -> None:
    from mlops_assets.registry.model_store import NoChampionError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(NoChampionError, match="nothing to restore"):
        dep.restore_champion(target=serve_stub.target, tracking_uri=uri, spec=spec, model_name="none-yet")
    assert serve_stub.applications["phishing"]["_version"] == "3"  # the stub was only read

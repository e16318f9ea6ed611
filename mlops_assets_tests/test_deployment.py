"""Deploy logic without a cluster: config rendering, comparisons, restore-on-failure, local head settings."""

from __future__ import annotations

from typing import Any

import dagster as dg
import httpx
import pytest

from mlops_assets.deployment import rollout as dep
from mlops_assets.serving.config import ModelRef
from mlops_assets.tools.ray_cluster import ClusterConfig, config_from_env, head_command
from mlops_assets.tools.serve_ingress import HAPROXY_SETTINGS


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
    two = {**base, "applications": [base["applications"][0], {**base["applications"][0], "name": "b",
                                                               "route_prefix": "/b"}]}
    with pytest.raises(dep.DeploymentError, match="exactly one application named 'other'"):
        dep.render_serve_config(two, ref=ModelRef(version="1"), app_name="other")


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
            if config == previous:  # the restore: the version that was live answers again
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
                    "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_BINARY_PATH", *HAPROXY_SETTINGS,
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
    # HAProxy's settings (one thread, no per-request log to Ray) are a local head's in every file.
    for services in (compose, production):
        environment = services["services"]["ray-head"]["environment"]
        assert {k: environment.get(k) for k in HAPROXY_SETTINGS} == HAPROXY_SETTINGS
    pod_env = {item["name"]: item.get("value") for item in
               service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {k: pod_env.get(k) for k in HAPROXY_SETTINGS} == HAPROXY_SETTINGS
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


# --- several data sets: each its own Serve application on one cluster ---------------------------


FLOWS = dep.ServeTarget("http://127.0.0.1:8265", "http://127.0.0.1:8000", "network_flows", "t",
                        route_prefix="/network_flows")


def test_a_second_data_set_renders_from_the_single_application_base() -> None:
    base = dep.load_serve_config()
    out = dep.render_serve_config(base, ref=ModelRef(model_name="network_flows-classifier", version="2"),
                                  app_name="network_flows", route_prefix="/network_flows",
                                  env_vars={"MLOPS_DATASET_SPEC": "network_flows"})
    [app] = out["applications"]
    assert (app["name"], app["route_prefix"]) == ("network_flows", "/network_flows")
    assert app["deployments"][0]["user_config"] == {"model_name": "network_flows-classifier", "version": "2"}
    assert app["runtime_env"]["env_vars"] == {"MLOPS_DATASET_SPEC": "network_flows"}
    assert app["import_path"] == _app(base)["import_path"] and app["args"] == _app(base)["args"]
    assert (_app(base)["name"], _app(base)["route_prefix"]) == ("phishing", "/")  # the base is not changed
    phishing = _app(dep.render_serve_config(base, ref=ModelRef(version="1")))
    assert (phishing["name"], phishing["route_prefix"]) == ("phishing", "/")


def test_a_target_addresses_its_application_below_its_route_prefix() -> None:
    assert FLOWS.app_url == "http://127.0.0.1:8000/network_flows"
    assert FLOWS.endpoint == "http://127.0.0.1:8000/network_flows/predict"
    trailing = dep.ServeTarget("d", "http://h:1/", route_prefix="/x/")
    assert trailing.app_url == "http://h:1/x" and trailing.endpoint == "http://h:1/x/predict"
    root = dep.ServeTarget("d", "http://h:1/")
    assert (root.app_url, root.endpoint) == ("http://h:1", "http://h:1/predict")
    with pytest.raises(ValueError, match="must start with '/'"):
        dep.ServeTarget("d", "http://h:1", route_prefix="x")


def _live(*apps: dict[str, Any], port: int = 8000, deleting: tuple[str, ...] = ()) -> dict[str, Any]:
    """The dashboard's GET /api/serve/applications/ with `apps` (deployed configs) live."""
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 30.0, "ssl_keyfile": None},
            "applications": {a["name"]: {"status": "DELETING" if a["name"] in deleting else "RUNNING",
                                         "route_prefix": a.get("route_prefix"), "deployed_app_config": a}
                             for a in apps}}


PHISHING_APP = {"name": "phishing", "route_prefix": "/", "import_path": "x:y", "marker": "live"}
FLOWS_APP = {"name": "network_flows", "route_prefix": "/network_flows", "import_path": "x:y", "marker": "live"}


@pytest.fixture()
def dashboard(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the fake dashboard lists (`details`) and every config PUT to it (`put`)."""
    state: dict[str, Any] = {"details": _live(), "put": []}
    monkeypatch.setattr(dep, "serve_applications", lambda target, timeout=10.0: state["details"])
    monkeypatch.setattr(dep, "put_config", lambda target, config: state["put"].append(config))
    return state


def test_submit_keeps_every_other_live_application_unchanged(dashboard) -> None:
    dashboard["details"] = _live(PHISHING_APP, FLOWS_APP)
    new = {**FLOWS_APP, "marker": "new"}
    dep.submit(FLOWS, {"http_options": {"host": "127.0.0.1", "port": 8000}, "applications": [new]})
    [config] = dashboard["put"]
    assert config["applications"] == [PHISHING_APP, new]  # the live order; only the target's app is new
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 30.0}
    # A first deploy of the second data set adds its application after the live ones.
    dashboard["details"] = _live(PHISHING_APP)
    dep.submit(FLOWS, {"applications": [new]})
    assert dashboard["put"][-1]["applications"] == [PHISHING_APP, new]
    # An application being deleted is not submitted again (that would bring it back).
    dashboard["details"] = _live(PHISHING_APP, FLOWS_APP, deleting=("network_flows",))
    dep.submit(dep.ServeTarget("d", "s"), {"applications": [{**PHISHING_APP, "marker": "new"}]})
    assert [a["name"] for a in dashboard["put"][-1]["applications"]] == ["phishing"]


def test_submit_refuses_a_proxy_port_other_applications_do_not_use(dashboard) -> None:
    dashboard["details"] = _live(PHISHING_APP, port=8000)
    with pytest.raises(dep.DeploymentError, match=r"at port 8001, but \['phishing'\] live .* at port 8000"):
        dep.submit(FLOWS, {"http_options": {"port": 8001}, "applications": [FLOWS_APP]})
    with pytest.raises(dep.DeploymentError, match="duplicate"):  # two applications at one route prefix
        dep.submit(FLOWS, {"applications": [{**FLOWS_APP, "route_prefix": "/"}]})
    assert dashboard["put"] == []
    dashboard["details"] = _live(PHISHING_APP, port=8000)  # alone on the cluster, its own port as before
    dep.submit(dep.ServeTarget("d", "s"), {"http_options": {"port": 8001}, "applications": [PHISHING_APP]})
    assert dashboard["put"][-1]["http_options"] == {"port": 8001}


def test_submit_submits_nothing_when_the_live_applications_are_unknown(monkeypatch) -> None:
    def down(target, timeout=10.0):
        raise httpx.ConnectError("refused")

    put: list[Any] = []
    monkeypatch.setattr(dep, "serve_applications", down)
    monkeypatch.setattr(dep, "put_config", lambda target, config: put.append(config))
    with pytest.raises(dep.DeploymentError, match="cannot read the applications live.*nothing submitted"):
        dep.submit(FLOWS, {"applications": [FLOWS_APP]})
    assert put == []


def test_delete_application_removes_only_the_target_application(dashboard, monkeypatch) -> None:
    dashboard["details"] = _live(PHISHING_APP, FLOWS_APP)

    def put(target, config):
        dashboard["put"].append(config)
        dashboard["details"] = _live(*config["applications"])

    monkeypatch.setattr(dep, "put_config", put)
    dep.delete_application(FLOWS, timeout_s=5)
    [config] = dashboard["put"]
    assert config["applications"] == [PHISHING_APP]
    assert config["http_options"]["port"] == 8000
    dep.delete_application(FLOWS, timeout_s=5)  # already gone: nothing submitted
    assert len(dashboard["put"]) == 1


class FakeServe:
    """A fake dashboard and Serve proxy behind one httpx transport: each application of the PUT
    config serves the version its PredictionService pins, below its route prefix; a pinned
    `fail_version` does not load (the replicas keep what they had and say why)."""

    def __init__(self, apps: list[dict[str, Any]]) -> None:
        self.apps = {a["name"]: a for a in apps}
        self.serving = {a["name"]: self.version(a) for a in apps}
        self.fail_version: str | None = None
        self.puts: list[dict[str, Any]] = []
        self.paths: list[str] = []

    @staticmethod
    def version(app: dict[str, Any]) -> str:
        return str(app["deployments"][0]["user_config"].get("version"))

    def handle(self, request: httpx.Request) -> httpx.Response:
        import json

        if request.url.port == 8265:  # the dashboard
            if request.method == "PUT":
                self.puts.append(json.loads(request.content))
                self.apps = {a["name"]: a for a in self.puts[-1]["applications"]}
                self.serving = {name: self.version(a) if self.version(a) != self.fail_version
                                else self.serving.get(name, "none") for name, a in self.apps.items()}
                return httpx.Response(200)
            listed = _live(*self.apps.values())
            for entry in listed["applications"].values():
                entry["deployments"] = {"PredictionService": {"replicas": [{"state": "RUNNING"}]}}
            return httpx.Response(200, json=listed)
        path = request.url.path
        self.paths.append(path)
        prefixes = {a.get("route_prefix", "/").rstrip("/"): name for name, a in self.apps.items()}
        root = max((p for p in prefixes if path.startswith(p + "/")), key=len)  # the longest prefix, as Serve
        name, route = prefixes[root], path[len(root):]
        version, wanted = self.serving[name], self.version(self.apps[name])
        if route == "/model":
            error = {"last_load_error": {"message": "boom"}, "requested": f"v {wanted}"} if version != wanted else {}
            return httpx.Response(200, json={"version": version, "max_records": 100, **error})
        if route == "/healthz":
            return httpx.Response(200, json={"status": "ok"})
        if route == "/release":
            return httpx.Response(200, json={"strategy": "direct"})
        if route != "/predict":  # what the app at / answers for another prefix's path
            return httpx.Response(404, json={"error": "Not Found"})
        n = len(json.loads(request.content)["records"])
        return httpx.Response(200, json={"model_version": version,
                                         "predictions": [{"phishing_probability": 0.25}] * n})

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        transport = httpx.MockTransport(self.handle)
        monkeypatch.setattr(dep, "_client", lambda timeout=10.0, dashboard=False: httpx.Client(transport=transport))
        monkeypatch.setattr(dep, "check_candidate", lambda *a, **k: None)
        monkeypatch.setattr(dep.time, "sleep", lambda s: None)


def _rendered(name: str, prefix: str, version: str) -> dict[str, Any]:
    config = dep.render_serve_config(dep.load_serve_config(), ref=ModelRef(model_name=f"{name}-m", version=version),
                                     app_name=name, route_prefix=prefix, http_port=8000)
    return config["applications"][0]


def test_deploying_one_data_set_leaves_the_other_application_serving(spec, monkeypatch) -> None:
    serve = FakeServe([_rendered("phishing", "/", "7")])
    serve.install(monkeypatch)
    phishing_before = dict(serve.apps["phishing"])
    records = [{f.name: f.values[0] for f in spec.features}] * 3
    deploy = {"tracking_uri": "sqlite:////nowhere.db", "spec": spec, "records": records, "expected": [0.25] * 3}

    result = dep.deploy_version(target=FLOWS, version="2", model_name="network_flows-m", **deploy)
    assert result.endpoint == "http://127.0.0.1:8000/network_flows/predict" and result.replaced_version is None
    [put] = serve.puts
    assert [a["name"] for a in put["applications"]] == ["phishing", "network_flows"]
    assert put["applications"][0] == phishing_before
    assert put["applications"][1]["route_prefix"] == "/network_flows"
    # Every read of the deploy went below the target's prefix, none to the phishing app at /.
    assert serve.paths and all(p.startswith("/network_flows/") for p in serve.paths)
    assert dep.live_version(FLOWS) == "2" and dep.release_state(FLOWS) is not None
    assert dep.serving_outage(FLOWS) is None and dep.current_release(FLOWS).strategy == "direct"

    flows_before = dict(serve.apps["network_flows"])
    phishing = dep.ServeTarget("http://127.0.0.1:8265", "http://127.0.0.1:8000", token="t")
    dep.deploy_version(target=phishing, version="8", model_name="phishing-m", **deploy)
    assert serve.puts[-1]["applications"][1] == flows_before
    assert (dep.live_version(phishing), dep.live_version(FLOWS)) == ("8", "2")

    # A failed deploy of one restores its own previous config; the other stays as it is.
    serve.fail_version = "3"
    with pytest.raises(dep.DeploymentError, match="could not switch.*previous config was restored"):
        dep.deploy_version(target=FLOWS, version="3", model_name="network_flows-m", **deploy)
    assert serve.apps["network_flows"] == flows_before and serve.serving == {"phishing": "8", "network_flows": "2"}


def test_metrics_count_only_the_target_applications_series() -> None:
    from mlops_assets.monitoring import comparison as cmp
    from mlops_assets.monitoring import live as mon

    text = "\n".join([
        "# TYPE ray_mlops_serving_requests_total counter",
        'ray_mlops_serving_requests_total{application="phishing",route="/predict",status="200"} 10',
        'ray_mlops_serving_requests_total{application="phishing",route="/predict",status="500"} 1',
        'ray_mlops_serving_requests_total{application="network_flows",route="/predict",status="200"} 100',
        'ray_mlops_serving_requests_total{application="network_flows",route="/predict",status="503"} 7',
        "# TYPE ray_mlops_serving_release_answers_total counter",
        'ray_mlops_serving_release_answers_total{application="phishing",role="champion",status="200",version="1"} 4',
        'ray_mlops_serving_release_answers_total{application="network_flows",role="champion",status="200",version="3"} 40',
        ""])
    assert (mon.parse_serving_metrics(text).requests, mon.parse_serving_metrics(text).server_errors) == (11, 1)
    flows = mon.parse_serving_metrics(text, application="network_flows")
    assert (flows.requests, flows.server_errors) == (107, 7)
    assert mon.parse_serving_metrics(text, application=None).requests == 118
    assert cmp.parse_release_counters(text)["champion"][0] == 4
    assert cmp.parse_release_counters(text, application="network_flows")["champion"][0] == 40
    # Series without the label (one application's exporter, or older Ray) still count.
    bare = 'ray_mlops_serving_requests_total{route="/predict",status="200"} 5\n'
    assert mon.parse_serving_metrics(bare).requests == 5
    assert mon.parse_serving_metrics(bare, application="network_flows").requests == 5


def test_each_application_spools_and_reads_its_own_data_set() -> None:
    from mlops_assets.serving.prediction_log import default_spool_dir
    from mlops_assets.settings import load_settings

    assert default_spool_dir("/data/predictions", "/spool") != default_spool_dir(
        "/data/datasets/network_flows/predictions", "/spool")
    env = dep.replica_env_vars(tracking_uri="sqlite:////m.db", data_url="/data/datasets/network_flows",
                               prediction_log_url="/data/datasets/network_flows/predictions",
                               dataset_spec_path="network_flows")
    # A head started with every data set's list: the replica still reads the one spec its app names.
    head = {"MLOPS_DATASETS": "phishing_websites,network_flows", "MLOPS_DATA_URL": "/data"}
    replica = load_settings({**head, **env})
    assert (replica.dataset_spec_path, replica.prediction_log_url) == (
        "network_flows", "/data/datasets/network_flows/predictions")
    assert "MLOPS_DATASETS" not in dep.replica_env_vars(tracking_uri="sqlite:////m.db", data_url="/data")


def test_a_data_sets_settings_name_its_own_application_and_route(tmp_path) -> None:
    from mlops_assets.settings import dataset_settings, load_settings

    settings = load_settings({"MLOPS_DATA_URL": str(tmp_path), "MLOPS_DATASETS": "phishing_websites,network_flows"})
    primary, flows = (dep.target_from_settings(dataset_settings(settings, name)) for name in (None, "network_flows"))
    assert (primary.app_name, primary.route_prefix, primary.endpoint) == ("phishing", "/", "http://127.0.0.1:8000/predict")
    assert (flows.app_name, flows.endpoint) == ("network_flows", "http://127.0.0.1:8000/network_flows/predict")

"""Settings once: one reading of the environment, resources built from it with concrete values
(secrets as dg.EnvVar, so the UI shows the variable, never its value), and no pure module that
reads the environment."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets import constants as c
from mlops_assets.defs.resources import MonitoringResource, RayServeResource
from mlops_assets.serving.config import DEFAULT_DASHBOARD_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_EXPORT_PORT
from mlops_assets.settings import load_settings

PACKAGE = Path(__file__).resolve().parents[1] / "mlops_assets"
TOKEN = "tok-settings-5309"
WEBHOOK = "http://127.0.0.1:9/hook?key=wh-secret-4242"


def _environment(root: Path) -> dict[str, str]:
    return {
        "MLOPS_DATA_URL": str(root / "data"), "MLOPS_LANDING_URL": str(root / "landing"),
        "MLOPS_DATASET_SPEC": str(root / "spec.json"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/m.db", "MLOPS_MLFLOW_ARTIFACT_ROOT": (root / "art").as_uri(),
        "MLOPS_MLFLOW_EXPERIMENT": "exp-x", "MLOPS_MODEL_NAME": "model-x", "MLFLOW_UI_URL": "http://127.0.0.1:5999",
        "MLOPS_PREDICTION_LOG_URL": "memory://log", "MLOPS_LABELS_URL": "memory://labels",
        "MLOPS_METRICS_URL": "http://127.0.0.1:18080/metrics", "MLOPS_ALERT_WEBHOOK_URL": WEBHOOK,
        "MLOPS_RAY_DASHBOARD_URL": "http://127.0.0.1:18265", "MLOPS_SERVE_URL": "http://127.0.0.1:18000",
        "MLOPS_SERVE_HTTP_HOST": "0.0.0.0", "MLOPS_SERVE_CONFIG": str(root / "serve.yaml"),
        "MLOPS_API_TOKEN": TOKEN, "MLOPS_API_TOKEN_FILE": str(root / "token"), "MLOPS_ACTOR": "ci-bot", "MLOPS_GIT_SHA": "abc123",
        "MLOPS_MLFLOW_TRACKING_URI_FILE": str(root / "uri-file"),
    }


def test_settings_take_every_variable_and_otherwise_the_defaults_of_constants(tmp_path: Path) -> None:
    given = load_settings(_environment(tmp_path))
    assert (given.data_url, given.landing_url, given.model_name, given.mlflow_experiment) == (
        str(tmp_path / "data"), str(tmp_path / "landing"), "model-x", "exp-x")
    assert (given.prediction_log_url, given.labels_url, given.serve_url, given.api_token, given.actor) == (
        "memory://log", "memory://labels", "http://127.0.0.1:18000", TOKEN, "ci-bot")
    assert TOKEN not in repr(given) and "wh-secret" not in repr(given)  # secrets never in a log line

    default = load_settings({"MLOPS_DATA_URL": str(tmp_path)})
    assert (default.mlflow_experiment, default.model_name) == (c.MLFLOW_EXPERIMENT, c.REGISTERED_MODEL_NAME)
    assert default.landing_url == str(tmp_path / c.LANDING_SUBDIR)
    assert default.prediction_log_url == f"{tmp_path}/predictions" and default.labels_url == f"{tmp_path}/labels"
    assert default.ray_dashboard_url.endswith(f":{DEFAULT_DASHBOARD_PORT}")
    assert default.serve_url.endswith(f":{DEFAULT_HTTP_PORT}")
    assert default.metrics_url.endswith(f":{DEFAULT_METRICS_EXPORT_PORT}/metrics")
    assert default.alert_webhook_url is None and default.api_token == "" and default.actor is None
    # A port given as a variable moves the default URL with it.
    assert load_settings({"MLOPS_SERVE_PORT": "18123"}).serve_url.endswith(":18123")
    with pytest.raises(ValueError, match="MLOPS_SERVE_PORT"):
        load_settings({"MLOPS_SERVE_PORT": "eighty"})


# Run in a fresh interpreter: the definitions load exactly as a code location does, with this environment.
_SHOW = """
import json
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from mlops_assets.definitions import defs

snap = RepositorySnap.from_def(defs.get_repository_def())
shown = {r.name: {k: (json.loads(v) if isinstance(v, str) else {"env": v.name}) for k, v in r.configured_values.items()}
         for r in snap.resources or []}
print(json.dumps({"shown": shown, "snapshot": serialize_value(snap)}))
"""


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("settings")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_"))}
    out = subprocess.run([sys.executable, "-c", _SHOW], env={**env, **_environment(root)}, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return {"root": root, **json.loads(out.strip().splitlines()[-1])}


def test_definitions_loaded_with_an_environment_show_its_values_in_every_resource(shown: dict) -> None:
    root, values = shown["root"], shown["shown"]
    platform, mlflow, ray_serve, monitoring = (values[k] for k in ("platform", "mlflow", "ray_serve", "monitoring"))
    assert platform == {"data_url": str(root / "data"), "landing_url": str(root / "landing"),
                        "dataset_spec_path": str(root / "spec.json")}
    assert values["io_manager"]["base_url"] == f"{root}/data/{c.ASSETS_SUBDIR}"
    assert {k: mlflow[k] for k in ("artifact_root", "experiment", "model_name", "ui_url", "actor", "git_sha")} == {
        "artifact_root": (root / "art").as_uri(), "experiment": "exp-x", "model_name": "model-x",
        "ui_url": "http://127.0.0.1:5999", "actor": "ci-bot", "git_sha": "abc123"}
    assert mlflow["tracking_uri"] == f"sqlite:///{root}/m.db"
    assert {k: ray_serve[k] for k in ("dashboard_url", "serve_url", "http_host", "serve_config_path")} == {
        "dashboard_url": "http://127.0.0.1:18265", "serve_url": "http://127.0.0.1:18000", "http_host": "0.0.0.0",
        "serve_config_path": str(root / "serve.yaml")}
    assert {k: monitoring[k] for k in ("prediction_log_url", "labels_url", "metrics_url")} == {
        "prediction_log_url": "memory://log", "labels_url": "memory://labels",
        "metrics_url": "http://127.0.0.1:18080/metrics"}
    # Every field the environment sets is shown as a value: none is left for run time to look up.
    for name in ("platform", "mlflow", "ray_serve", "monitoring", "io_manager"):
        assert all(v is not None for v in values[name].values()), (name, values[name])


def test_secrets_are_shown_as_the_variable_that_holds_them_never_as_their_value(shown: dict) -> None:
    assert shown["shown"]["ray_serve"]["api_token"] == {"env": "MLOPS_API_TOKEN"}
    assert shown["shown"]["monitoring"]["alert_webhook_url"] == {"env": "MLOPS_ALERT_WEBHOOK_URL"}
    assert TOKEN not in shown["snapshot"] and "wh-secret" not in shown["snapshot"]


def test_resources_built_from_settings_resolve_the_secret_variables_in_a_run(monkeypatch, tmp_path: Path) -> None:
    env = _environment(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()

    @dg.asset
    def probe(ray_serve: RayServeResource, monitoring: MonitoringResource) -> None:
        assert ray_serve.target().token == TOKEN and monitoring.alert_webhook_url == WEBHOOK

    result = dg.materialize([probe], resources={"ray_serve": RayServeResource.from_settings(settings),
                                                "monitoring": MonitoringResource.from_settings(settings)})
    assert result.success


# Modules that may read the process environment: the settings, the development tools (CLI, local
# Ray head), and the replica's entry point. Everything else takes its values as arguments.
ALLOWED_READERS = ("settings.py", "tools/", "serving/app.py", "serving/config.py")
# Not settings: writes MLflow and whylogs make to the process environment, undone or preset.
ALLOWED_FUNCTIONS = {
    ("training/tracking.py", "use_tracking_uri"),  # puts back the MLFLOW_TRACKING_URI mlflow.set_tracking_uri wrote
    ("monitoring/drift.py", "<module>"),  # os.environ.setdefault("WHYLOGS_NO_ANALYTICS", ...): a write, before import
    ("defs/resources.py", "<module>"),  # the one binding: build_resources(load_settings()) at definition load
    ("defs/resources.py", "_base"),  # ParquetIOManager's fallback (engineer G's class); the binding always sets base_url
}


def environment_reads(source: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every read of the environment in `source`: `os.environ`,
    `os.getenv`, `from os import environ/getenv`, and `load_settings()` with no argument."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name) and child.value.id == "os" \
                    and child.attr in ("environ", "getenv", "environb", "getenvb"):
                found.append((scope, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.module == "os" \
                    and {a.name for a in child.names} & {"environ", "getenv"}:
                found.append((scope, child.lineno))
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == "load_settings" \
                    and not child.args and not child.keywords:
                found.append((scope, child.lineno))
            visit(child, inner)

    visit(ast.parse(source), "<module>")
    return found


def test_the_scanner_finds_each_way_of_reading_the_environment() -> None:
    planted = ("import os\nfrom os import getenv\nA = os.environ.get('X')\n"
               "def f():\n    return os.getenv('Y'), load_settings(), load_settings({'Z': '1'})\n")
    assert environment_reads(planted) == [("<module>", 2), ("<module>", 3), ("f", 5), ("f", 5)]


def test_no_module_outside_the_settings_tools_and_replica_entry_point_reads_the_environment() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(ALLOWED_READERS):
            continue
        for scope, line in environment_reads(path.read_text()):
            if (rel, scope) not in ALLOWED_FUNCTIONS:
                offenders.append(f"mlops_assets/{rel}:{line} ({scope})")
    assert not offenders, "read the environment outside settings.py (take an argument instead): " + ", ".join(offenders)

"""What the end-to-end modules share: the platform on an isolated Ray head, an alert webhook, result look-ups.

Each module gets a head of its own (module-scoped fixtures), so one module's apps, aliases and
prediction log never leak into another's; this file only removes the copies of how they are set up.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlops_assets.deployment import rollout as dep
from mlops_assets.settings import load_settings
from mlops_assets.tools.ray_cluster import ClusterConfig, start_head
from mlops_assets_tests.ray_support import end_test_head, isolated_cluster

# Service options for tests: small requests, a log flushed every half second, a short predict timeout.
ARGS = {"max_records": 100, "max_body_bytes": 200_000, "log_flush_interval_s": 0.5, "predict_timeout_s": 10}
FAST = {"ops": {"trained_model": {"config": {"iterations": 80, "thread_count": 1}}}}
# Settings a developer's shell may export that would point the platform somewhere else than the test's.
CLEARED_ENV = ("MLOPS_LANDING_URL", "MLOPS_DATASET_SPEC", "MLOPS_PREDICTION_LOG_URL", "MLOPS_LABELS_URL",
               "MLFLOW_UI_URL", "MLOPS_MODEL_NAME", "MLOPS_MLFLOW_EXPERIMENT", "MLOPS_RELEASE_STRATEGY")


class Webhook:
    """An alert receiver on loopback: every JSON body posted to it, in order."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclass(frozen=True)
class HeadPlatform:
    root: Path
    data: Path
    tracking_uri: str
    cluster: ClusterConfig
    target: dep.ServeTarget
    webhook: Webhook


@contextmanager
def platform_on_head(root: Path, token: str, *, env: Mapping[str, str] | None = None,
                     one_replica: bool = False) -> Iterator[HeadPlatform]:
    """The platform's settings in this process's environment, a Ray head on free loopback ports, a webhook.

    `env` adds or overrides settings (a data set, DAGSTER_HOME); a data set given there is the
    head's too, so replicas load its spec. `one_replica` gives every deployment one replica (two cores).
    Everything is stopped and the settings restored on exit.
    """
    data = root / "data"
    (data / "mlflow").mkdir(parents=True)
    tracking_uri = f"sqlite:///{data / 'mlflow' / 'mlflow.db'}"
    cluster = isolated_cluster(root)
    config = dep.load_serve_config()
    config["applications"][0]["args"] = dict(ARGS)
    if one_replica:
        for deployment in config["applications"][0]["deployments"]:
            deployment["num_replicas"] = 1
    serve_config = root / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(config))
    webhook = Webhook()
    settings = {
        "MLOPS_DATA_URL": str(data), "MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_API_TOKEN": token,
        "MLOPS_MLFLOW_ARTIFACT_ROOT": (data / "mlflow" / "artifacts").as_uri(),
        "MLOPS_RAY_DASHBOARD_URL": cluster.dashboard_url, "MLOPS_SERVE_URL": cluster.serve_url,
        "MLOPS_METRICS_URL": cluster.metrics_url, "MLOPS_SERVE_CONFIG": str(serve_config),
        "MLOPS_ALERT_WEBHOOK_URL": webhook.url, **(env or {}),
    }
    head_env = {"MLOPS_API_TOKEN": token, "MLFLOW_TRACKING_URI": tracking_uri, "MLOPS_DATA_URL": str(data)}
    if "MLOPS_DATASET_SPEC" in settings:
        head_env["MLOPS_DATASET_SPEC"] = settings["MLOPS_DATASET_SPEC"]
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for key in CLEARED_ENV:
            patch.delenv(key, raising=False)
        for key, value in settings.items():
            patch.setenv(key, value)
        stack.callback(webhook.server.shutdown)
        start_head(cluster, env=head_env)
        stack.callback(end_test_head, cluster)
        # No app deletion at teardown: the head is stopped right after, which ends the apps with it,
        # whereas deleting them first waits out the ingress's graceful shutdown (~30 s a module).
        target = dep.target_from_settings(load_settings())
        yield HeadPlatform(root, data, tracking_uri, cluster, target, webhook)


def ingest_landed(instance: dg.DagsterInstance, defs: dg.Definitions, raw_dir: Path) -> None:
    """Each landed file as its raw_batches partition, as `mlops-assets ingest` and raw_files_sensor's runs do."""
    from mlops_assets.defs.ingestion.assets import INGEST_JOB, ingest_landed_on_instance

    files = ingest_landed_on_instance(instance, defs.resolve_job_def(INGEST_JOB), str(raw_dir))
    assert files and all(f.status == "accepted" for f in files), files


def past_hour(hours_ago: int) -> datetime:
    """The start of a complete hour (UTC), `hours_ago` hours before the current one."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours_ago)


def hour_key(hour: datetime) -> str:
    return hour.strftime("%Y-%m-%d-%H:00")


def check_named(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    [found] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return found


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    """The metadata values of the run's one materialization of `asset`."""
    [event] = result.asset_materializations_for_node(asset)
    return {k: getattr(v, "value", v) for k, v in event.metadata.items()}

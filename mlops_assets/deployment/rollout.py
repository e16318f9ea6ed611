"""Deploying a registry version to the running Ray Serve application, and rolling it back.

Steps, each of which fails with a reason and leaves the previous version serving:
1. load-and-query check: the candidate is loaded through the serving code path (sha256
   verified), answers the sample records, and its answers equal the offline model's;
2. declarative deploy: `deploy/serve_config.yaml` with the version pinned in `user_config`,
   PUT to the dashboard's `/api/serve/applications/` (what `serve deploy` does). A changed
   user_config is a lightweight update: replicas `reconfigure`, nothing restarts;
3. live check: the application is RUNNING, `/model` names the candidate, `/healthz` is 200
   and the sample answered over HTTP equals the offline answers.
If step 2 or 3 fails, the config that was live before is submitted again.

Several data sets share one Ray cluster, each its own Serve application (`ServeTarget.app_name`,
answering below `ServeTarget.route_prefix`). The PUT replaces the cluster's whole config, so every
submit here carries the other live applications unchanged beside the one it edits (`submit`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import yaml

from mlops_assets import constants as c
from mlops_assets.core.dataset_spec import DatasetSpec
from mlops_assets.serving.config import APP_NAME, DEPLOYMENT_NAME, ROUTE_PREFIX, ModelRef, ServiceOptions
from mlops_assets.serving.release import (
    CANDIDATE_DEPLOYMENT_NAME,
    RELEASE_ROUTE,
    ReleaseConfig,
    bucket,
    ingress_user_config,
    split_ingress_config,
)
from mlops_assets.serving.request import build_request_model, parse_predict_matrix
from mlops_assets.serving.scoring import Scorer, positive_column, scorer_from_loaded
from mlops_assets.settings import DATASETS_ENV, Settings

logger = logging.getLogger(__name__)

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
PROBABILITY_TOLERANCE = 1e-9  # same model file, same inputs: answers must match to float precision
# Settings replicas need, passed as runtime_env env_vars. The API token is not among them: it
# reaches workers through the Ray head's environment (a Kubernetes Secret in the RayService),
# so it never appears in a config that the dashboard shows. Nor does a tracking URI with a
# password: replicas read it from a file (MLOPS_MLFLOW_TRACKING_URI_FILE).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLOPS_DATA_URL", "MLOPS_PREDICTION_LOG_URL", "MLOPS_DATASET_SPEC")
# The Serve http_options the dashboard reports that a config may carry back.
HTTP_OPTION_KEYS = ("host", "port", "request_timeout_s", "keep_alive_timeout_s", "root_path")


class DeploymentError(RuntimeError):
    """A deploy step failed; the message names the step and the reason."""


@dataclass(frozen=True)
class ServeTarget:
    """Where the Ray dashboard (deploy API) and the Serve HTTP proxy listen, and which application.

    `serve_url` is the proxy's base URL, shared by every application of the cluster; this one
    answers below its `route_prefix` there (`app_url`): `/` for the primary data set, `/<name>`
    for the others."""

    dashboard_url: str
    serve_url: str
    app_name: str = APP_NAME
    token: str = ""
    route_prefix: str = ROUTE_PREFIX

    def __post_init__(self) -> None:
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route prefix {self.route_prefix!r} of application {self.app_name!r} must start with '/'")

    @property
    def app_url(self) -> str:
        """`serve_url` with the route prefix: where the app's `/predict`, `/healthz` and `/model` are."""
        prefix = self.route_prefix.strip("/")
        return f"{self.serve_url.rstrip('/')}/{prefix}" if prefix else self.serve_url.rstrip("/")

    @property
    def endpoint(self) -> str:
        return f"{self.app_url}/predict"


@dataclass(frozen=True)
class DeployResult:
    endpoint: str
    live_version: str
    replaced_version: str | None
    checked_records: int
    seconds: float
    steps: list[str] = field(default_factory=list)


def target_from_settings(
    settings: Settings, *, dashboard_url: str | None = None, serve_url: str | None = None
) -> ServeTarget:
    """The settings' dashboard and Serve URLs (explicit URLs win), serving token and application
    (a data set's own, `settings.dataset_settings`; `phishing` at / for the primary)."""
    return ServeTarget(
        dashboard_url=dashboard_url or settings.ray_dashboard_url,
        serve_url=serve_url or settings.serve_url,
        app_name=settings.serve_app_name,
        token=settings.serving_token(),
        route_prefix=settings.serve_route_prefix,
    )


# --- pure pieces ----------------------------------------------------------------------------


def load_serve_config(path: str | Path | None = None) -> dict[str, Any]:
    """The Serve config at `path` (the settings' MLOPS_SERVE_CONFIG), else the repository's deploy/serve_config.yaml."""
    with open(path or DEFAULT_SERVE_CONFIG) as handle:
        return yaml.safe_load(handle)


def render_serve_config(
    base: Mapping[str, Any],
    *,
    ref: ModelRef,
    app_name: str = APP_NAME,
    route_prefix: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
    args: Mapping[str, Any] | None = None,
    release: ReleaseConfig | None = None,
    candidate_replicas: int = 1,
) -> dict[str, Any]:
    """The config to submit: `base` with the model pinned and per-environment values filled in.

    The application named `app_name` is rendered; when `base` has none but exactly one application
    (the shipped file: `phishing`), that one is the template of every data set's, renamed.
    `route_prefix` replaces the application's (None: keep the base's).
    `release` (serving/release.py) goes on the ingress's user_config; an active one gives the
    candidate deployment `candidate_replicas` replicas serving its version, otherwise it has none."""
    config = copy.deepcopy(dict(base))
    listed = config.get("applications") or []
    apps = [a for a in listed if a.get("name") == app_name]
    if not apps and len(listed) == 1:
        apps = listed
        apps[0]["name"] = app_name
    if len(apps) != 1:
        raise DeploymentError(f"serve config must have exactly one application named {app_name!r} "
                              f"(or a single application to use as its template); it has {[a.get('name') for a in listed]}")
    app = apps[0]
    if route_prefix is not None:
        app["route_prefix"] = route_prefix
    deployments = [d for d in app.setdefault("deployments", []) if d.get("name") == DEPLOYMENT_NAME]
    if not deployments:
        deployments = [{"name": DEPLOYMENT_NAME}]
        app["deployments"].append(deployments[0])
    deployments[0]["user_config"] = ref.to_user_config()
    _release_entries(app, deployments[0], release or ReleaseConfig(), ref, candidate_replicas)
    if env_vars:
        from mlops_assets.core.redaction import has_credentials, redact_uri

        # The dashboard returns runtime_env to anyone who can read it: no credential goes there.
        leaking = sorted(k for k, v in env_vars.items() if has_credentials(str(v)))
        if leaking:
            raise DeploymentError(
                f"runtime_env variable(s) {leaking} carry a credential "
                f"({', '.join(redact_uri(str(env_vars[k])) for k in leaking)}); give replicas secrets "
                "through their environment or a mounted file (MLOPS_MLFLOW_TRACKING_URI_FILE for the registry)")
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **{k: str(v) for k, v in env_vars.items()}}
    if args:
        app["args"] = {**app.get("args", {}), **dict(args)}
    ServiceOptions.from_args(app.get("args"))  # a bad option fails here, not in a replica
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = int(http_port)
    if http_host:  # containers bind 0.0.0.0; the shipped config binds loopback
        config.setdefault("http_options", {})["host"] = http_host
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # the same validation the dashboard applies
    return config


def _release_entries(app: dict[str, Any], champion: Mapping[str, Any], release: ReleaseConfig, champion_ref: ModelRef,
                     candidate_replicas: int) -> None:
    """Set the ingress's user_config (the release and the champion's ModelRef) and the candidate
    deployment's replicas and version."""
    from mlops_assets.serving.app import INGRESS_DEPLOYMENT_NAME

    entries = app["deployments"]
    ingress = next((d for d in entries if d.get("name") == INGRESS_DEPLOYMENT_NAME), None)
    if ingress is None:
        ingress = {"name": INGRESS_DEPLOYMENT_NAME}
        entries.append(ingress)
    ingress["user_config"] = ingress_user_config(release, champion_ref)
    model_name = champion_ref.model_name
    candidate = next((d for d in entries if d.get("name") == CANDIDATE_DEPLOYMENT_NAME), None)
    if candidate is None:  # the champion's settings, under the candidate's name
        candidate = {k: copy.deepcopy(v) for k, v in champion.items() if k not in ("name", "num_replicas", "user_config")}
        candidate["name"] = CANDIDATE_DEPLOYMENT_NAME
        entries.append(candidate)
    if release.active:  # pinned replicas, the idle scale-to-zero cleared
        candidate["num_replicas"] = int(candidate_replicas)
        candidate["autoscaling_config"] = None
        candidate["user_config"] = ModelRef(model_name=model_name, version=release.candidate_version).to_user_config()
    else:  # no replica: the code's scale-to-zero applies (a config may not say num_replicas 0)
        candidate.pop("num_replicas", None)
        candidate.pop("autoscaling_config", None)
        candidate["user_config"] = ModelRef(model_name=model_name).to_user_config()


def forwarded_env(env: Mapping[str, str]) -> dict[str, str]:
    """The FORWARDED_ENV settings of `env` that carry no credential (those reach replicas as files:
    `serving.config.replica_tracking_env`), plus an operator's mounted tracking-URI file."""
    from mlops_assets.core.redaction import has_credentials
    from mlops_assets.serving.config import TRACKING_URI_FILE_ENV

    out = {k: env[k] for k in FORWARDED_ENV if env.get(k) and not has_credentials(env[k])}
    if env.get(TRACKING_URI_FILE_ENV):
        out[TRACKING_URI_FILE_ENV] = env[TRACKING_URI_FILE_ENV]
    return out


def replica_env_vars(
    *, tracking_uri: str, data_url: str, prediction_log_url: str | None = None,
    dataset_spec_path: str | None = None, tracking_uri_file: str | None = None,
) -> dict[str, str]:
    """The replicas' runtime_env variables: this deploy's registry, data root, prediction log and spec.

    A tracking URI with a credential goes as the path of a 0600 file holding it (the operator's
    mounted `tracking_uri_file`, else one under a local data root's secrets folder); ValueError
    when neither exists.
    """
    from mlops_assets.serving.config import SECRETS_SUBDIR, TRACKING_URI_FILE_ENV, replica_tracking_env

    out = forwarded_env({"MLOPS_PREDICTION_LOG_URL": prediction_log_url or "",
                         "MLOPS_DATASET_SPEC": dataset_spec_path or ""})
    if dataset_spec_path:  # a replica serves its application's one spec, whatever data set list the Ray head has
        out[DATASETS_ENV] = ""
    local = data_url.removeprefix("file://")
    secrets_dir = f"{local.rstrip('/')}/{SECRETS_SUBDIR}" if "://" not in local else None
    mounted = {TRACKING_URI_FILE_ENV: tracking_uri_file} if tracking_uri_file else {}
    out.update(replica_tracking_env(tracking_uri, secrets_dir=secrets_dir, env=mounted))
    out["MLOPS_DATA_URL"] = data_url
    return out


def mismatches(expected: Sequence[float], got: Sequence[float], tol: float = PROBABILITY_TOLERANCE) -> list[int]:
    """Indices where two probability lists differ by more than `tol` (length mismatch: all)."""
    if len(expected) != len(got):
        return list(range(max(len(expected), len(got))))
    return [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if not math.isclose(a, b, abs_tol=tol)]


def sample_records(frame: pd.DataFrame, spec: DatasetSpec, n: int = 64) -> list[dict[str, Any]]:
    """Up to `n` feature records (each value its kind's plain type, spec order) from a test set or simulated frame."""
    from mlops_assets.core.schema import json_records

    return json_records(frame.head(n), spec)


def simulated_sample(spec: DatasetSpec, n: int = 64, seed: int = 20240611) -> list[dict[str, int]]:
    """Check records when no test set is at hand (rollback): seeded draws from the spec's domains."""
    from mlops_assets.tools.simulator import SimulationConfig, simulate_records

    return sample_records(simulate_records(spec, SimulationConfig(n_rows=n, seed=seed)), spec, n)


def offline_probabilities(model: Any, records: Sequence[Mapping[str, int]], spec: DatasetSpec) -> list[float]:
    """The model applied directly to a DataFrame: the reference the served answers must equal."""
    frame = pd.DataFrame.from_records(list(records), columns=spec.feature_names)
    proba = model.predict_proba(frame)
    return [float(p) for p in proba[:, positive_column(getattr(model, "classes_", None), spec.positive_class)]]


def offline_model(tracking_uri: str, model_name: str, version: str) -> Any:
    """The registered model through MLflow's catboost flavor: a load path independent of serving's."""
    import mlflow.catboost

    from mlops_assets.training.tracking import use_tracking_uri

    with use_tracking_uri(tracking_uri):  # scoped: no global MLflow URI or env var left behind
        return mlflow.catboost.load_model(f"models:/{model_name}/{version}")


# --- step 1: load-and-query check -------------------------------------------------------------


def check_candidate(
    tracking_uri: str,
    ref: ModelRef,
    spec: DatasetSpec,
    records: Sequence[Mapping[str, int]],
    expected: Sequence[float],
) -> Scorer:
    """Load the candidate as a replica would and score `records` through the request path."""
    import json

    from mlops_assets.registry.model_store import load_verified_model

    if not records:
        raise DeploymentError("load-and-query check needs at least one sample record")
    try:
        loaded = load_verified_model(tracking_uri, ref.model_name, alias=ref.alias, version=ref.version)
        scorer = scorer_from_loaded(loaded, spec)
    except Exception as exc:
        raise DeploymentError(f"load check: {ref.describe()} does not load: {type(exc).__name__}: {exc}") from exc
    request_model = build_request_model(spec, max(len(records), 1))
    body = json.dumps({"records": list(records)}).encode()
    _, matrix = parse_predict_matrix(body, request_model)  # the replica's path: validated matrix, then the model
    got = scorer.score(matrix).probabilities
    bad = mismatches(expected, got)
    if bad:
        i = bad[0]
        raise DeploymentError(
            f"query check: {ref.describe()} differs from the offline model on {len(bad)} of {len(records)} "
            f"sample records (first: record {i}, served {got[i] if i < len(got) else None}, "
            f"offline {expected[i] if i < len(expected) else None})"
        )
    return scorer


# --- talking to the cluster ---------------------------------------------------------------------


def _client(timeout: float = 10.0, *, dashboard: bool = False) -> httpx.Client:
    # The dashboard's REST API takes the Ray cluster's token; the Serve proxy never sees it.
    from mlops_assets.tools.ray_cluster import auth_headers

    headers = auth_headers() if dashboard else None
    return httpx.Client(timeout=timeout, trust_env=False, headers=headers)  # loopback: never via an HTTP proxy


def serve_applications(target: ServeTarget, timeout: float = 10.0) -> dict[str, Any]:
    """The dashboard's GET /api/serve/applications/: every application of the cluster, by name."""
    with _client(timeout, dashboard=True) as client:
        response = client.get(f"{target.dashboard_url}/api/serve/applications/")
    response.raise_for_status()
    return response.json()


def cluster_nodes(target: ServeTarget, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every node the dashboard knows (its `nodes?view=summary`, the raylet's fields: `nodeId`,
    `nodeManagerAddress`, `metricsExportPort`, `state`, `isHeadNode`, ...)."""
    with _client(timeout, dashboard=True) as client:
        response = client.get(f"{target.dashboard_url}/nodes", params={"view": "summary"})
    response.raise_for_status()
    return [node.get("raylet") or {} for node in (response.json().get("data") or {}).get("summary") or []]


def node_metrics_urls(target: ServeTarget, timeout: float = 10.0) -> list[str]:
    """The Prometheus endpoint of every ALIVE node of the cluster, head first: each node's metrics
    agent exports only the replicas on that node, so the serving counters are the sum over these."""
    urls = []
    nodes = sorted(cluster_nodes(target, timeout), key=lambda n: not n.get("isHeadNode"))
    for node in nodes:
        host, port = node.get("nodeManagerAddress"), node.get("metricsExportPort")
        if node.get("state") == "ALIVE" and host and port:
            urls.append(f"http://{f'[{host}]' if ':' in str(host) else host}:{int(port)}/metrics")
    return urls


def app_details(target: ServeTarget) -> dict[str, Any] | None:
    try:
        return (serve_applications(target).get("applications") or {}).get(target.app_name)
    except httpx.HTTPError:
        return None


def _live_apps(details: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> deployed config of each application the controller keeps: one being deleted is not
    submitted again (that would bring it back)."""
    return {name: app["deployed_app_config"] for name, app in (details.get("applications") or {}).items()
            if app.get("deployed_app_config") and app.get("status") != "DELETING"}


def _cluster_config(details: Mapping[str, Any], apps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "proxy_location": details.get("proxy_location") or "HeadOnly",
        "http_options": {k: v for k, v in (details.get("http_options") or {}).items() if k in HTTP_OPTION_KEYS},
        "applications": [dict(a) for a in apps],
    }


def live_config(target: ServeTarget) -> dict[str, Any] | None:
    """The cluster's full ServeDeploySchema as last deployed (every application; to restore the
    target's), or None when the target's application is not deployed."""
    details = serve_applications(target)
    apps = _live_apps(details)
    if target.app_name not in apps:
        return None
    return _cluster_config(details, list(apps.values()))


def own_app(target: ServeTarget, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with only the target's application: what a deploy, release or restore of it submits."""
    return {**config, "applications": [a for a in config.get("applications") or [] if a.get("name") == target.app_name]}


def with_live_apps(config: Mapping[str, Any], details: Mapping[str, Any]) -> dict[str, Any]:
    """`config`'s applications beside every other application live on the cluster (`details`, the
    dashboard's GET), those unchanged: a live one of the same name is replaced, the others kept.

    The PUT carries one http_options for all applications, and Serve keeps the ones it started
    with, so beside other applications the live ones are submitted; a host or port that differs
    from them is an error (the application would not answer where its target says)."""
    merged = copy.deepcopy(dict(config))
    mine = {str(a.get("name")): a for a in merged.get("applications") or []}
    live = _live_apps(details)
    others = {name: app for name, app in live.items() if name not in mine}
    if others:
        running = _cluster_config(details, [])
        wanted = merged.get("http_options") or {}
        clash = {k: (wanted[k], running["http_options"][k]) for k in ("host", "port")
                 if k in wanted and k in running["http_options"] and str(wanted[k]) != str(running["http_options"][k])}
        if clash:
            asked = ", ".join(f"{k} {a}" for k, (a, _) in clash.items())
            used = ", ".join(f"{k} {b}" for k, (_, b) in clash.items())
            raise DeploymentError(
                f"application(s) {sorted(mine)} ask for the Serve proxy at {asked}, but {sorted(others)} live on "
                f"the cluster behind it at {used}: all applications share one proxy, so deploy with its host and "
                "port (or delete the other applications first)")
        merged["http_options"] = {**wanted, **running["http_options"]}
        merged.setdefault("proxy_location", running["proxy_location"])
    order = [*live, *(name for name in mine if name not in live)]  # the live order, then the new applications
    merged["applications"] = [mine.get(name) or others[name] for name in order]
    return merged


def put_config(target: ServeTarget, config: Mapping[str, Any]) -> None:
    """PUT a ServeDeploySchema as it is: it replaces every application of the cluster."""
    with _client(30.0, dashboard=True) as client:
        response = client.put(f"{target.dashboard_url}/api/serve/applications/", json=dict(config))
    if response.status_code != 200:
        raise DeploymentError(f"deploy request rejected ({response.status_code}): {response.text[:500]}")


def submit(target: ServeTarget, config: Mapping[str, Any]) -> None:
    """PUT `config`'s applications to the dashboard (the declarative path `serve deploy` uses), with
    every other application live on the cluster unchanged beside them (`with_live_apps`)."""
    from ray.serve.schema import ServeDeploySchema

    try:
        details = serve_applications(target, timeout=30.0)  # as long as the PUT may take: a fresh head is slow
    except (httpx.HTTPError, ValueError) as exc:  # unknown: submitting could drop another data set's app
        raise DeploymentError(f"cannot read the applications live at {target.dashboard_url} "
                              f"({type(exc).__name__}: {exc}); nothing submitted") from exc
    merged = with_live_apps(config, details)
    try:
        ServeDeploySchema.model_validate(merged)  # two applications at one route prefix fail here, named
    except ValueError as exc:
        raise DeploymentError(f"the config with the live applications is invalid: {str(exc)[:500]}") from exc
    put_config(target, merged)


def delete_application(target: ServeTarget, timeout_s: float = 120.0) -> None:
    """Remove the target's application and no other: the live config without it is submitted.

    Returns once the dashboard no longer lists it (behind the HAProxy ingress its ingress replicas
    first drain, 30 s by default); DeploymentError when it is still listed after `timeout_s`."""
    details = serve_applications(target)
    apps = _live_apps(details)
    if target.app_name in apps:
        put_config(target, _cluster_config(details, [a for name, a in apps.items() if name != target.app_name]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if target.app_name not in (serve_applications(target).get("applications") or {}):
                return
        except httpx.HTTPError:  # a busy dashboard: ask again
            pass
        time.sleep(1.0)
    raise DeploymentError(f"application {target.app_name!r} was still listed {timeout_s:.0f}s after its removal")


def get_json(target: ServeTarget, path: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET `path` of the target's application (below its route prefix): (status, JSON body)."""
    with _client(timeout) as client:
        response = client.get(f"{target.app_url}{path}")
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": response.text[:200]}


def live_version(target: ServeTarget) -> str | None:
    try:
        status, body = get_json(target, "/model")
    except httpx.HTTPError:
        return None
    return str(body["version"]) if status == 200 and body.get("version") else None


def predict_over_http(
    target: ServeTarget, records: Sequence[Mapping[str, int]], spec: DatasetSpec, max_records: int | None = None
) -> tuple[str, list[float]]:
    """Score records over HTTP in requests of at most the service's `max_records`; (version, probabilities)."""
    if max_records is None:
        _, info = get_json(target, "/model")
        max_records = int(info.get("max_records") or len(records) or 1)
    key = f"{spec.positive_name}_probability"
    versions: set[str] = set()
    probabilities: list[float] = []
    with _client(30.0) as client:
        for start in range(0, len(records), max_records):
            chunk = list(records[start:start + max_records])
            response = client.post(target.endpoint, json={"records": chunk},
                                   headers={"Authorization": f"Bearer {target.token}"})
            if response.status_code != 200:
                raise DeploymentError(f"live query: /predict answered {response.status_code}: {response.text[:300]}")
            body = response.json()
            versions.add(str(body["model_version"]))
            probabilities += [float(p[key]) for p in body["predictions"]]
    if len(versions) != 1:
        raise DeploymentError(f"live query: answers came from versions {sorted(versions)}, expected one")
    return versions.pop(), probabilities


def wait_until_serving(target: ServeTarget, version: str, timeout_s: float = c.DEPLOY_TIMEOUT_S) -> None:
    """Wait until the app is RUNNING and `/model` names `version` (3 answers in a row)."""
    deadline = time.monotonic() + timeout_s
    streak, last = 0, "no answer yet"
    while time.monotonic() < deadline:
        details = app_details(target) or {}
        status = details.get("status")
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeploymentError(f"application {target.app_name} is {status}: {details.get('message', '')[:500]}")
        try:
            code, body = get_json(target, "/model")
        except httpx.HTTPError as exc:
            code, body = 0, {"error": type(exc).__name__}
        if code == 200 and str(body.get("version")) == version and status == "RUNNING":
            streak += 1
            if streak >= 3:
                return
        else:
            streak = 0
            error = body.get("last_load_error") or body.get("error")
            if code == 200 and error and version in str(body.get("requested", "")):
                raise DeploymentError(f"replica could not switch to version {version}: {error}")
            last = f"status {status}, /model {code} version {body.get('version')} {error or ''}".strip()
        time.sleep(0.5)
    raise DeploymentError(f"version {version} not serving after {timeout_s}s ({last})")


# --- the whole deploy -------------------------------------------------------------------------


def deploy_version(
    *,
    target: ServeTarget,
    tracking_uri: str,
    spec: DatasetSpec,
    version: str,
    records: Sequence[Mapping[str, int]],
    expected: Sequence[float],
    model_name: str,
    base_config: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    http_host: str | None = None,
    timeout_s: float = c.DEPLOY_TIMEOUT_S,
) -> DeployResult:
    """Check, deploy and verify `version`; on a failure after submitting, restore what was live."""
    start = time.monotonic()
    ref = ModelRef(model_name=model_name, version=str(version))
    steps: list[str] = []
    check_candidate(tracking_uri, ref, spec, records, expected)
    steps.append(f"load-and-query check passed on {len(records)} records")

    previous_config = live_config(target) if app_details(target) is not None else None
    replaced = live_version(target)
    http_port = int(httpx.URL(target.serve_url).port or 8000)
    config = render_serve_config(base_config or load_serve_config(), ref=ref, app_name=target.app_name,
                                 route_prefix=_route_prefix(target), env_vars=env_vars, http_port=http_port,
                                 http_host=http_host, args=args)
    try:
        submit(target, own_app(target, config))
        steps.append("config submitted")
        wait_until_serving(target, ref.version or "", timeout_s)
        code, health = get_json(target, "/healthz")
        if code != 200:
            raise DeploymentError(f"health check after deploy: /healthz answered {code}: {health}")
        served_version, got = predict_over_http(target, records, spec)
        bad = mismatches(expected, got)
        if served_version != ref.version or bad:
            raise DeploymentError(
                f"live query: version {served_version} answered, {len(bad)} of {len(records)} answers differ "
                "from the offline model"
            )
        steps.append("live: healthy and answers equal the offline model")
    except Exception as exc:
        restored = _restore(target, previous_config, replaced, min(timeout_s, RESTORE_TIMEOUT_S))
        reason = exc if isinstance(exc, DeploymentError) else f"{type(exc).__name__}: {exc}"
        raise DeploymentError(f"deploying version {version} failed: {reason}; {restored}") from exc
    return DeployResult(target.endpoint, str(ref.version), replaced if replaced != ref.version else None,
                        len(records), time.monotonic() - start, steps)


RESTORE_TIMEOUT_S = 120.0


def _route_prefix(target: ServeTarget) -> str | None:
    """The prefix to render: the target's, or None at `/` (the base config's stays, as before)."""
    return None if target.route_prefix == ROUTE_PREFIX else target.route_prefix


def _restore(target: ServeTarget, previous_config: Mapping[str, Any] | None, previous_version: str | None = None,
             timeout_s: float = RESTORE_TIMEOUT_S) -> str:
    """Submit the target's application as it was live before (the others as they are now), and
    wait until its version answers again."""
    if previous_config is None:
        return "nothing was deployed before"
    try:
        submit(target, own_app(target, previous_config))
    except Exception as exc:  # report, but the original failure is what the caller must see
        return f"restoring the previous config failed too: {exc}"
    if not previous_version:
        return "the previous config was restored"
    # The failed candidate may have left the app DEPLOY_FAILED; that status lingers until the
    # controller applies the restored config, so here only "RUNNING and naming the old version" counts.
    deadline = time.monotonic() + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        running = (app_details(target) or {}).get("status") == "RUNNING"
        streak = streak + 1 if running and live_version(target) == previous_version else 0
        if streak >= 3:
            return f"the previous config was restored and version {previous_version} serves"
        time.sleep(0.5)
    return f"the previous config was resubmitted, but version {previous_version} was not RUNNING after {timeout_s:.0f}s"


def delete_app(target: ServeTarget, timeout_s: float = 90.0) -> None:
    """Remove every Serve application (what `serve shutdown` does over the REST API).

    The dashboard answers only after Serve's controller shut down, and behind the HAProxy ingress
    each ingress replica first stays reachable for Serve's draining period (30 s by default,
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S) so HAProxy can deregister it; on a loaded
    machine the answer comes later still, so a timed-out request is followed by waiting until no
    application is listed.
    """
    try:
        with _client(timeout_s, dashboard=True) as client:
            client.delete(f"{target.dashboard_url}/api/serve/applications/").raise_for_status()
        return
    except httpx.TimeoutException:
        logger.warning("deleting the Serve applications at %s took over %.0fs; waiting for them to go",
                       target.dashboard_url, timeout_s)
    deadline = time.monotonic() + timeout_s  # as long again for the shutdown to finish
    while time.monotonic() < deadline:
        if not (serve_applications(target).get("applications") or {}):
            return
        time.sleep(1.0)
    raise DeploymentError(f"the Serve applications at {target.dashboard_url} were still listed {2 * timeout_s:.0f}s after a delete")


def rollback(
    *,
    target: ServeTarget,
    tracking_uri: str,
    spec: DatasetSpec,
    model_name: str,
    records: Sequence[Mapping[str, int]],
    base_config: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    http_host: str | None = None,
    timeout_s: float = c.DEPLOY_TIMEOUT_S,
    actor: str | None = None,
) -> DeployResult:
    """Swap `champion` and `previous-champion`, then deploy the new champion, in one step.

    If the deploy fails, the aliases are swapped back (only if no one moved them meanwhile), so
    the registry keeps naming what serves.
    """
    from mlflow import MlflowClient

    from mlops_assets.registry.model_store import rollback_champion

    client = MlflowClient(tracking_uri=tracking_uri)
    new, replaced = rollback_champion(client, model_name, by=actor)
    try:
        expected = offline_probabilities(offline_model(tracking_uri, model_name, new), records, spec)
        return deploy_version(target=target, tracking_uri=tracking_uri, spec=spec, version=new,
                              records=records, expected=expected, model_name=model_name,
                              base_config=base_config, env_vars=env_vars, args=args, http_host=http_host,
                              timeout_s=timeout_s)
    except Exception as exc:
        try:
            rollback_champion(client, model_name, expected_champion=new, by=actor)
        except Exception as undo:  # the aliases moved under us, or the registry is down: say so
            raise DeploymentError(f"rollback to version {new} (from {replaced}) failed: {exc}; undoing the alias "
                                  f"swap failed too ({type(undo).__name__}: {undo})") from exc
        raise DeploymentError(f"rollback to version {new} (from {replaced}) failed and was undone: {exc}") from exc


# --- outages: serving lost (a Ray head restarted, replicas gone), told apart from a bad model -----


DASHBOARD_DOWN = "Ray dashboard unreachable"


def serving_outage(target: ServeTarget) -> str | None:
    """Why the endpoint cannot serve, or None when it can.

    An outage is infrastructure, not a model: the dashboard does not answer, the Serve app is
    missing or has no RUNNING replica, or `/healthz` is unreachable or not 200. A replica that
    answers with a model, whichever version, is not an outage.
    """
    try:
        apps = serve_applications(target).get("applications") or {}
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # no head listening: nothing to deploy to
        return f"{DASHBOARD_DOWN} at {target.dashboard_url} ({type(exc).__name__})"
    except (httpx.HTTPError, ValueError) as exc:  # a head, but Serve's API slow or failing (a fresh head)
        return f"Serve REST API at {target.dashboard_url} did not answer ({type(exc).__name__})"
    app = apps.get(target.app_name)
    if app is None:
        return f"Serve application {target.app_name!r} is not deployed"
    replicas = [r for d in (app.get("deployments") or {}).values() for r in d.get("replicas") or []]
    if not any(r.get("state") == "RUNNING" for r in replicas):
        return f"Serve application {target.app_name!r} is {app.get('status')} with no running replica"
    try:
        code, _ = get_json(target, "/healthz")
    except httpx.HTTPError as exc:
        return f"endpoint {target.app_url} unreachable ({type(exc).__name__})"
    return None if code == 200 else f"/healthz answered {code}"


@dataclass(frozen=True)
class RestoreResult:
    """What `restore_champion` found and did; `action` is "none" (already serving) or "deployed"."""

    action: str
    champion: str
    was_serving: str | None
    reason: str
    deploy: DeployResult | None = None

    def describe(self) -> str:
        if self.action == "none":
            return f"champion version {self.champion} already serving: nothing to restore"
        return f"restored serving of champion version {self.champion} ({self.reason})"


def restore_champion(
    *,
    target: ServeTarget,
    tracking_uri: str,
    spec: DatasetSpec,
    model_name: str,
    records: Sequence[Mapping[str, int]] | None = None,
    base_config: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    http_host: str | None = None,
    timeout_s: float = c.DEPLOY_TIMEOUT_S,
) -> RestoreResult:
    """Serve the registry's `champion` again when the app is missing, down or serving another version.

    The champion goes through the whole deploy (load-and-query check, live check); the aliases
    are never touched: this restores what the registry already says, it decides nothing.
    Raises LookupError when there is no champion, DeploymentError when the deploy fails.
    """
    from mlflow import MlflowClient

    from mlops_assets.registry.model_store import NoChampionError, alias_version

    champion = alias_version(MlflowClient(tracking_uri=tracking_uri), model_name, c.ALIAS_CHAMPION)
    if champion is None:
        raise NoChampionError(f"model {model_name!r} has no {c.ALIAS_CHAMPION!r} version: nothing to restore")
    outage = serving_outage(target)
    if outage is not None and outage.startswith(DASHBOARD_DOWN):  # no head to deploy to: nothing to try yet
        raise DeploymentError(f"cannot restore champion version {champion}: {outage}; start the Ray head first")
    live = live_version(target) if outage is None else None
    if outage is None and live == champion:
        return RestoreResult("none", champion, live, "serving")
    reason = outage or f"version {live} serves, the registry's champion is {champion}"
    records = list(records) if records else simulated_sample(spec)
    expected = offline_probabilities(offline_model(tracking_uri, model_name, champion), records, spec)
    result = deploy_version(target=target, tracking_uri=tracking_uri, spec=spec, version=champion, records=records,
                            expected=expected, model_name=model_name, base_config=base_config, env_vars=env_vars,
                            args=args, http_host=http_host, timeout_s=timeout_s)
    return RestoreResult("deployed", champion, live, reason, result)


# --- releases: shadow and canary (serving/release.py routes; these start and end them) ------------


@dataclass(frozen=True)
class ReleaseResult:
    """What a release step did: the release, the version serving as champion, and the steps."""

    release: ReleaseConfig
    champion_version: str
    seconds: float
    steps: list[str] = field(default_factory=list)


def release_state(target: ServeTarget, timeout: float = 5.0) -> dict[str, Any] | None:
    """The ingress's `GET /release` (strategy, versions, this replica's counts), or None when it does not answer."""
    try:
        code, body = get_json(target, RELEASE_ROUTE, timeout)
    except httpx.HTTPError:
        return None
    return body if code == 200 else None


def current_release(target: ServeTarget) -> ReleaseConfig:
    """The release the deployed config names (the ingress's user_config); direct when none."""
    from mlops_assets.serving.app import INGRESS_DEPLOYMENT_NAME

    config = live_config(target)
    for app in (config or {}).get("applications", []):
        if app.get("name") != target.app_name:
            continue
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == INGRESS_DEPLOYMENT_NAME and deployment.get("user_config"):
                return split_ingress_config(deployment["user_config"])[0]
    return ReleaseConfig()


def sticky_key_for(release: ReleaseConfig, candidate: bool, prefix: str = "probe") -> str:
    """A client key the canary routes to the candidate (or to the champion): for checks and tests."""
    for i in range(100_000):
        key = f"{prefix}-{i}"
        if (bucket(key) < release.canary_share) == candidate:
            return key
    raise DeploymentError(f"no probe key routes to the {'candidate' if candidate else 'champion'} "
                          f"at canary share {release.canary_share}")


def _wait_release(target: ServeTarget, release: ReleaseConfig, timeout_s: float, candidate_running: bool) -> None:
    """Wait until the app is RUNNING, `/release` names `release` (3 answers in a row) and the candidate
    deployment has a RUNNING replica (or, when it should have none, any)."""
    deadline = time.monotonic() + timeout_s
    streak, last = 0, "no answer yet"
    while time.monotonic() < deadline:
        details = app_details(target) or {}
        status = details.get("status")
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeploymentError(f"application {target.app_name} is {status}: {str(details.get('message', ''))[:500]}")
        state = release_state(target) or {}
        candidate = (details.get("deployments") or {}).get(CANDIDATE_DEPLOYMENT_NAME) or {}
        running = any(r.get("state") == "RUNNING" for r in candidate.get("replicas") or [])
        same = state.get("strategy") == release.strategy and state.get("release_id") == release.release_id
        if status == "RUNNING" and same and (running or not candidate_running):
            streak += 1
            if streak >= 3:
                return
        else:
            streak = 0
            last = (f"status {status}, /release {state.get('strategy')} {state.get('release_id')}, "
                    f"candidate {candidate.get('status')}")
        time.sleep(0.5)
    raise DeploymentError(f"release {release.release_id or release.strategy} not in place after {timeout_s}s ({last})")


def _probe_candidate(target: ServeTarget, release: ReleaseConfig, records: Sequence[Mapping[str, int]],
                     expected: Sequence[float], spec: DatasetSpec) -> str:
    """A canary's candidate answers the sample records over HTTP exactly as the offline model."""
    key = f"{spec.positive_name}_probability"
    with _client(30.0) as client:
        response = client.post(target.endpoint, json={"records": list(records)}, headers={
            "Authorization": f"Bearer {target.token}", release.sticky_header: sticky_key_for(release, True)})
    if response.status_code != 200:
        raise DeploymentError(f"canary probe: /predict answered {response.status_code}: {response.text[:300]}")
    body = response.json()
    got = [float(p[key]) for p in body["predictions"]]
    if str(body["model_version"]) != release.candidate_version or mismatches(expected, got):
        raise DeploymentError(f"canary probe: version {body['model_version']} answered; expected candidate "
                              f"{release.candidate_version} with the offline model's answers")
    return f"canary probe answered by version {release.candidate_version}, equal to the offline model"


def start_release(
    *,
    target: ServeTarget,
    tracking_uri: str,
    spec: DatasetSpec,
    model_name: str,
    release: ReleaseConfig,
    records: Sequence[Mapping[str, int]],
    expected: Sequence[float],
    base_config: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    args: Mapping[str, Any] | None = None,
    http_host: str | None = None,
    candidate_replicas: int = 1,
    timeout_s: float = c.DEPLOY_TIMEOUT_S,
) -> ReleaseResult:
    """Run `release.candidate_version` beside the serving champion as a shadow or canary.

    The candidate first passes the load-and-query check; the champion keeps serving its pinned
    version; the candidate deployment gets its replicas and the ingress the routing. Any failure
    after the submit restores the config that was live before.
    """
    start = time.monotonic()
    if not release.active or not release.candidate_version:
        raise DeploymentError(f"a release needs the shadow or canary strategy and a candidate, got {release.strategy}")
    live = live_version(target)
    if live is None:
        raise DeploymentError("no version serves: deploy a champion before releasing a candidate beside it")
    if live == release.candidate_version:
        raise DeploymentError(f"version {live} already serves as champion: nothing to release")
    ongoing = current_release(target)
    if ongoing.active:
        raise DeploymentError(f"release {ongoing.release_id} ({ongoing.strategy} of version "
                              f"{ongoing.candidate_version}) is in progress: promote or abort it first")
    release = replace(release, champion_version=live)
    ref = ModelRef(model_name=model_name, version=release.candidate_version)
    check_candidate(tracking_uri, ref, spec, records, expected)
    steps = [f"load-and-query check of version {release.candidate_version} passed on {len(records)} records"]
    previous = live_config(target)
    http_port = int(httpx.URL(target.serve_url).port or 8000)
    config = render_serve_config(base_config or load_serve_config(), ref=ModelRef(model_name=model_name, version=live),
                                 app_name=target.app_name, route_prefix=_route_prefix(target), env_vars=env_vars,
                                 http_port=http_port, http_host=http_host, args=args, release=release,
                                 candidate_replicas=candidate_replicas)
    try:
        submit(target, own_app(target, config))
        steps.append(f"{release.strategy} config submitted (champion {live} pinned)")
        _wait_release(target, release, timeout_s, candidate_running=True)
        if release.strategy == "canary" and release.canary_share > 0:
            steps.append(_probe_candidate(target, release, records, expected, spec))
        steps.append(f"{release.strategy} of version {release.candidate_version} live beside champion {live}")
    except Exception as exc:
        restored = _restore(target, previous, live, min(timeout_s, RESTORE_TIMEOUT_S))
        reason = exc if isinstance(exc, DeploymentError) else f"{type(exc).__name__}: {exc}"
        raise DeploymentError(f"starting the {release.strategy} of version {release.candidate_version} failed: "
                              f"{reason}; {restored}") from exc
    return ReleaseResult(release, live, time.monotonic() - start, steps)


def _edit_live(target: ServeTarget, edit: Any) -> dict[str, Any]:
    """The target's live application after `edit` (the only one in the config: `submit` keeps the others)."""
    config = live_config(target)
    if config is None:
        raise DeploymentError(f"application {target.app_name!r} is not deployed")
    config = own_app(target, config)
    for app in config["applications"]:
        edit(app)
    return config


def end_release(*, target: ServeTarget, promote: bool, model_name: str,
                timeout_s: float = c.DEPLOY_TIMEOUT_S) -> ReleaseResult:
    """End the live release: promote (the champion deployment switches to the candidate's version,
    in place) or abort (the champion keeps its version); then the ingress routes everything to the
    champion, and only after that the candidate's replicas go. No request is dropped on the way."""
    from mlops_assets.serving.app import INGRESS_DEPLOYMENT_NAME

    start = time.monotonic()
    release = current_release(target)
    if not release.active or not release.candidate_version:
        raise DeploymentError("no release in progress: nothing to promote or abort")
    champion = release.candidate_version if promote else str(release.champion_version or live_version(target))
    ended = release.ended()
    steps: list[str] = []

    def route_to_champion(app: dict[str, Any]) -> None:
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == DEPLOYMENT_NAME:
                deployment["user_config"] = ModelRef(model_name=model_name, version=champion).to_user_config()
            elif deployment.get("name") == INGRESS_DEPLOYMENT_NAME:
                deployment["user_config"] = ingress_user_config(ended, ModelRef(model_name=model_name, version=champion))

    submit(target, _edit_live(target, route_to_champion))
    wait_until_serving(target, champion, timeout_s)
    _wait_release(target, ended, timeout_s, candidate_running=False)
    steps.append(f"every request answered by version {champion}" + (" (promoted in place)" if promote else ""))

    def remove_candidate(app: dict[str, Any]) -> None:
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == CANDIDATE_DEPLOYMENT_NAME:
                deployment.pop("num_replicas", None)  # back to the code's scale-to-zero
                deployment.pop("autoscaling_config", None)
                deployment["user_config"] = ModelRef(model_name=model_name).to_user_config()

    submit(target, _edit_live(target, remove_candidate))
    steps.append(f"candidate deployment {CANDIDATE_DEPLOYMENT_NAME} (version {release.candidate_version}) removed")
    return ReleaseResult(release, champion, time.monotonic() - start, steps)


def launch_release(
    *, target: ServeTarget, tracking_uri: str, spec: DatasetSpec, model_name: str, release: ReleaseConfig,
    records: Sequence[Mapping[str, int]], actor: str | None = None, **deploy: Any,
) -> ReleaseResult:
    """Start a shadow or canary of `release.candidate_version` and record it in the registry
    (`candidate` alias, `champion` on the serving version, a `release-start` event)."""
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    from mlops_assets.registry import releases

    candidate = str(release.candidate_version)
    release = replace(release, release_id=release.release_id or f"{candidate}-{int(time.time())}",
                      started_at=release.started_at or datetime.now(UTC).isoformat())
    expected = offline_probabilities(offline_model(tracking_uri, model_name, candidate), records, spec)
    result = start_release(target=target, tracking_uri=tracking_uri, spec=spec, model_name=model_name,
                           release=release, records=records, expected=expected, **deploy)
    releases.begin_release(MlflowClient(tracking_uri=tracking_uri), model_name, candidate=candidate,
                           champion=result.champion_version, strategy=release.strategy,
                           release_id=str(result.release.release_id), by=actor,
                           canary_share=release.canary_share if release.strategy == "canary" else None)
    return result


def finish_release(
    *, target: ServeTarget, tracking_uri: str, model_name: str, promote: bool, actor: str | None = None,
    expected_release_id: str | None = None, reasons: Sequence[str] = (), timeout_s: float = c.DEPLOY_TIMEOUT_S,
) -> ReleaseResult:
    """Promote or abort the live release, in Serve and in the registry (one `release-promote` or
    `release-abort` event); with `expected_release_id`, only that release (a decision made on it)."""
    from mlflow import MlflowClient

    from mlops_assets.registry import releases

    live = current_release(target)
    if not live.active:
        raise DeploymentError("no release in progress: nothing to promote or abort")
    if expected_release_id is not None and live.release_id != expected_release_id:
        raise DeploymentError(f"release {expected_release_id} is no longer the live one (live: {live.release_id}); "
                              "nothing done")
    result = end_release(target=target, promote=promote, model_name=model_name, timeout_s=timeout_s)
    client = MlflowClient(tracking_uri=tracking_uri)
    details = {"strategy": live.strategy, "champion": live.champion_version, "reasons": list(reasons) or None}
    if promote:
        releases.promote_release(client, model_name, candidate=str(live.candidate_version),
                                 release_id=str(live.release_id), by=actor, **details)
    else:
        releases.abort_release(client, model_name, candidate=str(live.candidate_version),
                               release_id=str(live.release_id), by=actor, **details)
    return result

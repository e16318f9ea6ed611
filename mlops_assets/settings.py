"""The platform's settings: read from the environment once, here, and nowhere else.

`load_settings(env)` is the one reader of the process environment for platform settings;
`defs/resources.py` calls it once at definition load and builds every resource from the
result, the CLI and the local Ray head call it per command, and the pure library only ever
receives values. Every path the platform writes is under the data root (`MLOPS_DATA_URL`,
default `data`), which may be any fsspec URL; MLflow's SQLite store needs a local folder and
gets one. Defaults live in `constants` (and the ports in `serving.config`), never here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mlops_assets import constants as c
from mlops_assets.core.storage import check_url, join_url  # join_url: callers import it from here
from mlops_assets.serving.config import (
    APP_NAME,
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_HTTP_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_EXPORT_PORT,
    DEFAULT_RAY_PORT,
    PREDICTION_LOG_ENV,
    PREDICTIONS_SUBDIR,
    ROUTE_PREFIX,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    TRACKING_URI_FILE_ENV,
    api_token,
)

# The variables this module reads (README "Configuration" lists them with their defaults).
DATA_URL_ENV = "MLOPS_DATA_URL"
LANDING_URL_ENV = "MLOPS_LANDING_URL"
DATASET_SPEC_ENV = "MLOPS_DATASET_SPEC"
DATASETS_ENV = "MLOPS_DATASETS"  # several data sets at once: their specs, comma-separated, the first the primary
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
ARTIFACT_ROOT_ENV = "MLOPS_MLFLOW_ARTIFACT_ROOT"
EXPERIMENT_ENV = "MLOPS_MLFLOW_EXPERIMENT"
MODEL_NAME_ENV = "MLOPS_MODEL_NAME"
UI_URL_ENV = "MLFLOW_UI_URL"
DAGSTER_UI_URL_ENV = "MLOPS_DAGSTER_UI_URL"  # the Dagster UI, for links from MLflow runs back to their Dagster run
LABELS_ENV = "MLOPS_LABELS_URL"
METRICS_ENV = "MLOPS_METRICS_URL"
WEBHOOK_ENV = "MLOPS_ALERT_WEBHOOK_URL"
DASHBOARD_URL_ENV = "MLOPS_RAY_DASHBOARD_URL"
SERVE_URL_ENV = "MLOPS_SERVE_URL"
SERVE_HTTP_HOST_ENV = "MLOPS_SERVE_HTTP_HOST"
SERVE_CONFIG_ENV = "MLOPS_SERVE_CONFIG"
RELEASE_STRATEGY_ENV = "MLOPS_RELEASE_STRATEGY"  # direct | shadow | canary: how model_deployment releases
RELEASE_CANARY_SHARE_ENV = "MLOPS_RELEASE_CANARY_SHARE"
RAY_PORT_ENV = "MLOPS_RAY_PORT"
RAY_DASHBOARD_PORT_ENV = "MLOPS_RAY_DASHBOARD_PORT"
RAY_METRICS_PORT_ENV = "MLOPS_RAY_METRICS_PORT"
SERVE_PORT_ENV = "MLOPS_SERVE_PORT"
ACTOR_ENV = "MLOPS_ACTOR"
GIT_SHA_ENV = "MLOPS_GIT_SHA"
# Settings whose values are secrets: resources name the variable (dg.EnvVar), never the value.
SECRET_ENV = (TOKEN_ENV, WEBHOOK_ENV)

def _absolute_local(url: str) -> str:
    return url if "://" in url else str(Path(url).resolve())


class DataFolders:
    """The folders the platform writes under its data root, defined once for the settings and the
    platform resource (both have a `data_url`)."""

    if TYPE_CHECKING:
        data_url: str

    @property
    def batches_url(self) -> str:
        return join_url(self.data_url, c.BATCHES_SUBDIR)

    @property
    def quarantine_url(self) -> str:
        return join_url(self.data_url, c.QUARANTINE_SUBDIR)

    @property
    def reports_url(self) -> str:
        return join_url(self.data_url, c.REPORTS_SUBDIR)

    @property
    def features_url(self) -> str:
        return join_url(self.data_url, c.FEATURES_SUBDIR)

    @property
    def assets_url(self) -> str:
        return join_url(self.data_url, c.ASSETS_SUBDIR)


@dataclass(frozen=True)
class Settings(DataFolders):
    """Every per-environment value, resolved: no field means "look somewhere else later"."""

    data_url: str
    landing_url: str
    dataset_spec_path: str | None  # None: the packaged phishing spec
    mlflow_tracking_uri: str = field(repr=False)  # may carry a password: `shown` values are redacted
    mlflow_artifact_root: str
    mlflow_experiment: str
    model_name: str
    mlflow_ui_url: str | None
    mlflow_tracking_uri_file: str | None  # an operator's mounted file holding the URI, for replicas
    prediction_log_url: str
    labels_url: str
    metrics_url: str
    alert_webhook_url: str | None = field(repr=False)  # None: alerts go to the log only
    ray_port: int
    ray_dashboard_port: int
    ray_metrics_port: int
    serve_port: int
    ray_dashboard_url: str
    serve_url: str
    serve_http_host: str | None  # the Serve proxy's bind address; None: Ray's (loopback)
    serve_config_path: str | None  # None: the repository's deploy/serve_config.yaml
    api_token: str = field(repr=False)  # MLOPS_API_TOKEN; "" when the token is given as a file
    api_token_file: str | None  # MLOPS_API_TOKEN_FILE: a mounted secret, read when the token is needed
    actor: str | None  # who acts in the registry's history; None: the OS user
    git_sha: str | None  # the code's commit when there is no .git (images); None: `git rev-parse`
    secrets_in_env: frozenset[str] = frozenset()  # which of SECRET_ENV are set as variables
    release_strategy: str = c.RELEASE_STRATEGY  # how model_deployment releases a new champion
    release_canary_share: float = c.RELEASE_CANARY_SHARE
    dagster_ui_url: str | None = None  # None: MLflow runs name their Dagster run by id only
    # Several data sets at once (MLOPS_DATASETS): the others' names and specs; () with one data set.
    # These settings are the primary's; `dataset_settings` gives another's.
    other_datasets: tuple[tuple[str, str], ...] = ()
    dataset_name: str | None = None  # None: the primary data set (plain asset keys, app `phishing` at /)
    serve_app_name: str = APP_NAME
    serve_route_prefix: str = ROUTE_PREFIX

    @property
    def serve_app_url(self) -> str:
        """The data set's Serve application: the proxy's URL and its route prefix (`/` adds nothing)."""
        return self.serve_url.rstrip("/") + self.serve_route_prefix.rstrip("/")

    def serving_token(self) -> str:
        return read_api_token(self.api_token, self.api_token_file)



def read_api_token(value: str, path: str | None) -> str:
    """The serving token: `value`, else the contents of the file at `path` (read now, so a rotated
    mounted secret is picked up), else "". A named but unreadable file is an error that says which."""
    if value or not path:
        return value
    return api_token({TOKEN_FILE_ENV: path})


def _strategy(raw: str | None) -> str:
    if raw and raw not in ("direct", "shadow", "canary"):
        raise ValueError(f"{RELEASE_STRATEGY_ENV}={raw!r} is not one of direct, shadow, canary")
    return raw or c.RELEASE_STRATEGY


def _share(name: str, raw: str | None, default: float) -> float:
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={raw!r} must be a share in [0, 1]")
    return value


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default: this process's environment), with the defaults of `constants`."""
    env = os.environ if env is None else env

    def get(name: str) -> str | None:
        return env.get(name) or None

    def port(name: str, default: int) -> int:
        raw = get(name)
        try:
            return int(raw) if raw else default
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a port number") from None

    data_url = _absolute_local(check_url(DATA_URL_ENV, get(DATA_URL_ENV) or c.DEFAULT_DATA_DIR))
    local_mlflow = Path(data_url if "://" not in data_url else c.DEFAULT_DATA_DIR).resolve() / c.MLFLOW_SUBDIR
    spec_path, others = _datasets(get(DATASETS_ENV), get(DATASET_SPEC_ENV))
    dashboard_port = port(RAY_DASHBOARD_PORT_ENV, DEFAULT_DASHBOARD_PORT)
    metrics_port = port(RAY_METRICS_PORT_ENV, DEFAULT_METRICS_EXPORT_PORT)
    serve_port = port(SERVE_PORT_ENV, DEFAULT_HTTP_PORT)
    return Settings(
        data_url=data_url,
        landing_url=_absolute_local(check_url(LANDING_URL_ENV, get(LANDING_URL_ENV) or join_url(data_url, c.LANDING_SUBDIR))),
        dataset_spec_path=spec_path,
        mlflow_tracking_uri=get(TRACKING_URI_ENV) or f"sqlite:///{local_mlflow / 'mlflow.db'}",
        mlflow_artifact_root=check_url(ARTIFACT_ROOT_ENV, get(ARTIFACT_ROOT_ENV) or (local_mlflow / "artifacts").as_uri()),
        mlflow_experiment=get(EXPERIMENT_ENV) or c.MLFLOW_EXPERIMENT,
        model_name=get(MODEL_NAME_ENV) or c.REGISTERED_MODEL_NAME,
        mlflow_ui_url=get(UI_URL_ENV),
        mlflow_tracking_uri_file=get(TRACKING_URI_FILE_ENV),
        prediction_log_url=check_url(PREDICTION_LOG_ENV, get(PREDICTION_LOG_ENV) or join_url(data_url, PREDICTIONS_SUBDIR)),
        labels_url=check_url(LABELS_ENV, get(LABELS_ENV) or join_url(data_url, c.LABELS_SUBDIR)),
        metrics_url=get(METRICS_ENV) or f"http://{DEFAULT_HTTP_HOST}:{metrics_port}/metrics",
        alert_webhook_url=get(WEBHOOK_ENV),
        ray_port=port(RAY_PORT_ENV, DEFAULT_RAY_PORT),
        ray_dashboard_port=dashboard_port,
        ray_metrics_port=metrics_port,
        serve_port=serve_port,
        ray_dashboard_url=get(DASHBOARD_URL_ENV) or f"http://{DEFAULT_HTTP_HOST}:{dashboard_port}",
        serve_url=get(SERVE_URL_ENV) or f"http://{DEFAULT_HTTP_HOST}:{serve_port}",
        serve_http_host=get(SERVE_HTTP_HOST_ENV),
        serve_config_path=get(SERVE_CONFIG_ENV),
        release_strategy=_strategy(get(RELEASE_STRATEGY_ENV)),
        release_canary_share=_share(RELEASE_CANARY_SHARE_ENV, get(RELEASE_CANARY_SHARE_ENV), c.RELEASE_CANARY_SHARE),
        api_token=get(TOKEN_ENV) or "",
        api_token_file=get(TOKEN_FILE_ENV),
        actor=get(ACTOR_ENV),
        git_sha=get(GIT_SHA_ENV),
        secrets_in_env=frozenset(name for name in SECRET_ENV if get(name)),
        dagster_ui_url=get(DAGSTER_UI_URL_ENV),
        other_datasets=others,
    )


DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")  # an asset key prefix, a Serve app name and a route


def _datasets(raw: str | None, single_spec: str | None) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """(the primary's spec, the other data sets' (name, spec)) from MLOPS_DATASETS; without it the
    one data set of MLOPS_DATASET_SPEC. A data set's name is its spec's `name`."""
    if not raw:
        return single_spec, ()
    from mlops_assets.core.dataset_spec import DatasetSpecError, load_spec

    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"{DATASETS_ENV}={raw!r} names no data set")
    if single_spec and single_spec != entries[0]:
        raise ValueError(f"{DATASETS_ENV} names {entries[0]!r} first and {DATASET_SPEC_ENV}={single_spec!r}: "
                         f"the first of {DATASETS_ENV} is the primary data set, so set one of them")
    names: dict[str, str] = {}
    for position, entry in enumerate(entries, 1):
        try:
            name = load_spec(entry).name
        except DatasetSpecError as exc:
            raise ValueError(f"{DATASETS_ENV} entry {position} ({entry!r}): {exc}") from None
        if not DATASET_NAME.match(name):
            raise ValueError(f"{DATASETS_ENV} entry {position} ({entry!r}): the spec's name {name!r} must be "
                             "lower-case letters, digits and _ (it prefixes asset keys and names a Serve route)")
        if name in names:
            raise ValueError(f"{DATASETS_ENV}: {names[name]!r} and {entry!r} are both named {name!r}")
        names[name] = entry
    primary, *others = names.items()
    return primary[1], tuple(others)


def dataset_settings(settings: Settings, name: str | None) -> Settings:
    """The settings of data set `name` (None or the primary's name: `settings` itself). Another data
    set lives under <data root>/datasets/<name> (landing folder, reports, prediction log, labels), registers
    `<name>-classifier` in its own experiment, and is served as the Serve application `name` at `/<name>`."""
    if name is None or name == settings.dataset_name or name == primary_dataset_name(settings):
        return settings
    others = dict(settings.other_datasets)
    if name not in others:
        raise ValueError(f"no data set named {name!r}: the configured ones are "
                         f"{', '.join(dataset_names(settings))} ({DATASETS_ENV})")
    root = join_url(settings.data_url, c.DATASETS_SUBDIR, name)
    return replace(
        settings, data_url=root, landing_url=join_url(root, c.LANDING_SUBDIR), dataset_spec_path=others[name],
        mlflow_experiment=f"{settings.mlflow_experiment}-{name}", model_name=f"{name}-classifier",
        prediction_log_url=join_url(root, PREDICTIONS_SUBDIR), labels_url=join_url(root, c.LABELS_SUBDIR),
        dataset_name=name, serve_app_name=name, serve_route_prefix=f"/{name}", other_datasets=())


def primary_dataset_name(settings: Settings) -> str:
    from mlops_assets.core.dataset_spec import load_spec

    return load_spec(settings.dataset_spec_path).name


def dataset_names(settings: Settings) -> list[str]:
    """Every configured data set's name, the primary first."""
    return [primary_dataset_name(settings), *(name for name, _ in settings.other_datasets)]
